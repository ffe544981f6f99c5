"""DP-LaSE (Li et al., ACM MM 2021): unsupervised directions, density-preserving walks, subspaces.

The generator is split at a named layer into G1 (latents -> features) and G2 (features -> image).
k directions Gamma are learned so that walks along them change G1's features as much as possible
while different directions change them differently (l_var, eq. 8-9), kept orthonormal (l_reg,
eq. 10). Walks stay in the start point's iso-density region:

- known N(0, I) prior: rescale the walked point to the start's norm (eq. 2);
- unknown prior (W, W+, proxy spaces, uploaded latents): a learned per-dimension CDF F gives the
  density (eq. 3-5) and a correction module C moves the walked point back to the start's
  log-density (eq. 6-7), trained jointly with Gamma (eq. 11).

Subspace refinement (section 3.3) keeps, per direction, the largest cluster of G1's channels in
the self-expressive affinity (|R| + |R^T|) / 2 (eq. 12-14) and edits only those channels (eq. 15).

Where we depart from the paper, and why:
- F' is the exact derivative of F, computed in the forward pass, not the finite difference of
  eq. 3 (same quantity, no step size to tune). F's three layers have positive weights, so F is
  monotone by construction; l_mon (eq. 4) still holds the slope above nu, on the samples and on
  a grid spanning them.
- F learns from l_mon + l_lik only; l_den trains C and Gamma against a frozen view of F. Letting
  l_den move F lets it flatten the density to make every walk "density preserving".
- C's output is projected orthogonal to gamma (see `correction_vector`): the stride stays the
  distance travelled along the direction, and C cannot meet l_den by walking back. l_var
  trains Gamma only; C learns from l_den (in eq. 11 l_var also rewards C for moving anywhere).
- l_var is divided by the mean squared norm of G1's features at the start (and the decorrelation
  term by its square), so that zeta and lambda mean the same on every generator and layer; the
  stored Gamma is the nearest orthonormal matrix (polar factor) of the trained one, and the
  orthogonality error before that projection is reported.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from latentedit.attributes import Attribute

# ---- the density module F (eq. 3-5) -------------------------------------------------------


class DensityModule(nn.Module):
    """Per-dimension CDFs F_i: R -> (0, 1), each a 3-layer MLP; d small MLPs run as one batched op.

    `log_density(x)` is sum_i log F_i'(x_i): the paper assumes independent dimensions."""

    loc: torch.Tensor
    scale: torch.Tensor

    def __init__(self, dim: int, hidden: int = 32) -> None:
        super().__init__()
        self.dim, self.hidden = dim, hidden
        scale = 1.0 / math.sqrt(hidden)
        # Raw weights; the forward pass uses softplus(raw) > 0 (see cdf_and_density).
        self.w1 = nn.Parameter(torch.randn(dim, hidden) * 0.5 + 0.5)
        self.b1 = nn.Parameter(torch.linspace(-3, 3, hidden).repeat(dim, 1))
        self.w2 = nn.Parameter(torch.randn(dim, hidden, hidden) * scale - 2.0)
        self.b2 = nn.Parameter(torch.zeros(dim, hidden))
        self.w3 = nn.Parameter(torch.randn(dim, hidden) * scale - 1.0)
        self.b3 = nn.Parameter(torch.zeros(dim))
        # Inputs are standardised per dimension with the training data's statistics.
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def fit_standardisation(self, x: torch.Tensor) -> None:
        self.loc.copy_(x.mean(0))
        self.scale.copy_(x.std(0).clamp_min(1e-6))

    def cdf_and_density(self, x: torch.Tensor, frozen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, d] -> (F(x) [N, d] in (0, 1), F'(x) [N, d]), the derivative carried forward exactly.

        `frozen`: gradients flow to x but not to F's parameters."""
        w1, b1, w2, b2, w3, b3 = (p.detach() if frozen else p for p in (self.w1, self.b1, self.w2, self.b2, self.w3, self.b3))
        # Positive weights and increasing activations make F monotone by construction: a hinge
        # on sample points alone (eq. 4) lets F fall between the modes of a mixture and count
        # each mode's mass twice. l_mon still keeps the slope above nu.
        w1, w2, w3 = nn.functional.softplus(w1), nn.functional.softplus(w2), nn.functional.softplus(w3)
        u = (x - self.loc) / self.scale
        h1 = torch.tanh(u[..., None] * w1 + b1)  # [N, d, h]
        dh1 = (1 - h1**2) * w1
        h2 = torch.tanh(torch.einsum("ndh,dhk->ndk", h1, w2) + b2)
        dh2 = (1 - h2**2) * torch.einsum("ndh,dhk->ndk", dh1, w2)
        cdf = torch.sigmoid((h2 * w3).sum(-1) + b3)
        return cdf, cdf * (1 - cdf) * (dh2 * w3).sum(-1) / self.scale

    def log_density(self, x: torch.Tensor, frozen: bool = False, floor: float = 1e-12) -> torch.Tensor:
        """sum_i log F_i'(x_i) [N]; slopes below `floor` (non-monotone spots) count as `floor`."""
        _, density = self.cdf_and_density(x, frozen)
        return torch.log(density.clamp_min(floor)).sum(-1)


def density_losses(module: DensityModule, x: torch.Tensor, min_slope: float, grid: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(l_mon, l_lik) of eq. 4 and 5 on a batch x [N, d] (means over the batch of sums over dims).

    `grid` [G, d]: extra points where only monotonicity is enforced (between and around samples)."""
    _, density = module.cdf_and_density(x)
    monotone = torch.relu(min_slope - density).sum(-1).mean()
    if grid is not None:
        _, grid_density = module.cdf_and_density(grid)
        monotone = monotone + torch.relu(min_slope - grid_density).sum(-1).mean()
    likelihood = -torch.log(density.clamp_min(1e-12)).sum(-1).mean()
    return monotone, likelihood


def density_grid(x: torch.Tensor, points: int = 64, margin: float = 0.1) -> torch.Tensor:
    """[points, d]: per dimension, evenly spaced values over the data's range widened by `margin`."""
    low, high = x.min(0).values, x.max(0).values
    pad = (high - low) * margin
    steps = torch.linspace(0, 1, points, dtype=x.dtype)[:, None]
    return low - pad + steps * (high - low + 2 * pad)


def fit_density(x: torch.Tensor, steps: int = 2000, hidden: int = 32, min_slope: float = 0.01, lr: float = 1e-2,
                batch: int = 512, seed: int = 0) -> DensityModule:
    """F trained alone on samples x [N, d] (used by tests and by jobs that need only F)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = DensityModule(x.shape[1], hidden)
    module.fit_standardisation(x)
    grid = density_grid(x)
    optimiser = torch.optim.Adam(module.parameters(), lr=lr)
    for _ in range(steps):
        rows = x[torch.randint(len(x), (min(batch, len(x)),), generator=generator)]
        monotone, likelihood = density_losses(module, rows, min_slope, grid)
        optimiser.zero_grad()
        (monotone + likelihood).backward()
        optimiser.step()
    return module


# ---- walks (eq. 1, 2, 6) and the correction module C (eq. 6-7) -----------------------------


class CorrectionModule(nn.Module):
    """C(z0, eps, gamma) -> a correction vector: 6 fully connected layers, zero at initialisation."""

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        sizes = [2 * dim + 1, hidden, hidden, hidden, hidden, hidden, dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.LeakyReLU(0.2))
        self.net = nn.Sequential(*layers)
        last = self.net[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, z0: torch.Tensor, stride: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """z0 [N, d], stride [N], direction [N, d] or [d] -> correction [N, d]."""
        direction = direction.expand_as(z0)
        return self.net(torch.cat([z0, stride[:, None], direction], dim=1))


def linear_walk(z0: torch.Tensor, direction: torch.Tensor, stride: torch.Tensor) -> torch.Tensor:
    """Eq. 1: z0 + eps * gamma (z0 [N, d], direction [d] or [N, d], stride [N])."""
    return z0 + stride[:, None] * direction


def norm_preserving_walk(z0: torch.Tensor, direction: torch.Tensor, stride: torch.Tensor) -> torch.Tensor:
    """Eq. 2: the linear walk rescaled to the start's norm (N(0, I): density depends on the norm only)."""
    moved = linear_walk(z0, direction, stride)
    return moved * (z0.norm(dim=1, keepdim=True) / moved.norm(dim=1, keepdim=True).clamp_min(1e-12))


def correction_vector(z0: torch.Tensor, direction: torch.Tensor, stride: torch.Tensor, correction: CorrectionModule
                      ) -> torch.Tensor:
    """C(z0, eps, gamma) with its component along gamma removed.

    Without that projection C can satisfy l_den by undoing the walk; with it the walk always
    advances exactly eps along gamma and C only chooses where to stand across it."""
    unit = direction / direction.norm().clamp_min(1e-12)
    fix = correction(z0, stride, direction)
    return fix - (fix @ unit)[:, None] * unit


def corrected_walk(z0: torch.Tensor, direction: torch.Tensor, stride: torch.Tensor, correction: CorrectionModule
                   ) -> torch.Tensor:
    """Eq. 6: the linear walk plus the learned correction (kept orthogonal to gamma)."""
    return linear_walk(z0, direction, stride) + correction_vector(z0, direction, stride, correction)


def density_gap_loss(density: DensityModule, z0: torch.Tensor, walked: torch.Tensor) -> torch.Tensor:
    """l_den (eq. 7) for one direction: mean over the batch of (log p(z0) - log p(z_dp))^2.

    F is frozen here: l_den trains C and Gamma; F learns the density from l_mon and l_lik."""
    return ((density.log_density(z0, frozen=True) - density.log_density(walked, frozen=True)) ** 2).mean()


# ---- direction discovery: l_var (eq. 8-9) and l_reg (eq. 10) ------------------------------


def variation_terms(deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """deltas [k, N, C, ...] (feature changes per direction and sample) ->
    (sum_j ||Delta_j||_F^2, sum_{j != h} ||Delta_j^T Delta_h||_F^2), both averaged over samples.

    Each sample's Delta is the [positions, channels] matrix of eq. 12's layout (columns are
    flattened channels), so Delta_j^T Delta_h is the [C, C] cross-product of two feature changes.
    With fewer positions than channels it goes through position Gram matrices instead
    (||A^T B||^2 = <A A^T, B B^T>), which is the same number at a fraction of the cost."""
    k, n, c = deltas.shape[:3]
    matrices = deltas.reshape(k, n, c, -1).transpose(2, 3)  # [k, N, P, C]
    energy = (matrices**2).sum(dim=(2, 3)).sum(0).mean()
    if matrices.shape[2] <= c:
        grams = matrices @ matrices.transpose(2, 3)  # [k, N, P, P]
        pair = torch.einsum("jnab,hnab->jhn", grams, grams).mean(2)  # [k, k]
    else:  # one direction at a time keeps the [k, N, C, C] cross products in memory, not k^2 of them
        pair = torch.stack([
            (torch.einsum("npc,hnpd->hncd", matrices[j], matrices) ** 2).sum(dim=(2, 3)).mean(1) for j in range(k)])
    return energy, pair.sum() - pair.diagonal().sum()


def orthogonality_loss(gamma: torch.Tensor) -> torch.Tensor:
    """l_reg (eq. 10): ||Gamma^T Gamma - I||_F^2 for Gamma [d, k] (directions as columns)."""
    return ((gamma.T @ gamma - torch.eye(gamma.shape[1], dtype=gamma.dtype)) ** 2).sum()


def nearest_orthonormal(gamma: np.ndarray) -> np.ndarray:
    """The orthonormal-column matrix closest to gamma [d, k] in Frobenius norm (polar factor U V^T)."""
    u, _, vt = np.linalg.svd(gamma, full_matrices=False)
    return (u @ vt).astype(np.float32)


@dataclass(frozen=True)
class DiscoveryOptions:
    """The knobs of eq. 11 (defaults: the paper's values, except steps, batch and lr: see below)."""

    num_directions: int = 20
    max_stride: float = 10.0
    similarity_weight: float = 1e-3  # lambda (eq. 8)
    orthogonality_weight: float = 10.0  # zeta (eq. 11)
    min_slope: float = 0.01  # nu (eq. 4)
    learn_density: bool = False  # F and C even when the prior is N(0, I)
    # The paper runs 50,000 Adam steps at lr 1e-4 on a GPU; 2 CPU cores need far fewer, larger steps.
    steps: int = 600
    batch_size: int = 16
    learning_rate: float = 3e-3
    density_hidden: int = 32
    density_warmup_steps: int = 300
    correction_hidden: int = 256
    seed: int = 0


@dataclass
class Discovery:
    """What direction discovery learned: Gamma (rows: unit directions), and F and C when learned."""

    directions: np.ndarray  # [k, d], orthonormal rows
    density: DensityModule | None
    correction: CorrectionModule | None
    metrics: dict[str, float]


def discover_directions(features: Callable[[torch.Tensor], torch.Tensor], sample: Callable[[int, int], torch.Tensor],
                        dim: int, gaussian_prior: bool, options: DiscoveryOptions,
                        on_step: Callable[[int, dict[str, float]], None] | None = None) -> Discovery:
    """Eq. 11: learn Gamma (and F, C where the prior is unknown or `learn_density`).

    `features(z)` is G1 (differentiable, flat latents [N, d] -> features [N, C, ...]); `sample(n,
    seed)` draws flat latents [n, d] from the space's distribution; `on_step(step, losses)` may
    raise to stop (cancellation) and reports progress."""
    torch.manual_seed(options.seed)
    k = options.num_directions
    learned = options.learn_density or not gaussian_prior
    gamma = nn.Parameter(torch.linalg.qr(torch.randn(dim, k)).Q[:, :k].contiguous())
    parameters: list[nn.Parameter] = [gamma]
    density = correction = None
    if learned:
        reference = sample(4096, options.seed + 1)
        # F depends on nothing else in eq. 11, so it is warmed up alone first: C then learns
        # against a density that already means something. Joint training continues after.
        density = fit_density(reference, steps=options.density_warmup_steps, hidden=options.density_hidden,
                              min_slope=options.min_slope, seed=options.seed)
        correction = CorrectionModule(dim, options.correction_hidden)
        parameters += [*density.parameters(), *correction.parameters()]
        grid = density_grid(reference)
    with torch.no_grad():
        scale = float((features(sample(64, options.seed + 2)) ** 2).flatten(1).sum(1).mean())
    optimiser = torch.optim.Adam(parameters, lr=options.learning_rate)
    losses: dict[str, float] = {}
    for step in range(options.steps):
        z0 = sample(options.batch_size, options.seed + 1000 + step)
        strides = (torch.rand(k, len(z0)) * 2 - 1) * options.max_stride
        walked = []
        den_loss = torch.zeros(())
        for j in range(k):
            if learned:
                assert density is not None and correction is not None
                fix = correction_vector(z0, gamma[:, j], strides[j], correction)
                den_loss = den_loss + density_gap_loss(density, z0, linear_walk(z0, gamma[:, j], strides[j]) + fix)
                # l_var sees C's output as a constant: rewarding C for feature change would pay it
                # to wander off the iso-density surface it is there to find.
                z = linear_walk(z0, gamma[:, j], strides[j]) + fix.detach()
            else:
                z = norm_preserving_walk(z0, gamma[:, j], strides[j])
            walked.append(z)
        all_features = features(torch.cat([z0, *walked]))
        start, moved = all_features[: len(z0)], all_features[len(z0):].reshape(k, len(z0), *all_features.shape[1:])
        energy, similarity = variation_terms(start[None] - moved)
        l_var = -energy / scale + options.similarity_weight * similarity / scale**2
        l_reg = orthogonality_loss(gamma)
        loss = l_var + options.orthogonality_weight * l_reg
        losses = {"variation": float(-energy.detach() / scale), "similarity": float(similarity.detach() / scale**2),
                  "orthogonality": float(l_reg.detach())}
        if learned:
            assert density is not None
            l_mon, l_lik = density_losses(density, z0.detach(), options.min_slope, grid)
            loss = loss + l_mon + l_lik + den_loss
            losses.update(monotonicity=float(l_mon.detach()), likelihood=float(l_lik.detach()),
                          density_gap=float(den_loss.detach()) / k)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if on_step is not None:
            on_step(step, losses)
    raw = gamma.detach().numpy()
    directions = nearest_orthonormal(raw).T
    if learned:
        assert density is not None and correction is not None
        density.eval()
        correction.eval()
    metrics = {f"final_{name}": value for name, value in losses.items()}
    metrics["orthogonality_error"] = float(np.abs(raw.T @ raw - np.eye(k)).max())
    return Discovery(directions, density, correction, metrics)


# ---- subspace refinement (section 3.3, eq. 12-15) -----------------------------------------


def self_expressive_coefficients(features: np.ndarray, sparsity: float) -> np.ndarray:
    """R [C, C] minimising ||M - M R||_F^2 + eta ||R||_1 with diag(R) = 0 (eq. 13).

    `features` [N, C, ...] -> M [N * positions, C] (columns: flattened channels). Each column of R
    is one Lasso fit of a channel on all the others (scikit-learn; its objective divides the
    squared error by 2n, so alpha = eta / 2n)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Lasso

    n, c = features.shape[:2]
    matrix = np.moveaxis(features.reshape(n, c, -1), 1, 2).reshape(-1, c).astype(np.float64)
    coefficients = np.zeros((c, c))
    lasso = Lasso(alpha=sparsity / (2 * len(matrix)), fit_intercept=False, max_iter=2000, tol=1e-4)
    with warnings.catch_warnings():
        # Channels that are exact combinations of others converge slowly; the answer is still usable.
        warnings.simplefilter("ignore", ConvergenceWarning)
        for channel in range(c):
            others = np.delete(np.arange(c), channel)
            lasso.fit(matrix[:, others], matrix[:, channel])
            coefficients[others, channel] = lasso.coef_
    return coefficients


def channel_subspaces(coefficients: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Spectral clustering of the channels on the affinity (|R| + |R^T|) / 2 (eq. 14) -> labels [C]."""
    from sklearn.cluster import SpectralClustering

    affinity = (np.abs(coefficients) + np.abs(coefficients.T)) / 2
    affinity = affinity + 1e-9  # isolated channels would leave the graph disconnected
    return SpectralClustering(count, affinity="precomputed", random_state=seed).fit_predict(affinity)


def largest_subspace(labels: np.ndarray) -> np.ndarray:
    """The binary channel mask m* of the largest cluster [C] (eq. 15)."""
    values, counts = np.unique(labels, return_counts=True)
    return labels == values[np.argmax(counts)]


def mix_features(start: np.ndarray, walked: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Eq. 15's G2 input: masked channels from the walked features, the rest from the start's.

    Also the paper's feature exchange between two images on one subspace (start = image B,
    walked = image A)."""
    keep = mask.reshape(1, -1, *([1] * (start.ndim - 2))).astype(start.dtype)
    return keep * walked + (1 - keep) * start


# ---- naming what was found ------------------------------------------------------------------


@dataclass(frozen=True)
class DirectionName:
    """How strongly walking along a direction moves one attribute (over seeds and strides)."""

    index: int
    attribute: Attribute
    correlation: float  # Pearson, stride vs attribute change from the start
    slope: float  # attribute change per unit stride (least squares)

    def summary(self) -> str:
        return f"{self.attribute.name} {self.correlation:+.2f}"


def name_direction(index: int, strides: np.ndarray, values: dict[Attribute, np.ndarray], top: int = 3
                   ) -> list[DirectionName]:
    """strides [S], values {attribute: [N, S] (per start, per stride)} -> the `top` attributes by
    |correlation| between the stride and the change of the attribute from the start (stride 0)."""
    names = []
    zero = int(np.argmin(np.abs(strides)))
    for attribute, table in values.items():
        change = (table - table[:, zero : zero + 1]).reshape(-1)
        x = np.broadcast_to(strides, table.shape).reshape(-1)
        if change.std() < 1e-12:
            continue
        correlation = float(np.corrcoef(x, change)[0, 1])
        slope = float((x * change).sum() / (x * x).sum())
        names.append(DirectionName(index, attribute, correlation, slope))
    return sorted(names, key=lambda n: -abs(n.correlation))[:top]

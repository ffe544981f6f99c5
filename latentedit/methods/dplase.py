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
- l_var is divided by the mean squared feature change of one walk with the initial Gamma (and
  the decorrelation term by its square), so that lambda means the same on every generator,
  layer and stride range. Even so l_var's reward grows as directions find large changes (55x
  on the DCGAN) and the soft l_reg (zeta = 10) lost: directions drifted 0.73 from orthonormal,
  towards each other. So Gamma is also projected back to the nearest orthonormal matrix (polar
  factor) after every step; l_reg stays in the loss and the per-step drift is reported.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from latentedit.artifacts import DIRECTIONS_KIND, load_tensors, resolve_trained, tensors_writer
from latentedit.attributes import Attribute
from latentedit.config import EditorConfig
from latentedit.errors import FailedPrecondition, InvalidArgument
from latentedit.latents import Latents
from latentedit.limits import LIMITS, check_range
from latentedit.methods.base import (
    Editable,
    Frame,
    FrameRequest,
    JobBasics,
    Method,
    Progress,
    Trained,
    batch_seed,
    check_distances,
    check_finite,
    check_frames,
    job_basics,
    path_frames,
)
from latentedit.models.generator import INPUT_LAYER
from latentedit.repository import Entry, ModelRepository
from latentedit.world import GeneratorInfo, World

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
    Where it is cheaper it goes through position Gram matrices instead (||A^T B||^2 =
    <A A^T, B B^T>): the same number at a fraction of the cost."""
    k, n, c = deltas.shape[:3]
    matrices = deltas.reshape(k, n, c, -1).transpose(2, 3)  # [k, N, P, C]
    energy = (matrices**2).sum(dim=(2, 3)).sum(0).mean()
    positions = matrices.shape[2]
    # Gram route: k*N*P^2*C + k^2*N*P^2 multiply-adds; direct cross products: k^2*N*P*C^2.
    if k * positions * positions * (c + k) <= k * k * positions * c * c:
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
    # C for the final, orthonormal Gamma: these steps need neither G nor Gamma's gradients, so
    # they are cheap and C gets far more of them than the joint phase can afford.
    correction_steps: int = 2000
    correction_hidden: int = 256
    seed: int = 0


@dataclass
class Discovery:
    """What direction discovery learned: Gamma (rows: unit directions), and F and C when learned."""

    directions: np.ndarray  # [k, d], orthonormal rows
    density: DensityModule | None
    correction: CorrectionModule | None
    metrics: dict[str, float]


def fit_correction(correction: CorrectionModule, density: DensityModule, directions: torch.Tensor,
                   sample: Callable[[int, int], torch.Tensor], options: DiscoveryOptions) -> float:
    """Train C alone on l_den for fixed unit directions [k, d] (F frozen); returns the last gap."""
    optimiser = torch.optim.Adam(correction.parameters(), lr=options.learning_rate)
    gap = torch.zeros(())
    k = len(directions)
    for step in range(options.correction_steps):
        z0 = sample(options.batch_size * 4, options.seed + 500_000 + step)
        index = torch.randint(k, (len(z0),), generator=torch.Generator().manual_seed(step))
        chosen = directions[index]
        strides = (torch.rand(len(z0)) * 2 - 1) * options.max_stride
        fix = correction(z0, strides, chosen)
        fix = fix - (fix * chosen).sum(1, keepdim=True) * chosen  # orthogonal to each row's direction
        gap = density_gap_loss(density, z0, z0 + strides[:, None] * chosen + fix)
        optimiser.zero_grad()
        gap.backward()
        optimiser.step()
    return float(gap.detach())


def discover_directions(features: Callable[[torch.Tensor], torch.Tensor], sample: Callable[[int, int], torch.Tensor],
                        dim: int, gaussian_prior: bool, options: DiscoveryOptions,
                        on_step: Callable[[int, dict[str, float]], None] | None = None,
                        density_weight: float = 1.0) -> Discovery:
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
        # l_var's unit: the feature change of one walk with the initial Gamma, so that l_var starts
        # near -k whatever the generator, layer and stride range, and zeta keeps its meaning.
        probe = sample(32, options.seed + 2)
        probe_strides = (torch.rand(len(probe), generator=torch.Generator().manual_seed(options.seed)) * 2 - 1)
        walked_probe = torch.cat([linear_walk(probe, gamma[:, j], probe_strides * options.max_stride) for j in range(k)])
        changes = features(walked_probe).reshape(k, len(probe), -1) - features(probe).reshape(1, len(probe), -1)
        scale = float((changes**2).sum(-1).mean()) or 1.0
    optimiser = torch.optim.Adam(parameters, lr=options.learning_rate)
    losses: dict[str, float] = {}
    largest_drift = 0.0
    for step in range(options.steps):
        z0 = sample(options.batch_size, options.seed + 1000 + step)
        strides = (torch.rand(k, len(z0)) * 2 - 1) * options.max_stride
        walked = []
        den_loss = torch.zeros(())
        # Walks use unit directions, as edits do: the stride is the distance travelled, and
        # l_den cannot shorten walks by shrinking Gamma (l_reg alone shapes its norms).
        units = gamma / gamma.norm(dim=0, keepdim=True).clamp_min(1e-12)
        for j in range(k):
            if learned:
                assert density is not None and correction is not None
                fix = correction_vector(z0, units[:, j], strides[j], correction)
                den_loss = den_loss + density_gap_loss(density, z0, linear_walk(z0, units[:, j], strides[j]) + fix)
                # l_var sees C's output as a constant: rewarding C for feature change would pay it
                # to wander off the iso-density surface it is there to find.
                z = linear_walk(z0, units[:, j], strides[j]) + fix.detach()
            else:
                z = norm_preserving_walk(z0, units[:, j], strides[j])
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
            loss = loss + density_weight * (l_mon + l_lik + den_loss)
            losses.update(monotonicity=float(l_mon.detach()), likelihood=float(l_lik.detach()),
                          density_gap=float(den_loss.detach()) / k)
        optimiser.zero_grad()
        loss.backward()
        with torch.no_grad():
            # Riemannian gradient on the orthonormal matrices: without it every column is pulled
            # towards the top direction, the projection below undoes most of each step, and Adam's
            # moments fill with that wasted component (the third of three planted axes was missed).
            assert gamma.grad is not None
            grad = gamma.grad
            grad.sub_(gamma @ ((gamma.T @ grad + grad.T @ gamma) / 2))
        optimiser.step()
        with torch.no_grad():
            # Back onto the orthonormal matrices after every step: the soft l_reg alone loses to
            # l_var, whose reward grows as the directions find large changes (see the docstring).
            drift = float((gamma.T @ gamma - torch.eye(k)).abs().max())
            gamma.copy_(torch.from_numpy(nearest_orthonormal(gamma.numpy())))
        losses["orthogonality_drift"] = drift
        largest_drift = max(largest_drift, drift)
        if on_step is not None:
            on_step(step, losses)
    raw = gamma.detach().numpy()
    directions = nearest_orthonormal(raw).T
    if learned:
        assert density is not None and correction is not None
        losses["density_gap"] = fit_correction(correction, density, torch.from_numpy(directions), sample, options)
        density.eval()
        correction.eval()
    metrics = {f"final_{name}": value for name, value in losses.items()}
    # The stored Gamma's distance from orthonormal (float precision), and how far one optimiser step
    # ever pushed it off before the projection (how hard l_var pulls the directions together).
    metrics["orthogonality_error"] = float(np.abs(directions @ directions.T - np.eye(k)).max())
    metrics["max_orthogonality_drift"] = largest_drift
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
    # Coordinate descent on the [C, C] Gram matrix instead of the [N * positions, C] data: the same
    # fit (to 1e-12), about 20x faster when positions outnumber channels (2048 x 128 at block3).
    gram = matrix.T @ matrix
    with warnings.catch_warnings():
        # Channels that are exact combinations of others converge slowly; the answer is still usable.
        warnings.simplefilter("ignore", ConvergenceWarning)
        for channel in range(c):
            others = np.delete(np.arange(c), channel)
            lasso = Lasso(alpha=sparsity / (2 * len(matrix)), fit_intercept=False, max_iter=2000, tol=1e-4,
                          precompute=gram[np.ix_(others, others)])
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


# ---- the method plug-in -----------------------------------------------------------------------


@dataclass(frozen=True)
class DirectionSpec:
    """A direction job: where to split G, how to train (eq. 11), refinement and naming."""

    basics: JobBasics
    layer: str
    space: str
    discovery: DiscoveryOptions
    density_weight: float = 1.0  # on l_mon + l_lik + l_den (1 in eq. 11)
    num_channel_subspaces: int = 4  # 0: no refinement
    sparsity_weight: float = 0.5  # eta (eq. 13)
    subspace_samples: int = 8  # walked samples whose features R is fitted on, per direction
    naming_samples: int = 8  # starts per direction scored at each naming stride (-s, 0, s)


@dataclass(frozen=True)
class DPLaSEOptions:
    directions: str
    direction_index: int = 0
    start_stride: float = -3.0
    end_stride: float = 3.0
    density_preserving: bool = False
    subspace_refinement: bool = False
    num_frames: int = 8


@dataclass
class DirectionArtifact:
    """A loaded directions artifact: Gamma, and F, C and the channel masks when it has them."""

    directions: np.ndarray  # [k, size]
    space: str
    layer: str
    gaussian_prior: bool
    density: DensityModule | None = None
    correction: CorrectionModule | None = None
    masks: np.ndarray | None = None  # [k, C] bool
    names: tuple[DirectionName, ...] = ()


def walk(artifact: DirectionArtifact, start: np.ndarray, index: int, stride: float, density_preserving: bool
         ) -> np.ndarray:
    """Flat latents [N, d] after a walk of `stride` along direction `index` (eq. 1, 2 or 6)."""
    z0 = torch.from_numpy(np.ascontiguousarray(start, np.float32))
    direction = torch.from_numpy(artifact.directions[index])
    strides = torch.full((len(z0),), float(stride))
    with torch.no_grad():
        if not density_preserving:
            return linear_walk(z0, direction, strides).numpy()
        if artifact.gaussian_prior:
            return norm_preserving_walk(z0, direction, strides).numpy()
        assert artifact.correction is not None
        return corrected_walk(z0, direction, strides, artifact.correction).numpy()


class DPLaSE(Method):
    name = "dplase"
    title = "DP-LaSE density-preserving directions"
    artifact_kind = DIRECTIONS_KIND
    jobs = ("directions",)

    # ---- editing ------------------------------------------------------------------------

    def edit_options(self, message, num_frames: int, limits: EditorConfig) -> DPLaSEOptions:
        check_distances(start_stride=message.start_stride, end_stride=message.end_stride)
        if message.direction_index < 0:
            raise InvalidArgument(f"direction_index {message.direction_index} must be >= 0")
        if message.HasField("rows"):
            raise InvalidArgument("rows: DP-LaSE walks move the whole latent (its density is over all of it); "
                                  "leave rows unset")
        return DPLaSEOptions(message.directions, message.direction_index, message.start_stride, message.end_stride,
                             message.density_preserving, message.subspace_refinement, check_frames(num_frames, limits))

    def prepare(self, repo: ModelRepository, generator: GeneratorInfo, options: DPLaSEOptions) -> DirectionArtifact:
        entry = resolve_trained(repo, DIRECTIONS_KIND, "DP-LaSE directions", options.directions,
                                generator=generator.name)
        artifact = load_directions(entry)
        count = len(artifact.directions)
        if not 0 <= options.direction_index < count:
            raise InvalidArgument(f"direction_index {options.direction_index} is out of range: {options.directions!r} "
                                  f"has {count} directions (0..{count - 1})")
        space = generator.space(artifact.space)
        if space.size != artifact.directions.shape[1]:
            raise FailedPrecondition(f"{options.directions!r} holds directions of {artifact.directions.shape[1]} values; "
                                     f"{generator.name}'s {space.space} has {space.size}")
        if options.density_preserving and not artifact.gaussian_prior and artifact.correction is None:
            raise FailedPrecondition(f"{options.directions!r} was trained without the density module F and the "
                                     "correction C, which walks in a space without a known prior need; retrain it "
                                     "with learn_density")
        if options.subspace_refinement and artifact.masks is None:
            raise FailedPrecondition(f"{options.directions!r} has no channel subspaces; retrain it with "
                                     "num_channel_subspaces > 0")
        generator.spec.layer_index(artifact.layer)
        return artifact

    def edit(self, world: World, generator: GeneratorInfo, artifact: DirectionArtifact, start: Latents,
             options: DPLaSEOptions, frames: FrameRequest) -> Iterator[Frame]:
        strides = np.linspace(options.start_stride, options.end_stride, options.num_frames)
        flat = start.flat()
        start_density = self._log_density(artifact, flat)
        synthesize: Callable[[Latents], np.ndarray] | None = None
        if options.subspace_refinement:
            assert artifact.masks is not None
            mask = artifact.masks[options.direction_index]
            start_features = world.features(generator, start, [artifact.layer])[artifact.layer]

            def refined(latents: Latents) -> np.ndarray:
                # Eq. 15 on any whole number of frames: the start's features repeated once per frame.
                walked = world.features(generator, latents, [artifact.layer])[artifact.layer]
                starts = np.tile(start_features, (len(latents) // len(start), *([1] * (start_features.ndim - 1))))
                return world.synthesize_from(generator, artifact.layer, mix_features(starts, walked, mask))

            synthesize = refined

        def path() -> Iterator[tuple[Latents, dict[str, float]]]:
            for stride in strides:
                latents = start.replace(walk(artifact, flat, options.direction_index, stride, options.density_preserving))
                metrics = {"stride": float(stride)}
                if start_density is not None:
                    metrics["log_density_change"] = float(np.mean(self._log_density(artifact, latents.flat()) - start_density))
                yield latents, metrics

        return path_frames(world, generator, path(), frames, options.num_frames, synthesize)

    @staticmethod
    def _log_density(artifact: DirectionArtifact, flat: np.ndarray) -> np.ndarray | None:
        if artifact.density is None:
            return None
        with torch.no_grad():
            return artifact.density.log_density(torch.from_numpy(np.ascontiguousarray(flat, np.float32))).numpy()

    # ---- training -----------------------------------------------------------------------

    def job_spec(self, kind: str, message, world: World, repo: ModelRepository) -> DirectionSpec:
        from latentedit.wire import space_name

        if kind != "directions":
            return super().job_spec(kind, message, world, repo)
        check_finite(similarity_weight=message.similarity_weight, orthogonality_weight=message.orthogonality_weight,
                     density_weight=message.density_weight, max_stride=message.max_stride,
                     sparsity_weight=message.sparsity_weight)
        basics = job_basics(world, message.generator, message.options,
                            lambda g: f"{g.name}-dplase-{message.layer or default_layer(g)}", default_batch=16)
        layers = [layer.name for layer in basics.generator.spec.layers[1:-1]]
        layer = message.layer or default_layer(basics.generator)
        basics.generator.spec.layer_index(layer)  # NOT_FOUND names the layers
        if layer not in layers:
            raise InvalidArgument(f"layer {layer!r}: G1/G2 must split at an intermediate layer; layers: {', '.join(layers)}")
        space = basics.generator.space(space_name(message.space))
        defaults = DiscoveryOptions()
        directions = message.num_directions or defaults.num_directions
        check_range(directions, "num_directions", 1, min(space.size, LIMITS.directions), "directions")
        for field_name in ("similarity_weight", "orthogonality_weight", "density_weight", "max_stride", "sparsity_weight"):
            if getattr(message, field_name) < 0:
                raise InvalidArgument(f"{field_name} {getattr(message, field_name)} must be >= 0 (0: the default)")
            if field_name == "max_stride":
                check_range(message.max_stride, "max_stride", 0, LIMITS.edit_distance, "edit_distance")
            else:
                check_range(getattr(message, field_name), field_name, 0, LIMITS.weight_max, "weight_max")
        steps = message.options.steps or defaults.steps
        check_range(steps, "options.steps", 1, LIMITS.training_steps, "training_steps")
        check_finite(learning_rate=message.options.learning_rate)
        if message.options.learning_rate < 0:
            raise InvalidArgument(f"options.learning_rate {message.options.learning_rate} must be >= 0 (0: the default)")
        subspaces = message.num_channel_subspaces
        channels = basics.generator.spec.layers[basics.generator.spec.layer_index(layer)].shape[0]
        if not 0 <= subspaces <= channels:
            raise InvalidArgument(f"num_channel_subspaces {subspaces} must be in 0..{channels} (0: no refinement)")
        samples = message.num_samples or DirectionSpec.naming_samples
        check_range(samples, "num_samples (starts per direction used to name it)", 2, LIMITS.naming_samples, "naming_samples")
        discovery = DiscoveryOptions(
            num_directions=directions, max_stride=message.max_stride or defaults.max_stride,
            similarity_weight=message.similarity_weight or defaults.similarity_weight,
            orthogonality_weight=message.orthogonality_weight or defaults.orthogonality_weight,
            learn_density=message.learn_density, steps=steps, batch_size=basics.batch_size, seed=basics.seed,
            learning_rate=message.options.learning_rate or defaults.learning_rate)
        return DirectionSpec(basics, layer, space.space, discovery, message.density_weight or 1.0, subspaces,
                             message.sparsity_weight or DirectionSpec.sparsity_weight, naming_samples=samples)

    def train(self, world: World, spec: DirectionSpec, progress: Progress) -> Trained:
        b = spec.basics
        space = b.generator.space(spec.space)
        model = world.generator_module(b.generator)
        layer = spec.layer

        def features(flat: torch.Tensor) -> torch.Tensor:
            x = model.latents_to_input(flat.reshape(len(flat), *space.shape), space.space)
            return model.run(x, INPUT_LAYER, [layer])[layer]

        def sample(count: int, seed: int) -> torch.Tensor:
            return torch.from_numpy(model.sample(space, count, seed).reshape(count, -1))

        for parameter in model.parameters():
            parameter.requires_grad_(False)
        steps = spec.discovery.steps

        def on_step(step: int, losses: dict[str, float]) -> None:
            progress.check()
            if step % 10 == 0 or step == steps - 1:
                progress.report("learning directions", 0.75 * (step + 1) / steps, losses)

        found = discover_directions(features, sample, space.size, space.prior == "normal", spec.discovery, on_step,
                                    density_weight=spec.density_weight)
        artifact = DirectionArtifact(found.directions, space.space, layer, space.prior == "normal" and not
                                     spec.discovery.learn_density, found.density, found.correction)
        if spec.num_channel_subspaces:
            artifact.masks = self._subspaces(world, b, spec, artifact, progress)
        artifact.names = self._names(world, b, spec, artifact, progress)
        metrics = {**found.metrics, "num_directions": float(len(found.directions)),
                   "named_above_0.5": float(sum(1 for n in artifact.names if abs(n.correlation) > 0.5 and
                                               n == _best(artifact.names, n.index)))}
        progress.report("writing the directions", 0.98, metrics)
        return Trained(DIRECTIONS_KIND, b.name, b.generator, space.space, metrics, {"directions": "directions.safetensors"},
                       tensors_writer("directions.safetensors", directions_tensors(artifact)),
                       {"layer": layer, "gaussian_prior": artifact.gaussian_prior,
                        "density_hidden": spec.discovery.density_hidden,
                        "correction_hidden": spec.discovery.correction_hidden,
                        "names": [_name_to_dict(n) for n in artifact.names]}, artifact)

    def _subspaces(self, world: World, b: JobBasics, spec: DirectionSpec, artifact: DirectionArtifact,
                   progress: Progress) -> np.ndarray:
        rng = np.random.default_rng(b.seed)
        masks = []
        count = len(artifact.directions)
        for index in range(count):
            progress.check()
            start = world.sample(b.generator, spec.subspace_samples, batch_seed(b.seed, 10_000 + index), spec.space)
            strides = rng.uniform(-spec.discovery.max_stride, spec.discovery.max_stride, len(start))
            walked = np.concatenate([walk(artifact, start.flat()[i:i + 1], index, s, True) for i, s in enumerate(strides)])
            feats = world.features(b.generator, start.replace(walked), [spec.layer])[spec.layer]
            labels = channel_subspaces(self_expressive_coefficients(feats, spec.sparsity_weight),
                                       spec.num_channel_subspaces, b.seed)
            masks.append(largest_subspace(labels))
            progress.report("refining channel subspaces", 0.75 + 0.1 * (index + 1) / count)
        return np.stack(masks)

    def _names(self, world: World, b: JobBasics, spec: DirectionSpec, artifact: DirectionArtifact,
               progress: Progress) -> tuple[DirectionName, ...]:
        attributes = scalar_attributes(world.heads())
        if not attributes:
            return ()
        heads = sorted({a.head for a in attributes})
        reach = min(spec.discovery.max_stride, 3.0)
        strides = np.array([-reach, 0.0, reach])  # every scorer head runs on each: naming costs 3 * samples * k images
        names: list[DirectionName] = []
        count = len(artifact.directions)
        for index in range(count):
            progress.check()
            start = world.sample(b.generator, spec.naming_samples, batch_seed(b.seed, 20_000 + index), spec.space)
            values: dict[Attribute, list[np.ndarray]] = {a: [] for a in attributes}
            for stride in strides:
                latents = start.replace(walk(artifact, start.flat(), index, stride, True))
                scores = world.score(world.synthesize(b.generator, latents), heads)
                for attribute in attributes:
                    values[attribute].append(attribute.extract(scores))
            names += name_direction(index, strides, {a: np.stack(v, axis=1) for a, v in values.items()})
            progress.report("naming directions with the scorer", 0.85 + 0.12 * (index + 1) / count)
        return tuple(names)

    # ---- listing ------------------------------------------------------------------------

    def describe(self, entry: Entry) -> Editable:
        editable = super().describe(entry)
        names = tuple(_name_from_dict(n) for n in entry.manifest.get("names", []))
        return Editable(**{**editable.__dict__, "num_directions": int(editable.metrics.get("num_directions", 0)),
                           "direction_names": names})


def default_layer(generator: GeneratorInfo) -> str:
    """The paper's split: the third intermediate layer (or the last one a shorter generator has)."""
    intermediate = [layer.name for layer in generator.spec.layers[1:-1]]
    return intermediate[min(2, len(intermediate) - 1)]


def scalar_attributes(heads) -> list[Attribute]:
    """Every scalar a scorer offers to name directions by: scalar outputs and labelled entries."""
    found = []
    for head in heads:
        for output in head.outputs:
            shape = list(output.shape)
            if not shape:
                found.append(Attribute(head.name, output.name, None))
            elif len(shape) == 1 and output.labels and len(output.labels) == shape[0]:
                found += [Attribute(head.name, output.name, i, label) for i, label in enumerate(output.labels)]
    return found


def _best(names: tuple[DirectionName, ...], index: int) -> DirectionName | None:
    mine = [n for n in names if n.index == index]
    return max(mine, key=lambda n: abs(n.correlation)) if mine else None


def _name_to_dict(name: DirectionName) -> dict:
    return {"index": name.index, "attribute": name.attribute.to_dict(), "correlation": name.correlation,
            "slope": name.slope}


def _name_from_dict(data: dict) -> DirectionName:
    return DirectionName(int(data["index"]), Attribute.from_dict(data["attribute"]), float(data["correlation"]),
                         float(data["slope"]))


def directions_tensors(artifact: DirectionArtifact) -> dict[str, torch.Tensor | np.ndarray]:
    tensors: dict[str, torch.Tensor | np.ndarray] = {"directions": artifact.directions}
    if artifact.masks is not None:
        tensors["subspace_masks"] = artifact.masks.astype(np.uint8)
    for prefix, module in (("density.", artifact.density), ("correction.", artifact.correction)):
        if module is not None:
            tensors.update({prefix + k: v for k, v in module.state_dict().items()})
    return tensors


def load_directions(entry: Entry) -> DirectionArtifact:
    tensors = load_tensors(entry, "directions")
    manifest = entry.manifest
    directions = tensors["directions"].numpy()
    artifact = DirectionArtifact(directions, manifest.get("space", "z"), manifest["layer"],
                                 bool(manifest.get("gaussian_prior", True)),
                                 names=tuple(_name_from_dict(n) for n in manifest.get("names", [])))
    if "subspace_masks" in tensors:
        artifact.masks = tensors["subspace_masks"].numpy().astype(bool)
    dim = directions.shape[1]
    if any(k.startswith("density.") for k in tensors):
        density = DensityModule(dim, int(manifest.get("density_hidden", 32)))
        density.load_state_dict({k[len("density."):]: v for k, v in tensors.items() if k.startswith("density.")})
        artifact.density = density.eval()
    if any(k.startswith("correction.") for k in tensors):
        correction = CorrectionModule(dim, int(manifest.get("correction_hidden", 256)))
        correction.load_state_dict({k[len("correction."):]: v for k, v in tensors.items() if k.startswith("correction.")})
        artifact.correction = correction.eval()
    return artifact

"""W* (Hajjar et al.): a RealNVP proxy space where attributes separate linearly and distance
follows perception; edits happen there and map back exactly through T^-1.

T is a RealNVP flow (affine couplings, no batch normalisation) from a generator's latent
space (Z, W or W+: the space is a parameter) to a proxy space of the same shape. It is trained
with (eq. 3 and 5 of the paper)

    L = L_a + lambda_d L_d + lambda_ID L_ID

- L_a (eq. 2, `attribute_loss`): one frozen single-layer linear classifier per attribute,
  pretrained in the ORIGINAL space on scorer labels, applied to T(z); BCE summed over the
  attributes. Only T learns: it must move the samples to the correct side of hyperplanes that
  were fitted before it existed (which is why there is no batch normalisation in T).
- L_d (eq. 1, `distance_loss`): (D_latent(T(z_i), T(z_j)) - s D_perceptual(G(z_i), G(z_j)))^2
  over the pairs of a batch. D_latent is the mean squared difference (the supplement's "MSE");
  D_perceptual is `latentedit.perceptual`. The paper multiplies the perceptual distance by 10 "to
  be in the same scale as the latent distance"; we make that factor explicit and data-driven:
  s = mean D_latent / mean D_perceptual over the training pairs in the original space
  (`perceptual_scale`), stored in the artifact with the distance's definition.
- L_ID (eq. 4, `identity_loss`): ||F(G(z)) - F(G(T^-1(T(z) + eps)))||^2 with eps ~ N(0, sigma^2 I)
  and F a differentiable face descriptor (any callable images [N, 3, H, W] in [0, 1] -> [N, 128]).
  The paper uses sigma = 1 in W+ (18 x 512 values); on the DCGAN's Z (100 values, |z| ~ 10) a
  unit-variance perturbation is as large as the latent itself, so sigma defaults to 0.3.

Departures, and why:
- The couplings' last layers start at zero, so T starts as the identity and the frozen
  classifiers start exactly where they were fitted (the paper's motivation for freezing them).
- Labels are binary by the median score of each attribute (threshold protocol), over all
  samples: L_a needs a label for every training sample, not only the top and bottom few percent.
- L_d pairs come from fixed blocks of `pair_block` samples whose perceptual distances are
  computed once while sampling (the images are not kept); each step trains on a few blocks.
- Edits move along the unit normal of the attribute's frozen classifier in the proxy space
  (conditional editing projects the condition attributes' normals out, as InterFaceGAN does);
  InterFaceGAN boundaries (linear SVM on the top / bottom of T(z) by score) are also fitted in
  the proxy space at the end of training and stored, so an edit can use those instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from latentedit.artifacts import load_tensors, resolve_trained, tensors_writer
from latentedit.attributes import Attribute
from latentedit.config import EditorConfig
from latentedit.errors import FailedPrecondition, InvalidArgument, NotFound
from latentedit.latents import Latents, LatentSpaceSpec, RowRange, move
from latentedit.limits import LIMITS, check_items, check_range
from latentedit.methods.base import (
    Editable,
    Frame,
    FrameRequest,
    JobBasics,
    Method,
    Progress,
    Trained,
    batch_seed,
    batches,
    check_count,
    check_distances,
    check_finite,
    check_frames,
    job_basics,
    path_frames,
    resolve_attribute,
)
from latentedit.repository import Entry, ModelRepository, validate_name
from latentedit.world import GeneratorInfo, World

FLOW_KIND = "flow"

# ---- the flow T ----------------------------------------------------------------------------


def coupling_mask(shape: tuple[int, int], index: int) -> torch.Tensor:
    """The conditioning mask of coupling `index` over a latent of shape (rows, dim), flattened.

    Couplings alternate parity (even / odd positions) so every value is updated every second
    coupling. With one row (Z, W) the parity runs within the row; with several (W+) pairs of
    couplings alternate between parity within the rows and parity across the rows, so values
    of different rows condition each other."""
    rows, dim = shape
    parity = index % 2
    across = rows > 1 and (index // 2) % 2 == 1
    grid = torch.arange(rows)[:, None].expand(rows, dim) if across else torch.arange(dim)[None, :].expand(rows, dim)
    return ((grid % 2) == parity).float().reshape(-1)


def _mlp(size: int, hidden: int, scale: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(size, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                               nn.Linear(hidden, size)]
    if scale:
        layers.append(nn.Tanh())
    last = layers[4]
    assert isinstance(last, nn.Linear)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers)


class AffineCoupling(nn.Module):
    """y = m x + (1 - m) (x exp(s(m x)) + t(m x)); s and t are 3 FC layers, LeakyReLU inside, Tanh on s."""

    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor, hidden: int) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.scale = _mlp(mask.numel(), hidden, scale=True)
        self.shift = _mlp(mask.numel(), hidden, scale=False)

    def _st(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        free = 1 - self.mask
        return self.scale(kept) * free, self.shift(kept) * free

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept = x * self.mask
        s, t = self._st(kept)
        return kept + (1 - self.mask) * (x * torch.exp(s) + t), s.sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        kept = y * self.mask
        s, t = self._st(kept)
        return kept + (1 - self.mask) * (y - t) * torch.exp(-s)


class RealNVP(nn.Module):
    """T: flat latents [N, rows * dim] -> proxy latents of the same shape, with log|det dT/dz|."""

    def __init__(self, shape: tuple[int, int], couplings: int = 4, hidden: int = 256) -> None:
        super().__init__()
        if couplings < 1 or hidden < 1:
            raise InvalidArgument(f"a flow needs at least one coupling and one hidden unit; got {couplings}, {hidden}")
        self.shape, self.num_couplings, self.hidden = tuple(shape), couplings, hidden
        self.couplings = nn.ModuleList([AffineCoupling(coupling_mask((shape[0], shape[1]), i), hidden) for i in range(couplings)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = torch.zeros(len(x), dtype=x.dtype)
        for coupling in self.couplings:
            x, part = coupling(x)
            logdet = logdet + part
        return x, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for coupling in reversed(self.couplings):
            assert isinstance(coupling, AffineCoupling)
            y = coupling.inverse(y)
        return y

    def architecture(self) -> dict[str, Any]:
        return {"type": "realnvp-affine", "shape": list(self.shape), "couplings": self.num_couplings, "hidden": self.hidden,
                "nets": "3 FC layers each for s and t, LeakyReLU(0.2) inside, Tanh on s; no batch normalisation",
                "masks": "alternating parity within rows; for several rows, pairs of couplings alternate within / across rows"}


# ---- the frozen linear attribute classifiers ------------------------------------------------


@dataclass
class LinearClassifiers:
    """One single-layer linear classifier per attribute: logits = x W^T + b (W [K, d], b [K])."""

    weight: np.ndarray
    bias: np.ndarray

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x @ torch.from_numpy(self.weight).to(x.dtype).T + torch.from_numpy(self.bias).to(x.dtype)

    def accuracy(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Per-attribute share of samples [N, d] on the side their labels [N, K] say."""
        predicted = (x @ self.weight.T + self.bias) > 0
        return (predicted == (labels > 0)).mean(0)

    def normal(self, k: int) -> np.ndarray:
        w = self.weight[k].astype(np.float64)
        return (w / max(np.linalg.norm(w), 1e-12)).astype(np.float32)


def fit_classifiers(x: np.ndarray, labels: np.ndarray, c: float = 1.0, seed: int = 0) -> LinearClassifiers:
    """Logistic regression per attribute column of `labels` [N, K] (0/1) on x [N, d]."""
    from sklearn.linear_model import LogisticRegression

    weights, biases = [], []
    for k in range(labels.shape[1]):
        y = labels[:, k].astype(np.int64)
        if len(np.unique(y)) < 2:
            raise InvalidArgument(f"attribute {k}: every sample has the same label; nothing to classify")
        model = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x, y)
        weights.append(model.coef_.reshape(-1))
        biases.append(float(model.intercept_[0]))
    return LinearClassifiers(np.stack(weights).astype(np.float32), np.asarray(biases, np.float32))


# ---- the losses ---------------------------------------------------------------------------


def attribute_loss(proxy: torch.Tensor, classifiers: LinearClassifiers, labels: torch.Tensor) -> torch.Tensor:
    """L_a (eq. 2): binary cross-entropy of each frozen classifier on T(z) [N, d], summed over the
    K attributes (labels [N, K] in {0, 1}), averaged over the batch."""
    logits = classifiers.logits(proxy)
    return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").sum(1).mean()


def latent_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """D_latent: mean squared difference of flat latents a, b [N, d] -> [N]."""
    return ((a - b) ** 2).mean(1)


def pairwise_latent_distance(x: torch.Tensor) -> torch.Tensor:
    """D_latent between all pairs of x [N, d] -> [N, N]."""
    squares = (x**2).sum(1)
    return (squares[:, None] + squares[None, :] - 2 * x @ x.T).clamp_min(0.0) / x.shape[1]


def distance_loss(proxy_blocks: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L_d (eq. 1): mean over the pairs i < j of each block of (D_latent(T z_i, T z_j) - target_ij)^2.

    proxy_blocks [B, P, d]: T(z) of B blocks of P samples; targets [B, P, P]: the rescaled
    perceptual distances s * D_perceptual(G(z_i), G(z_j)) of the same pairs."""
    p = proxy_blocks.shape[1]
    upper = torch.triu(torch.ones(p, p, dtype=torch.bool), diagonal=1)
    latent = torch.stack([pairwise_latent_distance(block) for block in proxy_blocks])
    return ((latent - targets)[:, upper] ** 2).mean()


def perceptual_scale(latent: np.ndarray, perceptual: np.ndarray) -> float:
    """The factor s that puts D_perceptual on D_latent's scale (the paper: a fixed x10): the ratio
    of their means over the same pairs in the original space."""
    mean = float(np.mean(perceptual))
    if not mean > 0:
        raise FailedPrecondition("every perceptual distance of the training pairs is 0; the images do not vary")
    return float(np.mean(latent)) / mean


def identity_loss(flow: RealNVP, z: torch.Tensor, render: Callable[[torch.Tensor], torch.Tensor],
                  descriptor: Callable[[torch.Tensor], torch.Tensor], noise: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """L_ID (eq. 4): ||F(G(z)) - F(G(T^-1(T(z) + eps)))||^2, eps ~ N(0, noise^2 I), batch mean.

    `render`: flat latents -> images [N, 3, H, W] in [0, 1] (differentiable); `descriptor`:
    such images -> [N, 128]. Gradients flow to T through T^-1 and G and F (both frozen)."""
    with torch.no_grad():
        reference = descriptor(render(z))
    proxy, _ = flow(z)
    eps = torch.randn(proxy.shape, generator=generator, dtype=proxy.dtype) * noise
    moved = flow.inverse(proxy + eps)
    return ((descriptor(render(moved)) - reference) ** 2).sum(1).mean()


# ---- training -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowOptions:
    """Training knobs (defaults: the paper's loss weights; steps, batch and lr sized for CPUs)."""

    couplings: int = 4  # the paper: 13 ("H") or 3-4 ("L")
    hidden: int = 256
    distance_weight: float = 10.0  # lambda_d
    identity_weight: float = 0.0  # lambda_ID (0: no identity loss)
    identity_noise: float = 0.3  # sigma of eq. 4's eps
    identity_batch: int = 8  # rows of each step that also go through G and F for L_ID
    identity_every: int = 1  # L_ID on every k-th step only, weighted k x (G and F are costly on a CPU)
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 1e-3
    pair_block: int = 8  # samples per L_d block (the paper's batch size)
    seed: int = 0


IdentityTerm = Callable[[RealNVP, torch.Tensor, torch.Generator], torch.Tensor]


def fit_flow(flow: RealNVP, classifiers: LinearClassifiers, x: torch.Tensor, labels: torch.Tensor,
             blocks: torch.Tensor | None, targets: torch.Tensor | None, options: FlowOptions,
             identity: IdentityTerm | None = None, on_step: Callable[[int, dict[str, float]], None] | None = None
             ) -> dict[str, float]:
    """Adam on L_a + lambda_d L_d (+ lambda_ID L_ID) over flat latents x [N, d] with labels [N, K].

    blocks [B, P] index x: the L_d pairs; targets [B, P, P] their rescaled perceptual distances.
    `identity(flow, z, rng)` gives L_ID for a few rows. Returns the last step's loss terms."""
    rng = torch.Generator().manual_seed(options.seed)
    optimiser = torch.optim.Adam(flow.parameters(), lr=options.learning_rate)
    use_d = options.distance_weight > 0 and blocks is not None and targets is not None and len(blocks) > 0
    per_step = max(1, options.batch_size // (blocks.shape[1] if use_d and blocks is not None else 1))
    losses: dict[str, float] = {}
    for step in range(options.steps):
        if use_d:
            assert blocks is not None and targets is not None
            chosen = torch.randint(len(blocks), (min(per_step, len(blocks)),), generator=rng)
            rows = blocks[chosen].reshape(-1)
        else:
            rows = torch.randint(len(x), (min(options.batch_size, len(x)),), generator=rng)
        proxy, _ = flow(x[rows])
        l_a = attribute_loss(proxy, classifiers, labels[rows])
        total = l_a
        losses = {"loss_attributes": l_a.item()}
        if use_d:
            assert blocks is not None and targets is not None
            l_d = distance_loss(proxy.reshape(len(chosen), blocks.shape[1], -1), targets[chosen])
            total = total + options.distance_weight * l_d
            losses["loss_distance"] = l_d.item()
        if identity is not None and options.identity_weight > 0 and step % max(1, options.identity_every) == 0:
            l_id = identity(flow, x[rows[: options.identity_batch]], rng)
            total = total + options.identity_weight * max(1, options.identity_every) * l_id
            losses["loss_identity"] = l_id.item()
        losses["loss"] = total.item()
        if not math.isfinite(losses["loss"]):
            raise FailedPrecondition(f"the flow's loss became {losses['loss']} at step {step}; lower the learning rate")
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        if on_step is not None:
            on_step(step, losses)
    return losses


def apply_flow(flow: RealNVP, x: np.ndarray, batch: int = 1024) -> np.ndarray:
    """T(x) for flat latents [N, d] (no gradients)."""
    with torch.no_grad():
        return np.concatenate([flow(torch.from_numpy(np.ascontiguousarray(x[i:i + batch], np.float32)))[0].numpy()
                               for i in range(0, len(x), batch)]) if len(x) else x.astype(np.float32)


def invert_flow(flow: RealNVP, y: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return flow.inverse(torch.from_numpy(np.ascontiguousarray(y, np.float32))).numpy()


def gap_statistics(latent: np.ndarray, perceptual: np.ndarray) -> tuple[float, float]:
    """(mean, std) of D_latent - s D_perceptual over pairs (the paper's Table 1 'Mean', 'STD')."""
    gap = np.asarray(latent, np.float64) - np.asarray(perceptual, np.float64)
    return float(gap.mean()), float(gap.std())


def block_pairs(blocks: np.ndarray, x: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(D_latent, target) of every pair i < j within each block: x [N, d] flat latents."""
    p = blocks.shape[1]
    i, j = np.triu_indices(p, 1)
    a, b = x[blocks[:, i]], x[blocks[:, j]]  # [B, pairs, d]
    return ((a - b) ** 2).mean(-1).reshape(-1), targets[:, i, j].reshape(-1)


def fresh_linear_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> np.ndarray:
    """Held-out accuracy per attribute of linear classifiers fitted from scratch (logistic regression)."""
    fitted = fit_classifiers(train_x, train_y)
    return fitted.accuracy(test_x, test_y)


# ---- the artifact ---------------------------------------------------------------------------


@dataclass
class FlowArtifact:
    flow: RealNVP
    space: LatentSpaceSpec
    attributes: tuple[Attribute, ...]
    classifiers: LinearClassifiers  # frozen, in the original space, applied in the proxy space
    boundaries: np.ndarray  # [K, d] unit normals of InterFaceGAN SVMs fitted in the proxy space
    offsets: np.ndarray  # [K]
    perceptual_scale: float
    thresholds: tuple[float, ...] = ()
    name: str = ""

    def index(self, ref, field: str = "attribute") -> int:
        """The artifact's attribute an AttributeRef names (NOT_FOUND lists the trained ones; a
        malformed reference, as a negative index or an index on a scalar output, is INVALID_ARGUMENT)."""
        if ref.index < 0:
            raise InvalidArgument(f"{field}.index {ref.index} must be >= 0")
        if ref.index and not ref.label and any(a.head == ref.head and a.output == ref.output and a.index is None
                                               for a in self.attributes):
            raise InvalidArgument(f"{field}.index {ref.index}: {ref.head}.{ref.output} is a scalar output; leave index unset")
        for k, attribute in enumerate(self.attributes):
            if attribute.head != ref.head or attribute.output != ref.output:
                continue
            if ref.label and ref.label != attribute.label:
                continue
            if not ref.label and (ref.index or 0) != (attribute.index or 0):
                continue
            return k
        trained = ", ".join(a.name for a in self.attributes)
        wanted = Attribute(ref.head, ref.output, ref.index if ref.index or ref.label else None, ref.label).name
        raise NotFound(f"{field} {wanted!r}: flow {self.name!r} was not trained on it; its attributes: {trained}")


def flow_tensors(artifact: FlowArtifact) -> dict[str, Any]:
    tensors: dict[str, Any] = {"flow." + k: v for k, v in artifact.flow.state_dict().items()}
    tensors.update({"classifiers.weight": artifact.classifiers.weight, "classifiers.bias": artifact.classifiers.bias,
                    "boundaries.normal": artifact.boundaries.astype(np.float32),
                    "boundaries.offset": artifact.offsets.astype(np.float32)})
    return tensors


def load_flow(repo: ModelRepository, name: str, generator: GeneratorInfo, version: int = 0) -> FlowArtifact:
    """The flow artifact `name`, checked to belong to `generator` and to fit one of its spaces."""
    entry = resolve_trained(repo, FLOW_KIND, "W* flow", name, version, generator.name)
    manifest = entry.manifest
    space_name = manifest.get("space", "z")
    spaces = {s.space: s for s in generator.spec.latent_spaces}
    if space_name not in spaces:
        raise FailedPrecondition(f"flow {name!r} lives in latent space {space_name!r}; generator {generator.name!r} has "
                                 f"spaces {', '.join(spaces)}")
    space = spaces[space_name]
    architecture = manifest["architecture"]
    shape = tuple(architecture["shape"])
    if shape[0] * shape[1] != space.size:
        raise FailedPrecondition(f"flow {name!r} maps latents of {shape[0] * shape[1]} values; {generator.name!r}'s "
                                 f"{space_name} has {space.size}")
    tensors = load_tensors(entry, "flow")
    flow = RealNVP((int(shape[0]), int(shape[1])), int(architecture["couplings"]), int(architecture["hidden"]))
    flow.load_state_dict({k[len("flow."):]: v for k, v in tensors.items() if k.startswith("flow.")})
    perceptual = manifest.get("perceptual", {})
    return FlowArtifact(flow.eval(), space, tuple(Attribute.from_dict(a) for a in manifest["attributes"]),
                        LinearClassifiers(tensors["classifiers.weight"].numpy(), tensors["classifiers.bias"].numpy()),
                        tensors["boundaries.normal"].numpy(), tensors["boundaries.offset"].numpy(),
                        float(perceptual.get("scale", 1.0)), tuple(manifest.get("thresholds", ())), entry.name)


# ---- the plug-in --------------------------------------------------------------------------


@dataclass(frozen=True)
class WStarOptions:
    flow: str
    attribute: Any  # AttributeRef
    conditions: tuple[Any, ...] = ()
    start_distance: float = -3.0
    end_distance: float = 3.0
    num_frames: int = 8
    rows: RowRange | None = None
    proxy_boundary: bool = False  # the proxy-space InterFaceGAN boundary's normal, not the classifier's


@dataclass(frozen=True)
class PreparedFlow:
    artifact: FlowArtifact
    attribute: int
    conditions: tuple[int, ...]
    space: str


@dataclass
class FlowSpec:
    basics: JobBasics
    space: str
    attributes: tuple[Attribute, ...]
    num_samples: int
    options: FlowOptions
    repo: ModelRepository = field(repr=False, compare=False, default=None)  # type: ignore[assignment]


def _load_descriptor(repo: ModelRepository) -> Callable[[torch.Tensor], torch.Tensor]:
    """The differentiable torch face descriptor (latentedit.models.face_descriptor), or FAILED_PRECONDITION."""
    try:
        from latentedit.models import face_descriptor
    except ImportError as exc:
        raise FailedPrecondition("identity_weight needs the differentiable torch face descriptor "
                                 "(latentedit.models.face_descriptor), which is not installed here; "
                                 "use identity_weight 0") from exc
    module = face_descriptor.load_face_descriptor(repo, quantize=False)  # smooth gradients, no rounding
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module.eval()


class WStar(Method):
    name = "wstar"
    title = "W* (RealNVP proxy space)"
    artifact_kind = FLOW_KIND
    jobs = ("flow",)

    # ---- editing ------------------------------------------------------------------------

    def edit_options(self, message, num_frames: int, limits: EditorConfig) -> WStarOptions:
        validate_name(message.flow, "flow")
        check_distances(start_distance=message.start_distance, end_distance=message.end_distance)
        if not message.attribute.head:
            raise InvalidArgument("attribute: name the attribute to edit (head, output and label or index)")
        check_items(len(message.condition_attributes), "condition_attributes", LIMITS.list_items, "list_items")
        rows = RowRange(message.rows.start, message.rows.end) if message.HasField("rows") else None
        proxy_boundary = bool(message.proxy_boundary)
        return WStarOptions(message.flow, message.attribute, tuple(message.condition_attributes), message.start_distance,
                            message.end_distance, check_frames(num_frames, limits), rows, proxy_boundary)

    def prepare(self, repo: ModelRepository, generator: GeneratorInfo, options: WStarOptions) -> PreparedFlow:
        artifact = load_flow(repo, options.flow, generator)
        k = artifact.index(options.attribute)
        conditions = tuple(artifact.index(c, f"condition_attributes[{i}]") for i, c in enumerate(options.conditions))
        if k in conditions:
            raise InvalidArgument("condition_attributes: the edited attribute cannot also be a condition")
        if options.rows is not None:
            options.rows.mask(artifact.space)  # INVALID_ARGUMENT unless W+ and in range
        return PreparedFlow(artifact, k, conditions, artifact.space.space)

    def direction(self, prepared: PreparedFlow, proxy_boundary: bool = False) -> np.ndarray:
        """The unit edit direction in the proxy space: the attribute's normal with the conditions' projected out."""
        from latentedit.methods.interfacegan import conditioned_direction

        a = prepared.artifact
        normal = (lambda k: a.boundaries[k]) if proxy_boundary else a.classifiers.normal
        return conditioned_direction(normal(prepared.attribute), [normal(c) for c in prepared.conditions])

    def edit(self, world: World, generator: GeneratorInfo, artifact: PreparedFlow, start: Latents, options: WStarOptions,
             frames: FrameRequest) -> Iterator[Frame]:
        a = artifact.artifact
        if start.space.size != a.space.size:
            raise InvalidArgument(f"latents: {start.space.describe()} does not fit flow {a.name!r} ({a.space.describe()})")
        direction = self.direction(artifact, options.proxy_boundary)
        distances = np.linspace(options.start_distance, options.end_distance, options.num_frames)
        proxy_start = Latents(start.space, apply_flow(a.flow, start.flat()).reshape(start.values.shape))
        classifier = a.classifiers

        def path():
            for distance in distances:
                proxy = move(proxy_start, direction, float(distance), options.rows)
                latents = start.replace(invert_flow(a.flow, proxy.flat()))
                logits = proxy.flat() @ classifier.weight[artifact.attribute] + classifier.bias[artifact.attribute]
                yield latents, {
                    "distance": float(distance),
                    "proxy_distance": float(np.linalg.norm(proxy.flat() - proxy_start.flat(), axis=1).mean()),
                    "latent_distance": float(np.linalg.norm(latents.flat() - start.flat(), axis=1).mean()),
                    "classifier_logit": float(np.mean(logits)),
                }

        return path_frames(world, generator, path(), frames, options.num_frames)

    # ---- training -----------------------------------------------------------------------

    def job_spec(self, kind: str, message, world: World, repo: ModelRepository) -> FlowSpec:
        from latentedit.wire import space_name

        if kind != "flow":
            return super().job_spec(kind, message, world, repo)
        check_finite(distance_weight=message.distance_weight, identity_weight=message.identity_weight)
        if not message.attributes:
            raise InvalidArgument("attributes: name at least one attribute to separate in the proxy space")
        check_items(len(message.attributes), "attributes", LIMITS.list_items, "list_items")
        heads = world.heads()
        attributes = tuple(resolve_attribute(ref, heads, f"attributes[{i}]") for i, ref in enumerate(message.attributes))
        if len(set(attributes)) != len(attributes):
            raise InvalidArgument("attributes: an attribute is named twice")
        basics = job_basics(world, message.generator, message.options, lambda g: f"{g.name}-wstar", default_batch=64)
        space = basics.generator.space(space_name(message.space))
        defaults = FlowOptions()
        num = check_count(message.num_samples or 2000, "num_samples")
        couplings = message.num_coupling_layers or defaults.couplings
        check_range(couplings, "num_coupling_layers", 1, 64)
        hidden = message.hidden_dim or defaults.hidden
        check_range(hidden, "hidden_dim", 1, 4096)
        for name in ("distance_weight", "identity_weight"):
            value = getattr(message, name)
            if value < 0:
                raise InvalidArgument(f"{name} {value:g} must be >= 0 ({'0: the default 10' if name == 'distance_weight' else '0: off'})")
            check_range(value, name, 0, LIMITS.weight_max, "weight_max")
        if message.options.learning_rate < 0:
            raise InvalidArgument(f"options.learning_rate {message.options.learning_rate:g} must be >= 0 (0: the default)")
        if message.identity_weight > 0:
            _load_descriptor(repo)  # FAILED_PRECONDITION now, not when the job has sampled for minutes
        options = FlowOptions(couplings=couplings, hidden=hidden, distance_weight=message.distance_weight or defaults.distance_weight,
                              identity_weight=message.identity_weight, steps=message.options.steps or defaults.steps,
                              batch_size=basics.batch_size, learning_rate=message.options.learning_rate or defaults.learning_rate,
                              seed=basics.seed)
        if num < 4 * options.pair_block:
            raise InvalidArgument(f"num_samples {num} must be at least {4 * options.pair_block}")
        return FlowSpec(basics, space.space, attributes, num, options, repo)

    def train(self, world: World, spec: FlowSpec, progress: Progress) -> Trained:
        from latentedit.methods.interfacegan import MIN_PER_CLASS, boundary_from_scores
        from latentedit.perceptual import DEFINITION, PerceptualDistance, uint8_pairwise

        b, o = spec.basics, spec.options
        space = b.generator.space(spec.space)
        perceptual = PerceptualDistance.from_repository(spec.repo)
        heads = sorted({a.head for a in spec.attributes})
        block = o.pair_block
        total = spec.num_samples - spec.num_samples % block
        # Sampling batches are whole blocks, so each block's perceptual distances come from one batch.
        batch = max(block, b.batch_size - b.batch_size % block)
        xs, scores, targets = [], [], []
        for index, start, count in batches(total, batch):
            progress.check()
            latents = world.sample(b.generator, count, batch_seed(b.seed, index), spec.space)
            images = world.synthesize(b.generator, latents)
            outputs = world.score(images, heads)
            xs.append(latents.flat())
            scores.append(np.stack([a.extract(outputs) for a in spec.attributes], axis=1))
            targets += [uint8_pairwise(perceptual, images[i:i + block]) for i in range(0, count, block)]
            progress.report("sampling, scoring and perceptual distances", 0.3 * (start + count) / total,
                            message=f"{start + count}/{total} samples")
        x, values, target = np.concatenate(xs), np.concatenate(scores), np.stack(targets)
        blocks = np.arange(len(x)).reshape(-1, block)
        # Blocks holding an unscored sample (no face found...) are dropped whole.
        usable = np.isfinite(values[blocks]).all(axis=(1, 2))
        blocks, target = blocks[usable], target[usable]
        if len(blocks) < 4:
            raise FailedPrecondition(f"only {len(blocks) * block} of {len(x)} samples got finite scores for every attribute")
        thresholds = np.median(values[blocks.reshape(-1)], axis=0)
        labels = (values > thresholds).astype(np.float32)
        order = np.random.default_rng(b.seed).permutation(len(blocks))
        held = max(1, len(blocks) // 5)
        train_blocks, test_blocks = blocks[order[held:]], blocks[order[:held]]
        train_rows, test_rows = train_blocks.reshape(-1), test_blocks.reshape(-1)
        for k, a in enumerate(spec.attributes):
            if len(np.unique(labels[train_rows, k])) < 2:
                raise FailedPrecondition(f"attribute {a.name}: every training sample has the same label")
        progress.check()
        progress.report("fitting the attribute classifiers in the original space", 0.31)
        classifiers = fit_classifiers(x[train_rows], labels[train_rows], seed=b.seed)
        latent_pairs, perceptual_pairs = block_pairs(train_blocks, x, target[order[held:]])
        scale = perceptual_scale(latent_pairs, perceptual_pairs)

        flow = RealNVP((space.num_ws if space.space == "w+" else 1, space.dim), o.couplings, o.hidden)
        identity: IdentityTerm | None = None
        if o.identity_weight > 0:
            identity = self._identity_term(world, b.generator, space, _load_descriptor(spec.repo), o.identity_noise)
        steps = o.steps

        def on_step(step: int, losses: dict[str, float]) -> None:
            progress.check()
            if step % 10 == 0 or step == steps - 1:
                progress.report("training the flow", 0.33 + 0.57 * (step + 1) / steps, losses)

        index_map = {int(r): i for i, r in enumerate(train_rows)}
        local_blocks = np.vectorize(index_map.__getitem__)(train_blocks)
        losses = fit_flow(flow, classifiers, torch.from_numpy(x[train_rows]), torch.from_numpy(labels[train_rows]),
                          torch.from_numpy(local_blocks), torch.from_numpy(target[order[held:]] * scale).float(), o,
                          identity, on_step)
        flow.eval()
        progress.report("measuring the proxy space", 0.92)
        proxy = apply_flow(flow, x)
        metrics = {**losses, "num_samples": float(len(x)), "num_used": float(len(blocks) * block), "perceptual_scale": scale}
        for tag, data in (("original", x), ("proxy", proxy)):
            frozen = classifiers.accuracy(data[test_rows], labels[test_rows])
            fresh = fresh_linear_accuracy(data[train_rows], labels[train_rows], data[test_rows], labels[test_rows])
            metrics[f"classifier_accuracy_{tag}"] = float(frozen.mean())
            metrics[f"fresh_accuracy_{tag}"] = float(fresh.mean())
            metrics[f"fresh_accuracy_min_{tag}"] = float(fresh.min())
            lat, per = block_pairs(test_blocks, data, target[order[:held]] * scale)
            metrics[f"distance_gap_mean_{tag}"], metrics[f"distance_gap_std_{tag}"] = gap_statistics(lat, per)
            for k, a in enumerate(spec.attributes):
                metrics[f"classifier_accuracy_{tag}/{a.name}"] = float(frozen[k])
        progress.check()
        progress.report("fitting InterFaceGAN boundaries in the proxy space", 0.95)
        normals, offsets = [], []
        rows = blocks.reshape(-1)
        keep = min(0.5, max(0.1, MIN_PER_CLASS / len(rows) + 1e-9))
        for k, a in enumerate(spec.attributes):
            fit = boundary_from_scores(proxy[rows], values[rows, k], keep_fraction=keep, seed=b.seed)
            normals.append(fit.boundary.normal)
            offsets.append(fit.boundary.offset)
            metrics[f"proxy_boundary_accuracy/{a.name}"] = fit.validation_accuracy
        artifact = FlowArtifact(flow, space, spec.attributes, classifiers, np.stack(normals), np.asarray(offsets, np.float32),
                                scale, tuple(float(t) for t in thresholds), b.name)
        manifest = {"architecture": flow.architecture(), "attributes": [a.to_dict() for a in spec.attributes],
                    "thresholds": [float(t) for t in thresholds],
                    "label_protocol": "binary: score above the median of the training samples",
                    "classifiers": "logistic regression per attribute in the original space (frozen while T trains)",
                    "perceptual": {"definition": DEFINITION, "scale": scale,
                                   "scale_rule": "mean D_latent / mean D_perceptual over the training pairs, original space",
                                   "latent_distance": "mean squared difference of the flat latents",
                                   "pair_block": block},
                    "loss_weights": {"distance": o.distance_weight, "identity": o.identity_weight,
                                     "identity_noise": o.identity_noise}}
        progress.report("writing the flow", 0.98, metrics)
        return Trained(FLOW_KIND, b.name, b.generator, space.space, metrics, {"flow": "flow.safetensors"},
                       tensors_writer("flow.safetensors", flow_tensors(artifact)), manifest, artifact)

    @staticmethod
    def _identity_term(world: World, generator: GeneratorInfo, space: LatentSpaceSpec,
                       descriptor: Callable[[torch.Tensor], torch.Tensor], noise: float) -> IdentityTerm:
        from latentedit.models.generator import IMAGE_LAYER, INPUT_LAYER

        model = world.generator_module(generator)
        for parameter in model.parameters():
            parameter.requires_grad_(False)

        def render(flat: torch.Tensor) -> torch.Tensor:
            x = model.latents_to_input(flat.reshape(len(flat), *space.shape), space.space)
            return (model.run(x, INPUT_LAYER, [IMAGE_LAYER])[IMAGE_LAYER].clamp(-1, 1) + 1) / 2

        return lambda flow, z, rng: identity_loss(flow, z, render, descriptor, noise, rng)

    # ---- listing ------------------------------------------------------------------------

    def describe(self, entry: Entry) -> Editable:
        editable = super().describe(entry)
        attributes = tuple(Attribute.from_dict(a) for a in entry.manifest.get("attributes", []))
        return Editable(**{**editable.__dict__, "attributes": attributes})

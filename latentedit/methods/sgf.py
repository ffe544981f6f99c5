"""SGF (Li, Jin, Zhu, CVPR 2021): surrogate gradient field of an auxiliary mapping F(z, c).

F is trained so that F(z, C(G(z))) = z. Along a path whose condition moves linearly from c0
to c1, dz/dt = (I - dF/dz)^-1 dF/dc (c1 - c0) (the paper's Eq. 6); Algorithm 1 integrates it
with forward Euler steps, the inverse as an m-term Neumann series, and re-measures the
condition after every step (closed loop; each step aims at the remaining gap, see `sgf_edit`). Every product with a Jacobian is a Jacobian-vector
product (`torch.func.jvp`): no Jacobian is ever built.

The Neumann series needs the spectral radius of dF/dz below 1, which spectral normalisation
gives (Lip(F) < 1 in z, the paper's Eq. 2, after invertible ResNets). AdaIN's instance
normalisation divides by the feature standard deviation and so has no Lipschitz bound; we keep
AdaIN's conditioning, a per-feature scale and shift computed from c, with the scale bounded in
(0, 1), so that every layer of the network R stays a contraction in z.

F(z, c) = a z + R(z, c) (format 2). F must return z itself, yet c explains ~1% of z here; a
plain stack of `depth` spectral-normed layers passes almost nothing of z through (its z-gain at
init is ~0.01, and training never recovers it: held-out error 0.99, bench/sgf_fit.py). The fixed
share a of z keeps the z path open; R's layers are scaled to (0.99 - a) ** (1 / depth), so
Lip_z(F) <= a + Lip_z(R) <= 0.99 < 1 still holds and every argument of the paper (the Neumann
series, Eq. 6's inverse, one fixed point z = F(z, c) per c) stays true. Format 1 artifacts
(trained before; no `format_version` in the manifest) are a = 0 and still load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import jvp
from torch.nn.utils.parametrizations import spectral_norm

from latentedit.artifacts import MAPPING_KIND, load_tensors, resolve_trained, tensors_writer
from latentedit.conditions import ConditionSpec
from latentedit.config import EditorConfig
from latentedit.errors import FailedPrecondition, InvalidArgument, NotFound
from latentedit.latents import Latents
from latentedit.limits import LIMITS, check_items, check_range, check_text
from latentedit.methods.base import (
    DIVERGED,
    STEP_LIMIT,
    TARGET_REACHED,
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
    check_finite,
    job_basics,
    requested,
    resolve_attribute,
)
from latentedit.repository import Entry, ModelRepository
from latentedit.world import GeneratorInfo, World


@dataclass(frozen=True)
class MappingSpec:
    """Training F: the defaults every caller (trainer, CLI, evaluation) uses."""

    basics: JobBasics
    condition: ConditionSpec
    space: str = "z"
    num_pairs: int = 2000
    depth: int = 6
    hidden: int = 256
    # F = a z + R(z, c) fits within a few hundred steps (bench/sgf_fit.py: 0.25 held out after
    # 200); format 1's 3000 steps took 18 minutes on 2 cores and still ended near 0.95.
    steps: int = 600
    learning_rate: float = 2e-3
    train_batch: int = 128
    skip: float = 0.5  # a in F = a z + R(z, c)


@dataclass(frozen=True)
class AttributeGoal:
    """A target value of one attribute: a number, or one per sample ([N])."""

    head: str
    output: str
    label: str
    index: int
    value: float | np.ndarray


@dataclass(frozen=True)
class KeypointGoal:
    points: np.ndarray  # [K, 2] or [N, K, 2] image pixels


@dataclass(frozen=True)
class CaptionGoal:
    text: str


@dataclass(frozen=True)
class SGFOptions:
    """An SGF edit (Algorithm 1) and its defaults."""

    mapping: str
    target: tuple[AttributeGoal, ...] | KeypointGoal | CaptionGoal
    step_size: float = 0.2
    neumann_order: int = 1
    max_steps: int = 20
    # Stop when the targeted part of the condition is this close (standardised units).
    tolerance: float = 0.1


class _ScaledSpectralLinear(nn.Module):
    """A linear layer with spectral norm `coefficient` < 1 (power-iteration estimate, as in SN-GAN)."""

    def __init__(self, fan_in: int, fan_out: int, coefficient: float) -> None:
        super().__init__()
        # Several power iterations per step keep the estimate close to the moving weights.
        self.linear = spectral_norm(nn.Linear(fan_in, fan_out), n_power_iterations=3)
        self.coefficient = coefficient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coefficient * self.linear(x)

    def spectral_norm(self) -> float:
        """The exact largest singular value of the layer as applied (not the running estimate)."""
        with torch.no_grad():
            return float(self.coefficient * torch.linalg.matrix_norm(self.linear.weight, ord=2))


class _ModulatedLayer(nn.Module):
    """h -> LeakyReLU(scale(c) * W h + shift(c)), scale in (0, 1): a contraction in h for any c."""

    def __init__(self, width: int, condition_dim: int, coefficient: float) -> None:
        super().__init__()
        self.linear = _ScaledSpectralLinear(width, width, coefficient)
        self.style = _ScaledSpectralLinear(condition_dim, 2 * width, coefficient)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.style(c).chunk(2, dim=-1)
        return self.act(torch.sigmoid(scale) * self.linear(h) + shift)


# Artifact formats: 1, F = R(z, c) (no `format_version` in the manifest; loads as a = 0);
# 2, F = a z + R(z, c) with `skip` (a) in the manifest's config.
MAPPING_FORMAT = 2
READABLE_FORMATS = (1, 2)
LIPSCHITZ_TARGET = 0.99  # the bound on Lip_z(F) that new mappings are built to


class AuxiliaryMapping(nn.Module):
    """F(z, c) = skip * z + R(z, c): R an MLP of `depth` layers with spectral norm on every linear
    layer and AdaIN-style conditioning on c. Inputs and outputs are batches: z [N, latent_dim],
    c [N, condition_dim]. Lip_z(F) <= skip + coefficient ** depth < 1 (checked here); the default
    coefficient makes that bound `LIPSCHITZ_TARGET`.
    """

    def __init__(self, latent_dim: int, condition_dim: int, depth: int, hidden: int, coefficient: float | None = None,
                 skip: float = 0.5) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError("depth must be at least 2 (input and output layers)")
        if not 0 <= skip < LIPSCHITZ_TARGET:
            raise ValueError(f"skip {skip} must be in [0, {LIPSCHITZ_TARGET}) so that F stays a contraction in z")
        if coefficient is None:
            coefficient = (LIPSCHITZ_TARGET - skip) ** (1 / depth)
        if not 0 < coefficient < 1 or skip + coefficient**depth >= 1:
            raise ValueError(f"coefficient {coefficient} must be in (0, 1) with skip + coefficient ** depth < 1 "
                             "so that F is a contraction in z")
        self.latent_dim, self.condition_dim, self.depth, self.hidden = latent_dim, condition_dim, depth, hidden
        self.coefficient, self.skip = coefficient, skip
        # Layer names as in format 1, so that its state dicts load unchanged.
        self.inp = _ScaledSpectralLinear(latent_dim, hidden, coefficient)
        self.inp_style = _ScaledSpectralLinear(condition_dim, hidden, coefficient)
        self.blocks = nn.ModuleList([_ModulatedLayer(hidden, condition_dim, coefficient) for _ in range(depth - 2)])
        self.out = _ScaledSpectralLinear(hidden, latent_dim, coefficient)
        self.out_shift = _ScaledSpectralLinear(condition_dim, latent_dim, coefficient)
        self.act = nn.LeakyReLU(0.2)

    def residual(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.act(self.inp(z) + self.inp_style(c))
        for block in self.blocks:
            h = block(h, c)
        return self.out(h) + self.out_shift(c)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        out = self.residual(z, c)
        return self.skip * z + out if self.skip else out

    def layer_spectral_norms(self) -> list[float]:
        return [m.spectral_norm() for m in self.modules() if isinstance(m, _ScaledSpectralLinear)]

    def lipschitz_bound(self) -> float:
        """skip + the product of the exact spectral norms of the layers on R's z path (the
        sigmoid scales are < 1 and LeakyReLU is 1-Lipschitz): an upper bound on Lip_z(F)."""
        path = [self.inp, *(block.linear for block in self.blocks if isinstance(block, _ModulatedLayer)), self.out]
        return self.skip + float(np.prod([layer.spectral_norm() for layer in path]))

    def config(self) -> dict:
        return {"latent_dim": self.latent_dim, "condition_dim": self.condition_dim, "depth": self.depth, "hidden": self.hidden,
                "skip": self.skip}


def fixed_point(mapping: AuxiliaryMapping, c: torch.Tensor, iterations: int = 200, z0: torch.Tensor | None = None) -> torch.Tensor:
    """The one z with F(z, c) = z (Banach: F is a contraction in z), by iterating z <- F(z, c)."""
    z = torch.zeros(len(c), mapping.latent_dim) if z0 is None else z0
    with torch.no_grad():
        for _ in range(iterations):
            z = mapping(z, c)
    return z


def train_mapping(
    mapping: AuxiliaryMapping,
    latents: torch.Tensor,
    conditions: torch.Tensor,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int = 0,
    progress: Callable[[int, float], bool] | None = None,
) -> float:
    """Reconstruction training, F(z, c) -> z (MSE, Adam); returns the last 100 steps' mean loss.

    `progress(step, loss)` is called every 50 steps; returning False stops training.
    """
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(mapping.parameters(), lr=learning_rate)
    mapping.train()
    recent: list[float] = []
    for step in range(1, steps + 1):
        index = torch.randint(0, len(latents), (batch_size,), generator=generator)
        loss = torch.nn.functional.mse_loss(mapping(latents[index], conditions[index]), latents[index])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        recent = (recent + [float(loss.detach())])[-100:]
        if progress is not None and step % 50 == 0 and not progress(step, sum(recent) / len(recent)):
            break
    refresh_spectral_estimates(mapping, latents[:batch_size], conditions[:batch_size])
    return sum(recent) / max(len(recent), 1)


def refresh_spectral_estimates(mapping: AuxiliaryMapping, z: torch.Tensor, c: torch.Tensor, iterations: int = 50) -> None:
    """Run power iterations without training: the last optimiser steps leave the singular
    vector estimates a step behind the weights, which lets a layer exceed its bound slightly."""
    mapping.train()
    with torch.no_grad():
        for _ in range(iterations):
            mapping(z, c)  # each training-mode forward performs one power iteration per layer
    mapping.eval()


def surrogate_step(mapping: AuxiliaryMapping, z: torch.Tensor, c: torch.Tensor, delta_c: torch.Tensor, order: int) -> torch.Tensor:
    """One Euler step of Algorithm 1: dz = sum_{j=0..m} (dF/dz)^j dF/dc delta_c, by JVPs only."""
    term = jvp(lambda cc: mapping(z, cc), (c,), (delta_c,))[1]
    total = term
    for _ in range(order):
        term = jvp(lambda zz: mapping(zz, c), (z,), (term,))[1]
        total = total + term
    return total


@dataclass
class SGFStep:
    index: int
    latents: torch.Tensor
    condition: torch.Tensor
    distance: torch.Tensor  # per sample, |c - c1| (Euclidean over the condition vector)
    done: bool
    reason: str  # "", "target_reached", "step_limit", "diverged"


def sgf_edit(
    mapping: AuxiliaryMapping,
    measure: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    target: torch.Tensor,
    step_size: float,
    order: int,
    max_steps: int,
    tolerance: float,
    condition_mask: torch.Tensor | None = None,
    initial_condition: torch.Tensor | None = None,
):
    """Algorithm 1 as a generator of steps (the editor streams each as a frame).

    `measure(z)` returns C(G(z)) [N, k] (through the services in the editor). `condition_mask`
    [k] (1 = targeted) limits the stopping test to the targeted entries; the others are held at
    their start values by the target itself. Samples that reached the target stop moving.
    `initial_condition` saves one measurement when the caller already has C(G(z0)).
    """
    if not (np.isfinite(tolerance) and tolerance > 0 and np.isfinite(step_size) and step_size > 0):
        # NaN compares false: a NaN tolerance would stop every sample at once as "target_reached".
        raise InvalidArgument(f"tolerance ({tolerance}) and step_size ({step_size}) must be finite and > 0")
    mapping.eval()
    with torch.no_grad():
        z = z0.clone()
        c = measure(z) if initial_condition is None else initial_condition
    mask = torch.ones(c.shape[1]) if condition_mask is None else condition_mask.to(c)
    step_length = torch.linalg.vector_norm(step_size * (target - c), dim=1, keepdim=True)
    active = torch.ones(len(z), dtype=torch.bool)

    def distance(cond: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm((cond - target) * mask, dim=1)

    yield SGFStep(0, z.clone(), c.clone(), distance(c), False, "")
    for index in range(1, max_steps + 1):
        # Algorithm 1 steps by a fixed dc = lambda (c1 - c0) and stops once close to c1; with a
        # tolerance tighter than one step it can step over the target and go on forever. We
        # aim each step at the remaining gap c1 - c_i, capped at the paper's step length.
        gap_vector = target - c
        gap_length = torch.linalg.vector_norm(gap_vector, dim=1, keepdim=True).clamp(min=1e-12)
        delta_c = gap_vector * torch.clamp(step_length / gap_length, max=1.0)
        dz = surrogate_step(mapping, z, c, delta_c, order).detach()
        moved = torch.where(active[:, None], z + dz, z)
        if not torch.isfinite(moved).all() or moved.abs().max() > 1e3:
            # The last finite latents (and their condition) end the trajectory.
            yield SGFStep(index, z.clone(), c.clone(), distance(c), True, "diverged")
            return
        z = moved
        with torch.no_grad():
            c = measure(z)
        gap = distance(c)
        active = active & (gap > tolerance)
        if not active.any():
            yield SGFStep(index, z.clone(), c.clone(), gap, True, "target_reached")
            return
        yield SGFStep(index, z.clone(), c.clone(), gap, index == max_steps, "step_limit" if index == max_steps else "")


# ---- the plug-in -----------------------------------------------------------------------------


def fit_mapping(latents: np.ndarray, raw_conditions: np.ndarray, spec: MappingSpec,
                progress: Progress) -> tuple[AuxiliaryMapping, dict[str, float]]:
    """Standardise c, train F on 90% of the (z, c) pairs and measure it on the other 10%."""
    condition = spec.condition
    condition.fit(raw_conditions)
    c_all = condition.standardise(raw_conditions)
    held_out = max(1, len(latents) // 10)
    z_train, c_train = torch.from_numpy(latents[held_out:]), torch.from_numpy(c_all[held_out:])
    torch.manual_seed(spec.basics.seed)
    mapping = AuxiliaryMapping(latents.shape[1], c_all.shape[1], depth=spec.depth, hidden=spec.hidden, skip=spec.skip)

    def report(step: int, loss: float) -> bool:
        progress.check()
        progress.report("training F", 0.4 + 0.55 * step / spec.steps, {"train_loss": loss})
        return True

    loss = train_mapping(mapping, z_train, c_train, spec.steps, batch_size=spec.train_batch, learning_rate=spec.learning_rate,
                         seed=spec.basics.seed, progress=report)
    with torch.no_grad():
        z_val, c_val = torch.from_numpy(latents[:held_out]), torch.from_numpy(c_all[:held_out])
        error = float((mapping(z_val, c_val) - z_val).pow(2).sum(1).mean() / z_val.pow(2).sum(1).mean())
    return mapping, {"train_loss": loss, "reconstruction_error": error, "max_spectral_norm": max(mapping.layer_spectral_norms()),
                     "lipschitz_bound": mapping.lipschitz_bound(), "num_pairs": float(len(latents)),
                     "condition_dim": float(c_all.shape[1])}


@dataclass(frozen=True)
class PreparedMapping:
    mapping: AuxiliaryMapping
    condition: ConditionSpec
    space: str


def load_mapping(repo: ModelRepository, name: str, version: int = 0, generator: str | None = None) -> PreparedMapping:
    # An unknown name is NOT_FOUND, as for boundaries and directions (the hint says how to make one);
    # FAILED_PRECONDITION is kept for a mapping that exists but does not fit the request.
    entry = resolve_trained(repo, MAPPING_KIND, "trained SGF mapping", name, version, generator,
                            hint="; train one with a mapping job")
    mapping = mapping_from_manifest(entry)
    mapping.load_state_dict(load_tensors(entry, "mapping"))
    return PreparedMapping(mapping.eval(), ConditionSpec.from_dict(entry.manifest["condition"]), entry.manifest.get("space", "z"))


def mapping_from_manifest(entry: Entry) -> AuxiliaryMapping:
    """An untrained F shaped as the artifact says; FAILED_PRECONDITION for a format this build cannot read."""
    version = entry.manifest.get("format_version", 1)
    if version not in READABLE_FORMATS:
        raise FailedPrecondition(f"SGF mapping {entry.name!r} v{entry.version} has format_version {version!r}; this build "
                                 f"reads formats {', '.join(map(str, READABLE_FORMATS))}: retrain the mapping or update latentedit")
    config = dict(entry.manifest["config"])
    skip = float(config.pop("skip", 0.0)) if version == 2 else 0.0  # format 1: F = R(z, c)
    return AuxiliaryMapping(**config, coefficient=float(entry.manifest["coefficient"]), skip=skip)


def mapping_artifact(spec: MappingSpec, mapping: AuxiliaryMapping, metrics: dict[str, float]) -> Trained:
    """A trained F ready for the repository (`Trained.save`), self-describing: format, layout, condition."""
    b = spec.basics
    return Trained(MAPPING_KIND, b.name, b.generator, spec.space, metrics, {"mapping": "mapping.safetensors"},
                   tensors_writer("mapping.safetensors", mapping.state_dict()),
                   {"format_version": MAPPING_FORMAT, "config": mapping.config(), "coefficient": mapping.coefficient,
                    "condition": spec.condition.to_dict()},
                   PreparedMapping(mapping.eval(), spec.condition, spec.space))


TARGET_KINDS = {AttributeGoal: "attributes", KeypointGoal: "keypoints", CaptionGoal: "caption"}


class SGF(Method):
    name = "sgf"
    title = "SGF (surrogate gradient field)"
    artifact_kind = MAPPING_KIND
    jobs = ("mapping",)

    # ---- editing ----------------------------------------------------------------------------

    def edit_options(self, message, num_frames: int, limits: EditorConfig) -> SGFOptions:
        from latentedit import wire

        kind = message.WhichOneof("target")
        if kind is None:
            raise InvalidArgument("sgf.target: give attribute values, keypoints or a caption")
        if kind == "attributes":
            if not message.attributes.values:
                raise InvalidArgument("sgf.attributes.values is empty; name at least one attribute and its target value")
            check_items(len(message.attributes.values), "sgf.attributes.values", LIMITS.list_items, "list_items")
            for index, value in enumerate(message.attributes.values):
                check_finite(**{f"sgf.attributes.values[{index}].value": value.value})
                if value.attribute.index < 0:
                    raise InvalidArgument(f"sgf.attributes.values[{index}].attribute.index {value.attribute.index} is negative")
            target: tuple[AttributeGoal, ...] | KeypointGoal | CaptionGoal = tuple(AttributeGoal(v.attribute.head, v.attribute.output, v.attribute.label, v.attribute.index, float(v.value))
                           for v in message.attributes.values)
        elif kind == "keypoints":
            target = KeypointGoal(wire.from_tensor(message.keypoints.points, field="sgf.keypoints.points", dtypes=wire.FLOAT_DTYPES))
        else:
            check_text(message.caption.text, "sgf.caption.text")
            if not message.caption.text.strip():
                raise InvalidArgument("sgf.caption.text is empty; give a sentence such as 'a smiling young woman'")
            target = CaptionGoal(message.caption.text)
        check_finite(**{"sgf.step_size": message.step_size, "sgf.tolerance": message.tolerance})
        if message.neumann_order < 0:
            raise InvalidArgument(f"sgf.neumann_order {message.neumann_order} is negative; use 0..10 (0: the default, 1)")
        defaults = SGFOptions("", ())
        options = SGFOptions(message.mapping, target, message.step_size or defaults.step_size,
                             message.neumann_order if message.neumann_order > 0 else defaults.neumann_order,
                             message.max_steps or defaults.max_steps, message.tolerance or defaults.tolerance)
        if (not 0 < options.step_size <= 1 or not 0 <= options.neumann_order <= 10
                or not 1 <= options.max_steps <= limits.max_frames or options.tolerance <= 0):
            raise InvalidArgument("sgf: step_size must be in (0, 1], neumann_order in 0..10, max_steps in "
                                  f"1..{limits.max_frames}, tolerance > 0")
        return options

    def prepare(self, repo: ModelRepository, generator: GeneratorInfo, options: SGFOptions) -> PreparedMapping:
        prepared = load_mapping(repo, options.mapping, generator=generator.name)
        kind = TARGET_KINDS[type(options.target[0]) if isinstance(options.target, tuple) else type(options.target)]
        if prepared.condition.kind != kind:
            raise FailedPrecondition(f"mapping {options.mapping!r} was trained on {prepared.condition.kind} conditions; "
                                     f"the target is {kind}")
        generator.space(prepared.space)
        return prepared

    def edit(self, world: World, generator: GeneratorInfo, artifact: PreparedMapping, start: Latents, options: SGFOptions,
             frames: FrameRequest) -> Iterator[Frame]:
        """Algorithm 1: each Euler step is synthesized, scored and yielded as a frame."""
        condition = artifact.condition
        if start.space.size != artifact.mapping.latent_dim:
            raise FailedPrecondition(f"mapping {options.mapping!r} works on {artifact.mapping.latent_dim}-d latents; "
                                     f"the start latents are {start.space.describe()}")
        caption = world.embed_text([options.target.text])[0] if isinstance(options.target, CaptionGoal) else None
        heads = list(dict.fromkeys([*condition.heads, *frames.heads]))
        last: dict = {}

        def measure(z: torch.Tensor) -> torch.Tensor:
            latents = start.replace(z.numpy())
            images = world.synthesize(generator, latents)
            scores = world.score(images, heads)
            last.update(images=images, scores=scores, raw=condition.raw(scores))
            return torch.from_numpy(condition.standardise(last["raw"]))

        z0 = torch.from_numpy(start.flat().copy())
        first = measure(z0)
        target_raw, mask = self.target(options.target, condition, last["raw"], caption)
        target = torch.from_numpy(condition.standardise(target_raw))
        steps = sgf_edit(artifact.mapping, measure, z0, target, options.step_size, options.neumann_order, options.max_steps,
                         options.tolerance, torch.from_numpy(mask), first)
        stops = {"target_reached": TARGET_REACHED, "diverged": DIVERGED, "step_limit": STEP_LIMIT}
        for step in steps:
            metrics = {"distance_to_target": float(step.distance.mean()),
                       "reached": float((step.distance <= options.tolerance).float().mean())}
            yield Frame(step.index, start.replace(step.latents.numpy()), last["images"] if frames.images else None,
                        requested(last["scores"], frames), metrics, stops.get(step.reason, STEP_LIMIT) if step.done else "")

    @staticmethod
    def target(goal, condition: ConditionSpec, current_raw: np.ndarray, caption: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Target condition (raw units) per sample and the mask of the entries that are targeted."""
        n = len(current_raw)
        target = current_raw.copy()
        mask = np.zeros(current_raw.shape[1], np.float32)
        if isinstance(goal, tuple):
            names = [a.name for a in condition.attributes]
            for value in goal:
                # A scalar attribute has no index: only index 0 (unset) names it.
                matches = [i for i, a in enumerate(condition.attributes) if a.head == value.head and a.output == value.output
                           and (a.label == value.label if value.label else value.index == (a.index or 0))]
                if not matches and not value.label and any(a.head == value.head and a.output == value.output and a.index is None
                                                           for a in condition.attributes):
                    raise InvalidArgument(f"attribute.index {value.index}: {value.head}.{value.output} is a scalar; leave index at 0")
                if not matches:
                    label = f".{value.label}" if value.label else ""
                    raise NotFound(f"attribute {value.head}.{value.output}{label} is not one the mapping was trained on; "
                                   f"attributes: {', '.join(names)}")
                target[:, matches[0]] = np.broadcast_to(np.asarray(value.value, np.float32), (n,))
                mask[matches[0]] = 1.0
            return target, mask
        if isinstance(goal, KeypointGoal):
            points, count = goal.points, current_raw.shape[1] // 2
            if points.ndim == 2:
                points = np.broadcast_to(points, (n, *points.shape))
            if points.ndim != 3 or points.shape[1:] != (count, 2) or points.shape[0] != n:
                raise InvalidArgument(f"sgf.keypoints.points: shape {list(goal.points.shape)}; this mapping needs [{count}, 2] or "
                                      f"[N={n}, {count}, 2] points in image pixels")
            return (points / condition.image_size).reshape(n, -1).astype(np.float32), np.ones_like(mask)
        if caption is None:
            raise InvalidArgument("a caption target needs the caption's embedding")
        return np.broadcast_to(caption, current_raw.shape).astype(np.float32), np.ones_like(mask)

    # ---- training ---------------------------------------------------------------------------

    def job_spec(self, kind: str, message, world: World, repo: ModelRepository) -> MappingSpec:
        from latentedit.api.v1 import trainer_pb2
        from latentedit.wire import space_name

        if kind != "mapping":
            return super().job_spec(kind, message, world, repo)
        heads = world.heads()
        schemas = {h.name: h for h in heads}
        basics = job_basics(world, message.generator, message.options,
                            lambda g: f"{g.name}-sgf-{trainer_pb2.ConditionKind.Name(message.condition).removeprefix('CONDITION_KIND_')}")
        if message.condition == trainer_pb2.CONDITION_KIND_ATTRIBUTES:
            if not message.attributes:
                raise InvalidArgument("attributes: an ATTRIBUTES mapping needs at least one attribute")
            check_items(len(message.attributes), "attributes", LIMITS.list_items, "list_items")
            condition = ConditionSpec("attributes", [resolve_attribute(a, heads, f"attributes[{i}]") for i, a in enumerate(message.attributes)])
        elif message.condition == trainer_pb2.CONDITION_KIND_KEYPOINTS:
            head = schemas.get(message.keypoints_head)
            if head is None or "points" not in {o.name for o in head.outputs}:
                keypoint_heads = [h.name for h in heads if "points" in {o.name for o in h.outputs}]
                raise NotFound(f"keypoints_head {message.keypoints_head!r} is not a keypoint head; keypoint heads: {', '.join(keypoint_heads)}")
            condition = ConditionSpec("keypoints", keypoints_head=message.keypoints_head, image_size=basics.generator.spec.resolution)
        elif message.condition == trainer_pb2.CONDITION_KIND_CAPTION:
            if "caption" not in schemas:
                raise FailedPrecondition("the scorer has no caption head")
            condition = ConditionSpec("caption")
        else:
            raise InvalidArgument("condition: choose CONDITION_KIND_ATTRIBUTES, _KEYPOINTS or _CAPTION")
        defaults = MappingSpec(basics, condition)
        num = check_count(message.num_pairs or defaults.num_pairs, "num_pairs", high=LIMITS.mapping_pairs, limit="mapping_pairs")
        depth, hidden = message.depth or defaults.depth, message.hidden_dim or defaults.hidden
        check_range(depth, "depth", 2, LIMITS.mapping_depth, "mapping_depth")
        check_range(hidden, "hidden_dim", 8, LIMITS.mapping_width, "mapping_width")
        steps = message.options.steps or defaults.steps
        rate = message.options.learning_rate or defaults.learning_rate
        check_finite(**{"options.learning_rate": rate})
        check_range(steps, "options.steps", 1, LIMITS.training_steps, "training_steps")
        if not 0 < rate <= 1:
            raise InvalidArgument(f"options.learning_rate {rate:g} must be in (0, 1]")
        space = basics.generator.space(space_name(message.space)).space
        return MappingSpec(basics, condition, space, num, depth, hidden, steps, rate, defaults.train_batch, defaults.skip)

    def train(self, world: World, spec: MappingSpec, progress: Progress) -> Trained:
        b = spec.basics
        latents, raw = [], []
        for index, start, count in batches(spec.num_pairs, b.batch_size):
            progress.check()
            z = world.sample(b.generator, count, batch_seed(b.seed, index), spec.space)
            latents.append(z.flat())
            raw.append(spec.condition.raw(world.score(world.synthesize(b.generator, z), spec.condition.heads)))
            progress.report("building (z, c) pairs", 0.4 * (start + count) / spec.num_pairs, message=f"{start + count}/{spec.num_pairs} pairs")
        mapping, metrics = fit_mapping(np.concatenate(latents), np.concatenate(raw), spec, progress)
        progress.report("writing the mapping", 0.98, metrics)
        return mapping_artifact(spec, mapping, metrics)

    def describe(self, entry: Entry) -> Editable:
        editable = super().describe(entry)
        condition = ConditionSpec.from_dict(entry.manifest.get("condition", {"kind": "attributes"}))
        return Editable(**{**editable.__dict__, "attributes": tuple(condition.attributes), "condition": condition.kind})

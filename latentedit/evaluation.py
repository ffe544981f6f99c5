"""Manipulation Disentanglement Score (SGF paper, section 4.4.1) for every edit method we serve.

For a target attribute, each method edits N samples at increasing strengths. At each strength:
- accuracy: share of samples whose attribute crossed to the other side of its median (the
  direction is reversed for samples already above it, as in the paper, so every sample counts);
- disentanglement: mean over samples of 1 - n_i / (M - 1), where n_i counts the other
  attributes whose score moved by more than that attribute's threshold. The paper uses 0.5
  on probabilities; our heads have other scales, so the threshold of an attribute is half its
  5-95% range over the training samples (0.5 x (q95 - q5); about 0.45 for a probability).
The (accuracy, disentanglement) points form the curve, starting at (0, 1) for no edit; the
MDS is its area, with no credit beyond the largest accuracy a method reaches.

Methods: InterFaceGAN, InterFaceGAN conditioned on all the other attributes, a GANSpace-style
PCA direction (`methods.ganspace`), and SGF with the other attributes held. Each is fitted
with its method module's own recipe on one shared scored sample, and every edit runs the
method's served `edit` on a `LocalWorld`: what is measured here is what the editor serves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from latentedit.attributes import Attribute
from latentedit.conditions import ConditionSpec
from latentedit.errors import InvalidArgument
from latentedit.latents import Latents
from latentedit.limits import LIMITS
from latentedit.methods import interfacegan as ifg
from latentedit.methods.base import Frame, FrameRequest, JobBasics, QuietProgress
from latentedit.methods.dplase import (
    DirectionSpec,
    DiscoveryOptions,
    DPLaSE,
    default_layer,
    linear_walk,
    norm_preserving_walk,
)
from latentedit.methods.ganspace import (
    GANSpace,
    GANSpaceOptions,
    PCADirections,
    first_layer_matrix,
    pca_directions,
    sefa_directions,
)
from latentedit.methods.sgf import SGF, AttributeGoal, MappingSpec, PreparedMapping, SGFOptions, fit_mapping
from latentedit.world import GeneratorInfo, LocalWorld

DEFAULT_ATTRIBUTES = {
    "smile": Attribute("expression", "probabilities", 3, "happy"),
    "yaw": Attribute("pose", "yaw", None),
    "mouth-open": Attribute("pose", "mouth_openness", None),
    "male": Attribute("age_gender", "male_probability", None),
    "pitch": Attribute("pose", "pitch", None),
    "age": Attribute("age_gender", "age", None),
}
METHODS = ("InterFaceGAN", "InterFaceGAN conditional", "GANSpace PCA", "SGF")
# SGF's step limit in this evaluation (the served default is 20): enough to reach every strength here.
SGF_EVAL_STEPS = 10


@dataclass
class MDSResult:
    attribute: str
    method: str
    points: list[tuple[float, float]]  # (accuracy, disentanglement) by strength
    mds: float


def area_under_curve(points: list[tuple[float, float]]) -> float:
    """Trapezoids from (0, 1) through the points sorted by accuracy; nothing beyond the last accuracy."""
    curve = sorted([(0.0, 1.0), *points])
    area = 0.0
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        area += (x1 - x0) * (y0 + y1) / 2
    return float(area)


def attribute_matrix(scores, attributes: dict[str, Attribute]) -> np.ndarray:
    """Scores {head: {output: array}} -> [N, M] values of the named attributes."""
    return np.stack([a.extract(scores) for a in attributes.values()], axis=1).astype(np.float32)


def check_mds_settings(attributes: dict[str, Attribute], targets: list[str], num_train: int, num_test: int,
                       sgf_steps: int) -> None:
    """Every check `run_mds` needs, before any model is loaded (the CLI calls it first)."""
    unknown = [t for t in targets if t not in attributes]
    if unknown or not targets:
        raise InvalidArgument(f"attributes: unknown or none {unknown}; known: {', '.join(attributes)}")
    if not 100 <= num_train <= LIMITS.mapping_pairs:
        raise InvalidArgument(f"train {num_train} must be in 100..{LIMITS.mapping_pairs} (boundaries, PCA and F fit on them)")
    if not 1 <= num_test <= 100_000:
        raise InvalidArgument(f"samples {num_test} must be in 1..100000 (test samples per attribute)")
    if not 1 <= sgf_steps <= LIMITS.training_steps:
        raise InvalidArgument(f"sgf_steps {sgf_steps} must be in 1..{LIMITS.training_steps}")


def run_mds(
    world: LocalWorld,
    generator: GeneratorInfo,
    attributes: dict[str, Attribute],
    targets: list[str],
    num_train: int = 2000,
    num_test: int = 100,
    strengths: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0),
    sgf_steps: int = 2000,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[list[MDSResult], dict[str, float]]:
    check_mds_settings(attributes, targets, num_train, num_test, sgf_steps)
    names = list(attributes)
    heads = tuple(sorted({a.head for a in attributes.values()}))
    frames = FrameRequest(heads, images=False)
    z_train = world.sample(generator, num_train, seed)
    log(f"scoring {num_train} training samples on {len(names)} attributes")
    s_train = attribute_matrix(world.score(world.synthesize(generator, z_train), heads), attributes)
    medians = np.median(s_train, axis=0)
    thresholds = 0.5 * (np.quantile(s_train, 0.95, axis=0) - np.quantile(s_train, 0.05, axis=0))

    log("fitting InterFaceGAN boundaries")
    boundaries = {name: ifg.boundary_from_scores(z_train.flat(), s_train[:, i], seed=seed).boundary for i, name in enumerate(names)}

    layer = generator.spec.layers[1].name
    log(f"GANSpace: PCA of {layer} features")
    components, _ = pca_directions(z_train.flat(), world.features(generator, z_train, [layer])[layer], 10)
    pca_for = {}
    for i, name in enumerate(names):
        projections = z_train.flat() @ components.T
        correlation = [np.corrcoef(projections[:, k], s_train[:, i])[0, 1] for k in range(len(components))]
        best = int(np.nanargmax(np.abs(correlation)))
        pca_for[name] = components[best] * np.sign(correlation[best])

    log(f"SGF: training F on {num_train} (z, c) pairs of all {len(names)} attributes")
    spec = MappingSpec(JobBasics(generator, "mds", seed), ConditionSpec("attributes", list(attributes.values())),
                       z_train.space.space, num_train, steps=sgf_steps)
    mapping, _ = fit_mapping(z_train.flat(), s_train, spec, QuietProgress())
    sgf_mapping = PreparedMapping(mapping, spec.condition, spec.space)

    results = []
    for target in targets:
        a = names.index(target)
        z0 = world.sample(generator, num_test, seed + 1000 + a)
        s0 = attribute_matrix(world.score(world.synthesize(generator, z0), heads), attributes)
        up = s0[:, a] <= medians[a]  # push every sample across its median: up from below, down from above
        others = [i for i in range(len(names)) if i != a]

        def evaluate(s1: np.ndarray) -> tuple[float, float]:
            crossed = np.where(up, s1[:, a] > medians[a], s1[:, a] <= medians[a])
            changed = (np.abs(s1[:, others] - s0[:, others]) > thresholds[others]).sum(axis=1)
            return float(crossed.mean()), float(np.mean(1 - changed / (len(names) - 1)))

        def linear_edit(edit_at: Callable[[Latents, float], Iterable[Frame]], strength: float) -> np.ndarray:
            """[N, M] scores after moving each sample `strength` toward the other side (two groups, two signs)."""
            s1 = np.empty_like(s0)
            for group, sign in ((up, 1.0), (~up, -1.0)):
                if group.any():
                    (frame,) = list(edit_at(z0.take(group), sign * strength))
                    s1[group] = attribute_matrix(frame.scores, attributes)
            return s1

        normal = boundaries[target]
        conditioned = ifg.PreparedBoundaries(normal, tuple((names[i], boundaries[names[i]]) for i in others), z0.space.space)
        plain = ifg.PreparedBoundaries(normal, (), z0.space.space)
        pca = PCADirections(pca_for[target][None, :].astype(np.float32), np.ones(1, np.float32), z0.space.space)
        editors = {
            "InterFaceGAN": lambda start, d: ifg.InterFaceGAN().edit(
                world, generator, plain, start, ifg.InterFaceGANOptions(target, (), d, d, 1), frames),
            "InterFaceGAN conditional": lambda start, d: ifg.InterFaceGAN().edit(
                world, generator, conditioned, start, ifg.InterFaceGANOptions(target, (), d, d, 1), frames),
            "GANSpace PCA": lambda start, d: GANSpace().edit(
                world, generator, pca, start, GANSpaceOptions(target, 0, d, d, 1), frames),
        }
        for method, edit_at in editors.items():
            points = [evaluate(linear_edit(edit_at, s)) for s in strengths]
            results.append(MDSResult(target, method, points, area_under_curve(points)))
            log(f"{target:10s} {method:26s} MDS {results[-1].mds:.3f}  {[(round(x, 2), round(y, 2)) for x, y in points]}")
        points = []
        attribute = attributes[target]
        assert spec.condition.std is not None  # set by fit_mapping
        std = spec.condition.std[a]
        for s in strengths:
            # Target: the attribute moved by s standard deviations, the others held at their values.
            goal = AttributeGoal(attribute.head, attribute.output, attribute.label, attribute.index or 0,
                                 s0[:, a] + np.where(up, 1.0, -1.0) * s * std)
            options = SGFOptions(target, (goal,), max_steps=SGF_EVAL_STEPS)
            *_, last = SGF().edit(world, generator, sgf_mapping, z0, options, frames)
            points.append(evaluate(attribute_matrix(last.scores, attributes)))
        results.append(MDSResult(target, "SGF", points, area_under_curve(points)))
        log(f"{target:10s} {'SGF':26s} MDS {results[-1].mds:.3f}  {[(round(x, 2), round(y, 2)) for x, y in points]}")
    return results, {n: float(t) for n, t in zip(names, thresholds)}


def plot_curves(results: list[MDSResult], path) -> None:
    """Accuracy-disentanglement curves, one panel per attribute, as a PNG (Pillow only)."""
    from PIL import Image, ImageDraw

    attributes = list(dict.fromkeys(r.attribute for r in results))
    colours = {"InterFaceGAN": (31, 119, 180), "InterFaceGAN conditional": (255, 127, 14), "GANSpace PCA": (44, 160, 44), "SGF": (214, 39, 40)}
    size, pad = 260, 40
    image = Image.new("RGB", (len(attributes) * (size + pad) + pad, size + 2 * pad + 70), "white")
    draw = ImageDraw.Draw(image)
    for panel, attribute in enumerate(attributes):
        left, top = pad + panel * (size + pad), pad
        draw.rectangle([left, top, left + size, top + size], outline="black")
        draw.text((left, top - 14), f"{attribute}: accuracy (x) vs disentanglement (y)", fill="black")
        for tick in (0.0, 0.5, 1.0):
            draw.text((left + tick * size - 6, top + size + 4), f"{tick:.1f}", fill="black")
            draw.text((left - 26, top + size - tick * size - 6), f"{tick:.1f}", fill="black")
        for r in results:
            if r.attribute != attribute:
                continue
            curve = sorted([(0.0, 1.0), *r.points])
            xy = [(left + x * size, top + size - y * size) for x, y in curve]
            draw.line(xy, fill=colours.get(r.method, (0, 0, 0)), width=2)
            for x, y in xy[1:]:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colours.get(r.method, (0, 0, 0)))
    for i, (method, colour) in enumerate(colours.items()):
        x = pad + i * 200
        draw.rectangle([x, size + 2 * pad + 30, x + 14, size + 2 * pad + 44], fill=colour)
        draw.text((x + 20, size + 2 * pad + 31), method, fill="black")
    image.save(path)


# ---- DP-LaSE: Table 1 (random walks with and without density preservation) and Fig. 10 -------
#
# Table 1 of the paper (Li et al., ACM MM 2021) moves random latents along random directions by
# strides eps and measures the quality of what comes out (FID, IS on ImageNet). Here, per stride,
# direction set and walk, N walked samples are compared with N fresh ones by the Frechet distance
# between features of a shipped network (`FEATURE_NETWORKS`), and the quality head says which
# share still looks like a face: accepted when face_probability reaches the 5th percentile of
# fresh samples' (so about 95% of fresh faces pass by construction). Walks with density
# preservation rescale to the start's norm (eq. 2: the Z prior is N(0, I)); without, z0 + eps *
# gamma (eq. 1). Directions: random unit vectors (one per start), and directions a DP-LaSE job
# trains in-process (start i walks along direction i mod k, the sign alternating).
#
# Fig. 10 compares the perceptual distance between start and walked image against the stride
# for DP-LaSE, GANSpace-style PCA (same layer) and SeFa directions: LPIPS in the paper; here
# 1 - MS-SSIM (ours, `ms_ssim`) and the distance between dlib face descriptors (identity head).

DPLASE_WALKS = {False: "linear (w/o DP)", True: "norm-preserving (w/ DP)"}
FEATURE_NETWORKS = {
    "expression": "the scorer's expression network (fer mini-Xception): its 128 penultimate channels, averaged "
                  "over positions",
    "identity": "the scorer's identity head: dlib's 128-d face descriptor (ResNet on the 68-landmark alignment)",
}
# MS-SSIM's scale weights (Wang, Simoncelli & Bovik 2003), finest first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


@dataclass(frozen=True)
class DPLaSEEvalSettings:
    """What `run_dplase_table` measures and how much (defaults: `latentedit eval dplase`'s)."""

    samples: int = 1000  # walked samples per cell, and fresh samples, for the Frechet distance
    quality_samples: int = 200  # of those, how many the quality head scores (MTCNN: ~0.15 s per image)
    strides: tuple[float, ...] = (0.0, 2.0, 4.0, 6.0, 8.0, 10.0)
    num_directions: int = 10
    steps: int = 200  # DP-LaSE training steps (eq. 11)
    batch_size: int = 8
    layer: str = ""  # G1/G2 split for DP-LaSE and PCA; "": the paper's (third intermediate layer)
    features: str = "expression"  # a FEATURE_NETWORKS key
    curve_samples: int = 64  # starts per Fig. 10 curve; 0 skips Fig. 10
    pca_samples: int = 1000
    naming_samples: int = 2  # starts per direction the job scores to name it (all heads: slow)
    seed: int = 0


@dataclass
class WalkCell:
    """One cell of Table 1."""

    directions: str  # "random" or "DP-LaSE"
    density_preserving: bool
    stride: float
    frechet: float
    accepted: float  # share of scored walked images with face_probability >= the fresh threshold
    detected: float  # share in which MTCNN found a face at all (face_probability > 0)
    mean_norm: float  # mean |z| of the walked latents (the prior's is about sqrt(d))


@dataclass
class DistanceCurve:
    """One line of Fig. 10: mean perceptual distance between start and walked image per stride."""

    method: str  # "DP-LaSE", "GANSpace PCA" or "SeFa"
    density_preserving: bool
    strides: list[float]
    ms_ssim_distance: list[float]  # mean 1 - MS-SSIM
    identity_distance: list[float]  # mean Euclidean distance of dlib descriptors (same person: < 0.6)


@dataclass
class DPLaSETable:
    settings: DPLaSEEvalSettings
    layer: str
    cells: list[WalkCell]
    curves: list[DistanceCurve]
    threshold: float  # face_probability a walked image needs to count as accepted
    training_metrics: dict[str, float]
    direction_names: list[str]  # per DP-LaSE direction: the attribute it moves most (scorer)
    seconds: dict[str, float]

    def cell(self, directions: str, density_preserving: bool, stride: float) -> WalkCell:
        return next(c for c in self.cells if (c.directions, c.density_preserving, c.stride) ==
                    (directions, density_preserving, stride))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of features a [N, F], b [M, F] (FID's formula)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr (S_a S_b)^1/2 = Tr (S_a^1/2 S_b S_a^1/2)^1/2: symmetric, so its eigenvalues are real.
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def ms_ssim_scales(height: int, width: int, window: int = 11) -> int:
    """How many MS-SSIM scales fit: the coarsest must still hold one window (64 px: 3, 256 px: 5)."""
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and min(height, width) // 2**scales >= window:
        scales += 1
    return scales


def ms_ssim(a: np.ndarray, b: np.ndarray, scales: int | None = None, window: int = 11, sigma: float = 1.5) -> np.ndarray:
    """MS-SSIM per image pair of uint8 [N, H, W, C] images -> [N] (1: identical).

    Gaussian window (11, sigma 1.5), no padding, K = (0.01, 0.03), 2x2 average pooling between
    scales; contrast-structure terms at every scale, luminance at the coarsest, channels
    averaged. With fewer than 5 scales the first weights are renormalised to sum to 1. Negative
    terms count as 0 (their fractional powers are undefined)."""
    scales = scales or ms_ssim_scales(a.shape[1], a.shape[2], window)
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float64)
    weights = weights / weights.sum()
    x = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).double()
    y = torch.from_numpy(np.ascontiguousarray(b)).permute(0, 3, 1, 2).double()
    channels = x.shape[1]
    taps = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    gauss = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = (gauss[:, None] * gauss[None, :] / gauss.sum() ** 2).expand(channels, 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=channels)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    terms = []
    for scale in range(scales):
        mu_x, mu_y = blur(x), blur(y)
        var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
        contrast = (2 * cov + c2) / (var_x + var_y + c2)
        if scale == scales - 1:
            luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
            terms.append((luminance * contrast).mean(dim=(2, 3)))
        else:
            terms.append(contrast.mean(dim=(2, 3)))
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    stacked = torch.stack(terms).clamp_min(0)  # [scales, N, C]
    return torch.prod(stacked ** weights[:, None, None], dim=0).mean(1).numpy()


def image_features(world: LocalWorld, images: np.ndarray, network: str) -> np.ndarray:
    """[N, 128] features of uint8 images from a FEATURE_NETWORKS entry."""
    if network == "identity":
        return world.score(images, ["identity"])["identity"]["embedding"]
    from latentedit.models.expression import EmotionNet, rgb_to_model_input

    head = world.scorer.heads.get("expression")
    net = getattr(head, "models", {}).get("network")
    if not isinstance(net, EmotionNet):
        raise InvalidArgument("features 'expression' need the default expression head (fer mini-Xception); "
                              "this scorer's has another network")
    captured: list[torch.Tensor] = []
    # The classifier's input is the penultimate layer [N, 128, h, w]; a hook reads it unchanged.
    hook = net.classifier.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].mean(dim=(2, 3))))
    try:
        with torch.inference_mode():
            for start in range(0, len(images), 256):
                chunk = torch.from_numpy(np.ascontiguousarray(images[start:start + 256])).permute(0, 3, 1, 2).float()
                net.logits(rgb_to_model_input(chunk))
    finally:
        hook.remove()
    return torch.cat(captured).numpy()


class _StepLog(QuietProgress):
    """QuietProgress that also logs every tenth of a long phase (training runs for minutes)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        super().__init__(log)
        self._tenth = -1

    def report(self, phase: str, fraction: float, metrics: dict[str, float] | None = None, message: str = "") -> None:
        if phase != self._phase:
            self._tenth = -1
        super().report(phase, fraction, metrics, message)
        tenth = int(fraction * 10)
        if tenth > self._tenth and self.log is not None:
            self._tenth = tenth
            shown = ", ".join(f"{k} {v:.3g}" for k, v in (metrics or {}).items())
            self.log(f"  {phase}: {fraction:.0%}" + (f" ({shown})" if shown else ""))


def check_dplase_settings(world: LocalWorld, generator: GeneratorInfo, settings: DPLaSEEvalSettings) -> str:
    """Every check `run_dplase_table` needs, before any work; returns the layer to split at."""
    s = settings
    if s.samples < 8:
        raise InvalidArgument(f"samples {s.samples} must be >= 8 (the Frechet distance needs covariances; 1000 for figures)")
    if not 1 <= s.quality_samples <= s.samples:
        raise InvalidArgument(f"quality_samples {s.quality_samples} must be in 1..samples ({s.samples})")
    if not s.strides or 0.0 not in s.strides or len(set(s.strides)) != len(s.strides):
        raise InvalidArgument(f"strides {list(s.strides)} must be distinct and include 0 (the fresh-sample row)")
    if not all(np.isfinite(x) and 0 <= x <= 1000 for x in s.strides):
        raise InvalidArgument(f"strides {list(s.strides)} must be finite and in 0..1000")
    if s.features not in FEATURE_NETWORKS:
        raise InvalidArgument(f"features {s.features!r}: one of {', '.join(FEATURE_NETWORKS)}")
    if not 1 <= s.steps <= 1_000_000 or not 1 <= s.batch_size <= 1024:
        raise InvalidArgument(f"steps {s.steps} must be in 1..1000000 and batch_size {s.batch_size} in 1..1024")
    if s.curve_samples < 0 or not 2 <= s.naming_samples <= 1024 or s.seed < 0:
        raise InvalidArgument(f"curve_samples {s.curve_samples} must be >= 0, naming_samples {s.naming_samples} in "
                              f"2..1024 and seed {s.seed} >= 0")
    space = generator.space()
    if space.prior != "normal":
        raise InvalidArgument(f"{generator.name}'s default space {space.space} has no N(0, I) prior: the norm-preserving "
                              "walk (eq. 2) needs one")
    if not 1 <= s.num_directions <= space.size:
        raise InvalidArgument(f"num_directions {s.num_directions} must be in 1..{space.size}")
    if not s.num_directions <= s.pca_samples <= 100_000:
        raise InvalidArgument(f"pca_samples {s.pca_samples} must be in num_directions ({s.num_directions})..100000")
    layers = [layer.name for layer in generator.spec.layers[1:-1]]
    layer = s.layer or default_layer(generator)
    if layer not in layers:
        raise InvalidArgument(f"layer {layer!r}: G1/G2 must split at an intermediate layer; layers: {', '.join(layers)}")
    return layer


def run_dplase_table(
    world: LocalWorld,
    generator: GeneratorInfo,
    settings: DPLaSEEvalSettings = DPLaSEEvalSettings(),
    log: Callable[[str], None] = print,
) -> DPLaSETable:
    s = settings
    layer = check_dplase_settings(world, generator, s)
    needed = {"quality", s.features} | ({"identity"} if s.curve_samples else set())
    available = {head.name for head in world.heads()}
    if needed - available:
        raise InvalidArgument(f"the scorer lacks head(s) {sorted(needed - available)}; it has {', '.join(sorted(available))}")
    space = generator.space()
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def measure(latents: Latents, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(features [N, F], face_probability [quality_samples], images [N]) of latents."""
        images = world.synthesize(generator, latents)
        features = image_features(world, images, s.features)
        quality = world.score(images[: s.quality_samples], ["quality"])["quality"]["face_probability"]
        log(f"  {what}: {len(images)} images, {s.quality_samples} scored for quality ({time.perf_counter() - clock:.0f} s)")
        return features, quality, images

    log(f"training DP-LaSE directions in-process: {s.num_directions} directions at {layer}, {s.steps} steps of "
        f"batch {s.batch_size}, seed {s.seed}")
    spec = DirectionSpec(JobBasics(generator, "eval-dplase", s.seed, s.batch_size), layer, space.space,
                         DiscoveryOptions(num_directions=s.num_directions, steps=s.steps, batch_size=s.batch_size,
                                          seed=s.seed),
                         num_channel_subspaces=0, naming_samples=s.naming_samples)
    trained = DPLaSE().train(world, spec, _StepLog(log))
    dplase_directions = trained.value.directions
    names = []
    for index in range(len(dplase_directions)):
        mine = [n for n in trained.value.names if n.index == index]
        names.append(max(mine, key=lambda n: abs(n.correlation)).summary() if mine else "-")
    seconds["training"] = time.perf_counter() - clock

    log(f"fresh samples (seed {s.seed + 1}) and starts (seed {s.seed}), {s.features} features")
    fresh_features, fresh_quality, _ = measure(world.sample(generator, s.samples, s.seed + 1), "fresh")
    # The 5th percentile of fresh faces' face_probability: a walked image "still looks like a face"
    # when it reaches it. The starts (stride 0) are an independent check of the ~95%.
    threshold = float(np.quantile(fresh_quality, 0.05))
    starts = world.sample(generator, s.samples, s.seed)
    z0 = torch.from_numpy(starts.flat())
    rng = np.random.default_rng(s.seed + 2)
    random_directions = rng.standard_normal(z0.shape).astype(np.float32)
    random_directions /= np.linalg.norm(random_directions, axis=1, keepdims=True)
    rows = np.arange(len(z0))
    signs = np.where((rows // len(dplase_directions)) % 2 == 0, 1.0, -1.0).astype(np.float32)[:, None]
    direction_sets = {"random": random_directions,
                      "DP-LaSE": dplase_directions[rows % len(dplase_directions)] * signs}

    def cell(name: str, preserving: bool, stride: float, latents: Latents, measured) -> WalkCell:
        features, quality, _ = measured
        return WalkCell(name, preserving, stride, frechet_distance(features, fresh_features),
                        float((quality >= threshold).mean()), float((quality > 0).mean()),
                        float(np.linalg.norm(latents.flat(), axis=1).mean()))

    # Both walks are the identity at stride 0, so that column is measured once: the starts.
    start_measured = measure(starts, "stride 0 (the starts)")
    cells = [cell(name, preserving, 0.0, starts, start_measured) for name in direction_sets for preserving in (False, True)]
    walked_strides = [x for x in s.strides if x != 0]
    total = len(walked_strides) * len(direction_sets) * 2
    for name, directions in direction_sets.items():
        for preserving in (False, True):
            walker = norm_preserving_walk if preserving else linear_walk
            for stride in walked_strides:
                with torch.no_grad():
                    moved = walker(z0, torch.from_numpy(directions), torch.full((len(z0),), float(stride))).numpy()
                latents = starts.replace(moved)
                log(f"cell {len(cells) - 3}/{total}: {name} directions, {DPLASE_WALKS[preserving]}, stride {stride:g}")
                cells.append(cell(name, preserving, stride, latents, measure(latents, "walked")))
                log(f"  Frechet {cells[-1].frechet:.3g}, accepted {cells[-1].accepted:.0%}, detected {cells[-1].detected:.0%}")
    cells.sort(key=lambda c: (list(direction_sets).index(c.directions), c.density_preserving, c.stride))
    seconds["table"] = time.perf_counter() - clock - seconds["training"]

    curves: list[DistanceCurve] = []
    if s.curve_samples:
        log(f"Fig. 10: PCA of {layer} features over {s.pca_samples} samples; SeFa on the first layer's weights")
        z_pca = world.sample(generator, s.pca_samples, s.seed + 4)
        pca, _ = pca_directions(z_pca.flat(), world.features(generator, z_pca, [layer])[layer], s.num_directions)
        matrix = first_layer_matrix(world.generator_module(generator))
        if matrix.shape[1] != space.size:
            raise InvalidArgument(f"{generator.name}'s first layer reads {matrix.shape[1]} values, not its "
                                  f"{space.space} ({space.size}); SeFa needs the layer that reads the latent")
        sefa, _ = sefa_directions(matrix, s.num_directions)
        curve_starts = world.sample(generator, s.curve_samples, s.seed + 3)
        c0 = torch.from_numpy(curve_starts.flat())
        start_images = world.synthesize(generator, curve_starts)
        start_identity = world.score(start_images, ["identity"])["identity"]["embedding"]
        for method, found in (("DP-LaSE", dplase_directions), ("GANSpace PCA", pca), ("SeFa", sefa)):
            per_start = torch.from_numpy(np.ascontiguousarray(found[np.arange(len(c0)) % len(found)]))
            for preserving in (False, True):
                walker = norm_preserving_walk if preserving else linear_walk
                ms, ident = [], []
                for stride in s.strides:
                    with torch.no_grad():
                        moved = walker(c0, per_start, torch.full((len(c0),), float(stride))).numpy()
                    images = world.synthesize(generator, curve_starts.replace(moved))
                    embedding = world.score(images, ["identity"])["identity"]["embedding"]
                    ms.append(float(np.mean(1 - ms_ssim(start_images, images))))
                    ident.append(float(np.linalg.norm(embedding - start_identity, axis=1).mean()))
                curves.append(DistanceCurve(method, preserving, list(s.strides), ms, ident))
                log(f"  {method}, {DPLASE_WALKS[preserving]}: 1 - MS-SSIM {[round(v, 3) for v in ms]}, "
                    f"identity distance {[round(v, 3) for v in ident]} ({time.perf_counter() - clock:.0f} s)")
        seconds["curves"] = time.perf_counter() - clock - seconds["training"] - seconds["table"]
    return DPLaSETable(s, layer, cells, curves, threshold, trained.metrics, names, seconds)


def dplase_markdown(table: DPLaSETable) -> str:
    """Table 1 (Frechet distance, accepted and detected shares) and Fig. 10 (curves) as Markdown."""
    s = table.settings
    header = "| directions | walk | " + " | ".join(f"eps={x:g}" for x in s.strides) + " |"
    rule = "|---|---|" + "---|" * len(s.strides)

    def rows(value: Callable[[WalkCell], str]) -> list[str]:
        out = []
        for name in dict.fromkeys(c.directions for c in table.cells):
            for preserving in (False, True):
                values = [value(table.cell(name, preserving, x)) for x in s.strides]
                out.append(f"| {name} | {DPLASE_WALKS[preserving]} | " + " | ".join(values) + " |")
        return out

    lines = [f"Frechet distance to {s.samples} fresh samples ({s.features} features, {s.samples} walked per cell):", "",
             header, rule, *rows(lambda c: f"{c.frechet:.3f}"), "",
             f"Faces accepted by the quality head (face_probability >= {table.threshold:.3f}, the 5th percentile of "
             f"fresh faces; {s.quality_samples} scored per cell), with MTCNN's own detection rate in brackets:", "",
             header, rule, *rows(lambda c: f"{c.accepted:.0%} ({c.detected:.0%})"), "",
             "Mean latent norm |z| of the walked samples (the prior's: about sqrt(d)):", "",
             header, rule, *rows(lambda c: f"{c.mean_norm:.1f}")]
    if table.curves:
        for title, pick in (("1 - MS-SSIM", lambda c: c.ms_ssim_distance), ("identity distance", lambda c: c.identity_distance)):
            lines += ["", f"Fig. 10: mean {title} between start and walked image ({s.curve_samples} starts, start i along direction i mod {s.num_directions}):", "",
                      header, rule]
            lines += [f"| {c.method} | {DPLASE_WALKS[c.density_preserving]} | " + " | ".join(f"{v:.3f}" for v in pick(c)) + " |"
                      for c in table.curves]
    lines += ["", "DP-LaSE directions (the scorer attribute each moves most, Pearson r of stride vs change): " +
              "; ".join(f"{i}: {n}" for i, n in enumerate(table.direction_names)),
              "Training: " + ", ".join(f"{k} {v:.3g}" for k, v in table.training_metrics.items()),
              "Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in table.seconds.items())]
    return "\n".join(lines) + "\n"

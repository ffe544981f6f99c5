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

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from latentedit.attributes import Attribute
from latentedit.conditions import ConditionSpec
from latentedit.errors import InvalidArgument
from latentedit.latents import Latents
from latentedit.methods import interfacegan as ifg
from latentedit.methods.base import Frame, FrameRequest, JobBasics, QuietProgress
from latentedit.methods.ganspace import GANSpace, GANSpaceOptions, PCADirections, pca_directions
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
    unknown = [t for t in targets if t not in attributes]
    if unknown or not targets:
        raise InvalidArgument(f"targets: unknown or none {unknown}; attributes: {', '.join(attributes)}")
    if num_train < 100 or num_test < 1 or sgf_steps < 1:
        raise InvalidArgument(f"num_train {num_train} must be >= 100, num_test {num_test} >= 1 and sgf_steps {sgf_steps} >= 1")
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

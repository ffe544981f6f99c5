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
PCA direction (PCA of generator features at a layer, lifted to z by regression, as GANSpace
does for generators without a style space), and SGF with the other attributes held.
Everything runs in this process on the repository's models (same code the services run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from latentedit.attributes import Attribute
from latentedit.conditions import ConditionSpec
from latentedit.methods import interfacegan as ifg
from latentedit.methods.sgf import AuxiliaryMapping, sgf_edit, train_mapping
from latentedit.models.generator import INPUT_LAYER, StagedGenerator, sample_latents
from latentedit.scoring import Scorer
from latentedit.wire import float_to_uint8_images

DEFAULT_ATTRIBUTES = {
    "smile": Attribute("expression", "probabilities", 3, "happy"),
    "yaw": Attribute("pose", "yaw", None),
    "mouth-open": Attribute("pose", "mouth_openness", None),
    "male": Attribute("age_gender", "male_probability", None),
    "pitch": Attribute("pose", "pitch", None),
    "age": Attribute("age_gender", "age", None),
}
METHODS = ("InterFaceGAN", "InterFaceGAN conditional", "GANSpace PCA", "SGF")


@dataclass
class MDSResult:
    attribute: str
    method: str
    points: list[tuple[float, float]]  # (accuracy, disentanglement) by strength
    mds: float


@dataclass
class World:
    generator: StagedGenerator
    scorer: Scorer
    attributes: dict[str, Attribute]
    log: Callable[[str], None] = print
    batch: int = 200
    _heads: list[str] = field(default_factory=list)

    def images(self, z: np.ndarray) -> np.ndarray:
        out = []
        with torch.no_grad():
            for start in range(0, len(z), self.batch):
                out.append(float_to_uint8_images(self.generator(torch.from_numpy(z[start : start + self.batch])).numpy()))
        return np.concatenate(out)

    def scores(self, z: np.ndarray) -> np.ndarray:
        """[N, M] attribute scores of the images of z."""
        heads = sorted({a.head for a in self.attributes.values()})
        images = self.images(z)
        rows = []
        for start in range(0, len(images), self.batch):
            outputs = {h: r.outputs for h, r in self.scorer.score(images[start : start + self.batch], heads).items()}
            rows.append(np.stack([a.extract(outputs) for a in self.attributes.values()], axis=1))
        return np.concatenate(rows).astype(np.float32)


def area_under_curve(points: list[tuple[float, float]]) -> float:
    """Trapezoids from (0, 1) through the points sorted by accuracy; nothing beyond the last accuracy."""
    curve = sorted([(0.0, 1.0), *points])
    area = 0.0
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        area += (x1 - x0) * (y0 + y1) / 2
    return float(area)


def ganspace_directions(world: World, z: np.ndarray, layer: str, components: int) -> np.ndarray:
    """PCA of features at `layer`, each component lifted to a unit direction in z by least squares."""
    with torch.no_grad():
        feats = world.generator.run(torch.from_numpy(z), INPUT_LAYER, [layer])[layer].reshape(len(z), -1).numpy()
    feats = feats - feats.mean(axis=0)
    _, _, vt = np.linalg.svd(feats, full_matrices=False)
    coefficients = feats @ vt[:components].T  # [N, K]
    lift, *_ = np.linalg.lstsq(np.c_[z, np.ones(len(z))], coefficients, rcond=None)
    directions = lift[:-1].T  # [K, dim]
    return directions / np.linalg.norm(directions, axis=1, keepdims=True)


def run_mds(
    world: World,
    targets: list[str],
    num_train: int = 2000,
    num_test: int = 100,
    strengths: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0),
    sgf_steps: int = 2000,
    seed: int = 0,
) -> tuple[list[MDSResult], dict[str, float]]:
    names = list(world.attributes)
    space = world.generator.spec.latent_spaces[0]
    z_train = sample_latents(space, num_train, seed)
    world.log(f"scoring {num_train} training samples on {len(names)} attributes")
    s_train = world.scores(z_train)
    medians = np.median(s_train, axis=0)
    thresholds = 0.5 * (np.quantile(s_train, 0.95, axis=0) - np.quantile(s_train, 0.05, axis=0))

    world.log("fitting InterFaceGAN boundaries")
    normals = {}
    for i, name in enumerate(names):
        keeper = ifg.ExtremeKeeper(max(10, num_train // 10))
        keeper.add(s_train[:, i], z_train)
        latents, labels, _ = keeper.dataset()
        normals[name] = ifg.fit_boundary(latents, labels, seed=seed).boundary.normal

    world.log("GANSpace: PCA of block1 features")
    components = ganspace_directions(world, z_train, world.generator.spec.layers[1].name, 10)
    pca_for = {}
    for i, name in enumerate(names):
        projections = z_train @ components.T
        correlation = [np.corrcoef(projections[:, k], s_train[:, i])[0, 1] for k in range(len(components))]
        best = int(np.nanargmax(np.abs(correlation)))
        pca_for[name] = components[best] * np.sign(correlation[best])

    world.log(f"SGF: training F on {num_train} (z, c) pairs of all {len(names)} attributes")
    condition = ConditionSpec("attributes", list(world.attributes.values()))
    condition.fit(s_train)
    mapping = AuxiliaryMapping(space.dim, len(names), depth=6, hidden=256)
    torch.manual_seed(seed)
    train_mapping(mapping, torch.from_numpy(z_train), torch.from_numpy(condition.standardise(s_train)), sgf_steps,
                  batch_size=128, learning_rate=2e-3, seed=seed)

    results = []
    for target in targets:
        a = names.index(target)
        z0 = sample_latents(space, num_test, seed + 1000 + a)
        s0 = world.scores(z0)
        sign = np.where(s0[:, a] > medians[a], -1.0, 1.0).astype(np.float32)  # push every sample across
        others = [i for i in range(len(names)) if i != a]

        def evaluate(z1: np.ndarray) -> tuple[float, float]:
            s1 = world.scores(z1)
            crossed = np.where(sign > 0, s1[:, a] > medians[a], s1[:, a] <= medians[a])
            changed = (np.abs(s1[:, others] - s0[:, others]) > thresholds[others]).sum(axis=1)
            return float(crossed.mean()), float(np.mean(1 - changed / (len(names) - 1)))

        directions = {
            "InterFaceGAN": normals[target],
            "InterFaceGAN conditional": ifg.conditioned_direction(normals[target], [normals[names[i]] for i in others]),
            "GANSpace PCA": pca_for[target].astype(np.float32),
        }
        for method, direction in directions.items():
            points = [evaluate(z0 + (sign[:, None] * s) * direction[None, :]) for s in strengths]
            results.append(MDSResult(target, method, points, area_under_curve(points)))
            world.log(f"{target:10s} {method:26s} MDS {results[-1].mds:.3f}  {[(round(x, 2), round(y, 2)) for x, y in points]}")
        points = []
        c0 = torch.from_numpy(condition.standardise(s0))
        mask = torch.zeros(len(names))
        mask[a] = 1.0
        for s in strengths:
            # Target: the attribute moved by s standard deviations, the others held at their values.
            goal = c0.clone()
            goal[:, a] = goal[:, a] + torch.from_numpy(sign) * s
            measure = lambda z: torch.from_numpy(condition.standardise(world.scores(z.numpy())))  # noqa: E731
            last = None
            for step in sgf_edit(mapping, measure, torch.from_numpy(z0), goal, 0.2, 1, 10, 0.1, mask, c0):
                last = step
            points.append(evaluate(last.latents.numpy()))
        results.append(MDSResult(target, "SGF", points, area_under_curve(points)))
        world.log(f"{target:10s} {'SGF':26s} MDS {results[-1].mds:.3f}  {[(round(x, 2), round(y, 2)) for x, y in points]}")
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

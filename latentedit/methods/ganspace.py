"""GANSpace-style PCA directions (Härkönen et al., NeurIPS 2020), served as an edit.

PCA of the generator's features at a layer over many samples; each principal component is
lifted to a unit direction in latent space by least-squares regression of the component's
coefficients on the latents (the paper's recipe for generators without a style space). An
edit moves start + d * v_k, like InterFaceGAN along an unsupervised direction.

Also SeFa's closed-form directions (`sefa_directions`), the other unsupervised baseline the
DP-LaSE evaluation compares with; not served.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from torch import nn

from latentedit.artifacts import PCA_KIND, load_tensors, resolve_trained, tensors_writer
from latentedit.config import EditorConfig
from latentedit.errors import FailedPrecondition, InvalidArgument
from latentedit.latents import Latents, RowRange
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
    batches,
    check_count,
    check_distances,
    check_frames,
    job_basics,
    path_frames,
)
from latentedit.methods.interfacegan import trajectory
from latentedit.repository import Entry, ModelRepository
from latentedit.world import GeneratorInfo, World


@dataclass(frozen=True)
class PCASpec:
    basics: JobBasics
    layer: str
    space: str = "z"
    num_samples: int = 2000
    num_components: int = 10


@dataclass(frozen=True)
class GANSpaceOptions:
    directions: str
    component: int = 0
    start_distance: float = -3.0
    end_distance: float = 3.0
    num_frames: int = 8
    rows: RowRange | None = None


@dataclass(frozen=True)
class PCADirections:
    directions: np.ndarray  # [K, latent size], unit rows
    explained_variance: np.ndarray  # [K], share of the feature variance
    space: str


def pca_directions(latents: np.ndarray, features: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """latents [N, D], features [N, F] -> (unit latent directions [K, D], explained variance share [K])."""
    centred = features.reshape(len(features), -1) - features.reshape(len(features), -1).mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    coefficients = centred @ vt[:components].T  # [N, K]
    lift, *_ = np.linalg.lstsq(np.c_[latents, np.ones(len(latents))], coefficients, rcond=None)
    directions = lift[:-1].T  # [K, D]
    variance = singular**2
    return ((directions / np.linalg.norm(directions, axis=1, keepdims=True)).astype(np.float32),
            (variance[:components] / variance.sum()).astype(np.float32))


def sefa_directions(weight: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """SeFa (Shen & Zhou, CVPR 2021), closed form: the top eigenvectors of W^T W.

    `weight` [outputs, latent size] is the first layer that reads the latent, as a matrix (W z
    is its pre-activation). ||W n||^2 = n^T W^T W n, so the eigenvectors with the largest
    eigenvalues are the unit latent moves that change that layer the most. Returns (unit
    directions [K, D], each eigenvalue's share of the trace [K])."""
    matrix = weight.astype(np.float64)
    values, vectors = np.linalg.eigh(matrix.T @ matrix)
    order = np.argsort(values)[::-1][:components]
    return vectors[:, order].T.astype(np.float32), (values[order] / values.sum()).astype(np.float32)


def first_layer_matrix(module: nn.Module) -> np.ndarray:
    """The first Linear or ConvTranspose2d of a generator as the matrix W [outputs, latent size].

    A ConvTranspose2d on a 1x1 latent (DCGAN's first layer, weight [latent, channels, kh, kw])
    writes latent i's kernel into every output position, so its W is the weight reshaped to
    [latent, channels * kh * kw] and transposed. What follows the layer (DCGAN: BatchNorm, whose
    per-channel scale SeFa ignores) is not folded in, as in the SeFa paper."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            return layer.weight.detach().cpu().numpy()
        if isinstance(layer, nn.ConvTranspose2d):
            weight = layer.weight.detach().cpu().numpy()
            return weight.reshape(weight.shape[0], -1).T
        if isinstance(layer, nn.Conv2d):
            break
    raise FailedPrecondition(f"{type(module).__name__} reads its latent with no Linear or ConvTranspose2d layer first; "
                             "SeFa needs one")


class GANSpace(Method):
    name = "ganspace"
    title = "GANSpace-style PCA"
    artifact_kind = PCA_KIND
    jobs = ("pca",)

    def edit_options(self, message, num_frames: int, limits: EditorConfig) -> GANSpaceOptions:
        check_distances(start_distance=message.start_distance, end_distance=message.end_distance)
        if message.component < 0:
            raise InvalidArgument(f"component {message.component} must be >= 0")
        rows = RowRange(message.rows.start, message.rows.end) if message.HasField("rows") else None
        return GANSpaceOptions(message.directions, message.component, message.start_distance, message.end_distance,
                               check_frames(num_frames, limits), rows)

    def prepare(self, repo: ModelRepository, generator: GeneratorInfo, options: GANSpaceOptions) -> PCADirections:
        entry = resolve_trained(repo, PCA_KIND, "PCA directions", options.directions, generator=generator.name)
        tensors = load_tensors(entry, "directions")
        directions = tensors["directions"].numpy()
        if not 0 <= options.component < len(directions):
            raise InvalidArgument(f"component {options.component} is out of range: {options.directions!r} has "
                                  f"{len(directions)} components (0..{len(directions) - 1})")
        space = entry.manifest.get("space", "z")
        generator.space(space)
        return PCADirections(directions, tensors["explained_variance"].numpy(), space)

    def edit(self, world: World, generator: GeneratorInfo, artifact: PCADirections, start: Latents,
             options: GANSpaceOptions, frames: FrameRequest) -> Iterator[Frame]:
        distances = np.linspace(options.start_distance, options.end_distance, options.num_frames)
        latents = trajectory(start, artifact.directions[options.component], distances, rows=options.rows)
        path = ((z, {"distance": float(d)}) for z, d in zip(latents, distances))
        return path_frames(world, generator, path, frames, options.num_frames)

    def job_spec(self, kind: str, message, world: World, repo: ModelRepository) -> PCASpec:
        from latentedit.wire import space_name

        if kind != "pca":
            return super().job_spec(kind, message, world, repo)
        basics = job_basics(world, message.generator, message.options, lambda g: f"{g.name}-pca-{message.layer or 'block1'}")
        layers = [layer.name for layer in basics.generator.spec.layers[1:-1]]
        layer = message.layer or layers[0]
        basics.generator.spec.layer_index(layer)  # NOT_FOUND names the layers
        if layer not in layers:
            raise InvalidArgument(f"layer {layer!r}: PCA needs an intermediate layer; layers: {', '.join(layers)}")
        num = check_count(message.num_samples or 2000, "num_samples")
        components = message.num_components or 10
        check_range(components, "num_components", 1, min(num, LIMITS.directions), "directions")
        feature_size = math.prod(basics.generator.spec.layers[basics.generator.spec.layer_index(layer)].shape)
        check_range(num, f"num_samples (x {feature_size} feature values at layer {layer})", 1,
                    LIMITS.pca_feature_values // max(feature_size, 1), "pca_feature_values")
        return PCASpec(basics, layer, basics.generator.space(space_name(message.space)).space, num, components)

    def train(self, world: World, spec: PCASpec, progress: Progress) -> Trained:
        b = spec.basics
        latents, features = [], []
        for index, start, count in batches(spec.num_samples, b.batch_size):
            progress.check()
            z = world.sample(b.generator, count, batch_seed(b.seed, index), spec.space)
            latents.append(z.flat())
            features.append(world.features(b.generator, z, [spec.layer])[spec.layer].reshape(count, -1))
            progress.report("collecting features", 0.9 * (start + count) / spec.num_samples)
        progress.check()
        directions, explained = pca_directions(np.concatenate(latents), np.concatenate(features), spec.num_components)
        metrics = {"num_samples": float(spec.num_samples), "num_components": float(spec.num_components),
                   "explained_variance": float(explained.sum())}
        progress.report("writing the directions", 0.98, metrics)
        return Trained(PCA_KIND, b.name, b.generator, spec.space, metrics, {"directions": "directions.safetensors"},
                       tensors_writer("directions.safetensors", {"directions": directions, "explained_variance": explained}),
                       {"layer": spec.layer}, PCADirections(directions, explained, spec.space))

    def describe(self, entry: Entry) -> Editable:
        editable = super().describe(entry)
        return Editable(**{**editable.__dict__, "num_directions": int(editable.metrics.get("num_components", 0))})

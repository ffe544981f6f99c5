"""InterFaceGAN (Shen et al., CVPR 2020): linear boundaries in latent space and edits along them.

The protocol of the paper's section 3 / 4.1: score many samples, keep the top and bottom few
percent as positives and negatives, split 70/30, fit a linear SVM, and use its unit normal n
as the edit direction: z' = z + alpha n. Conditional editing (section 2.2) moves along n with
the normals of the condition attributes projected out. The math is numpy / sklearn; the
`InterFaceGAN` plug-in at the end trains and edits through a `World` in any latent space
(Z, W, W+; a W boundary edits a W+ row range), for the trainer, editor and evaluation alike.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from sklearn.svm import LinearSVC

from latentedit.artifacts import BOUNDARY_KIND, CORRELATION_KIND, json_writer, load_tensors, resolve_trained, tensors_writer
from latentedit.attributes import Attribute
from latentedit.config import EditorConfig
from latentedit.errors import FailedPrecondition, InvalidArgument
from latentedit.latents import Latents, RowRange, move
from latentedit.limits import LIMITS, check_items, check_range, check_text
from latentedit.methods.base import (
    Editable,
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
    scored_batches,
)
from latentedit.repository import Entry, ModelRepository, validate_name
from latentedit.world import GeneratorInfo, World

MIN_PER_CLASS = 10


@dataclass(frozen=True)
class Boundary:
    """A hyperplane n . z + offset = 0 with unit normal n pointing to the positive side."""

    normal: np.ndarray  # [dim], unit length
    offset: float

    def distance(self, latents: np.ndarray) -> np.ndarray:
        """Signed distance of each latent [N, dim] to the hyperplane."""
        return latents.reshape(len(latents), -1) @ self.normal + self.offset

    def distance_of(self, latents: Latents) -> np.ndarray:
        """Signed distance of each latent; a W boundary measures W+ latents by their mean row."""
        if self.normal.size == latents.space.size:
            return self.distance(latents.values)
        if latents.space.space == "w+" and self.normal.size == latents.space.dim:
            return latents.values.mean(axis=1) @ self.normal + self.offset
        raise FailedPrecondition(f"a boundary of dimension {self.normal.size} cannot measure latents in {latents.space.describe()}")


@dataclass(frozen=True)
class BoundaryFit:
    boundary: Boundary
    train_accuracy: float
    validation_accuracy: float
    num_train: int
    num_validation: int


class ExtremeKeeper:
    """Streams (score, latent) pairs and keeps only the k highest and k lowest scores.

    Memory stays O(k) however many samples pass through, which is what lets a boundary job
    score 500,000 samples.
    """

    def __init__(self, keep: int) -> None:
        if keep < 1:
            raise InvalidArgument("keep must be at least 1")
        self.keep = keep
        self._high: list[tuple[float, int, np.ndarray]] = []  # min-heap of the highest
        self._low: list[tuple[float, int, np.ndarray]] = []  # min-heap of -score: the lowest
        self._count = 0

    def add(self, scores: np.ndarray, latents: np.ndarray) -> None:
        for score, latent in zip(scores.tolist(), latents):
            self._count += 1
            item_high = (score, self._count, latent)
            item_low = (-score, self._count, latent)
            if len(self._high) < self.keep:
                heapq.heappush(self._high, item_high)
            elif score > self._high[0][0]:
                heapq.heapreplace(self._high, item_high)
            if len(self._low) < self.keep:
                heapq.heappush(self._low, item_low)
            elif -score > self._low[0][0]:
                heapq.heapreplace(self._low, item_low)

    def __len__(self) -> int:
        return sum(len(side) for side in self._kept())

    def _kept(self) -> tuple[list[tuple[float, int, np.ndarray]], list[tuple[float, int, np.ndarray]]]:
        """(score, arrival, latent) of the positives and of the negatives, each by descending score."""
        high = sorted(self._high, key=lambda t: -t[0])
        low = [(-t[0], t[1], t[2]) for t in sorted(self._low, key=lambda t: t[0])]
        if self._count < 2 * self.keep:
            # Fewer than 2 * keep samples came (e.g. after a quality filter), so both heaps hold
            # some of the same samples; each must get one label: the upper half by score are the
            # positives, the lower half the negatives (an odd middle one is dropped).
            ranked = sorted({t[1]: t for t in high + low}.values(), key=lambda t: -t[0])
            half = len(ranked) // 2
            high, low = ranked[:half], ranked[len(ranked) - half:]
        return high, low

    def dataset(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(latents, labels 1/0, scores) of the kept positives then negatives, each sample once."""
        high, low = self._kept()
        latents = np.stack([t[2] for t in high] + [t[2] for t in low])
        labels = np.array([1] * len(high) + [0] * len(low), np.int64)
        scores = np.array([t[0] for t in high + low], np.float64)
        return latents, labels, scores


def fit_boundary(
    latents: np.ndarray, labels: np.ndarray, validation_fraction: float = 0.3, svm_c: float = 1.0, seed: int = 0
) -> BoundaryFit:
    """Linear SVM on a shuffled train / validation split; returns the unit-normal boundary."""
    x = latents.reshape(len(latents), -1).astype(np.float64)
    y = np.asarray(labels).astype(np.int64)
    if len(x) != len(y):
        raise InvalidArgument(f"labels: {len(y)} labels for {len(x)} latents; give one label per latent")
    classes = set(np.unique(y).tolist())
    if classes != {0, 1}:
        raise InvalidArgument(f"labels must contain both classes 0 and 1; found {sorted(classes)}")
    if not 0.0 <= validation_fraction < 1.0:
        raise InvalidArgument(f"validation_fraction {validation_fraction} must be in [0, 1)")
    order = np.random.default_rng(seed).permutation(len(x))
    num_val = int(round(len(x) * validation_fraction))
    val_idx, train_idx = order[:num_val], order[num_val:]
    if len(np.unique(y[train_idx])) < 2:
        raise InvalidArgument("the training split holds one class only; give more samples of each class")
    svm = LinearSVC(C=svm_c, dual="auto", max_iter=20000, random_state=seed)
    svm.fit(x[train_idx], y[train_idx])
    w, b = svm.coef_.reshape(-1), float(svm.intercept_[0])
    norm = float(np.linalg.norm(w))
    boundary = Boundary(normal=(w / norm).astype(np.float32), offset=b / norm)
    train_acc = float(svm.score(x[train_idx], y[train_idx]))
    val_acc = float(svm.score(x[val_idx], y[val_idx])) if num_val else float("nan")
    return BoundaryFit(boundary, train_acc, val_acc, len(train_idx), num_val)


def accuracy(boundary: Boundary, latents: np.ndarray, labels: np.ndarray) -> float:
    """Share of latents on the side of the boundary their label says."""
    predicted = boundary.distance(latents) > 0
    return float(np.mean(predicted == (np.asarray(labels) > 0)))


def conditioned_direction(primary: np.ndarray, conditions: list[np.ndarray]) -> np.ndarray:
    """The primary normal with the span of the condition normals projected out, unit length.

    n' = n - C (C^T C)^-1 C^T n, solved in one least-squares step (not repeated subtraction,
    which is wrong for non-orthogonal conditions).
    """
    n = primary.reshape(-1).astype(np.float64)
    if not conditions:
        return (n / np.linalg.norm(n)).astype(np.float32)
    c = np.stack([cond.reshape(-1) for cond in conditions], axis=1).astype(np.float64)
    coefficients, *_ = np.linalg.lstsq(c, n, rcond=None)
    projected = n - c @ coefficients
    norm = np.linalg.norm(projected)
    if norm < 1e-6:
        raise InvalidArgument("the edit direction lies in the span of the condition boundaries: nothing is left to edit")
    return (projected / norm).astype(np.float32)


def trajectory(
    start: Latents,
    direction: np.ndarray,
    distances: np.ndarray,
    boundary: Boundary | None = None,
    rows: RowRange | None = None,
) -> list[Latents]:
    """One Latents per distance along `direction`: z + d n, or, given `boundary`, its foot point + d n.

    With `rows`, only those W+ rows move (a W direction is broadcast over them)."""
    base = start if boundary is None else move(start, boundary.normal, -boundary.distance_of(start), rows)
    return [move(base, direction, float(d), rows) for d in distances]


def cosine_matrix(normals: list[np.ndarray]) -> np.ndarray:
    stacked = np.stack([n.reshape(-1) / np.linalg.norm(n) for n in normals])
    return stacked @ stacked.T


def correlation_matrix(scores: np.ndarray) -> np.ndarray:
    """Pearson correlation of attribute scores [N, A]."""
    return np.corrcoef(scores, rowvar=False)


def kept_labels(keeper: ExtremeKeeper, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(latents, labels) of the kept extremes: labelled by their end of the ranking, or, given
    `threshold`, 1 where the score is above it."""
    latents, labels, scores = keeper.dataset()
    if threshold is not None:
        labels = (scores > threshold).astype(np.int64)
        if labels.all() or not labels.any():
            raise InvalidArgument(f"threshold {threshold:g}: every kept sample scores on one side of it (kept scores "
                                  f"{scores.min():.4g}..{scores.max():.4g}); choose a threshold inside that range")
    return latents, labels


def fit_kept(keeper: ExtremeKeeper, validation_fraction: float, svm_c: float, seed: int,
             threshold: float | None = None) -> BoundaryFit:
    """The paper's protocol after ranking: the kept extremes (labelled by side, or by `threshold`) -> SVM."""
    return fit_boundary(*kept_labels(keeper, threshold), validation_fraction, svm_c, seed)


def quality_filtered(values: np.ndarray, quality: np.ndarray, quality_min: float) -> np.ndarray:
    """`values` with NaN where the quality score is below `quality_min` (or not a number): dropped samples."""
    with np.errstate(invalid="ignore"):
        return np.where(quality >= quality_min, values, np.nan)


def boundary_from_scores(latents: np.ndarray, scores: np.ndarray, keep_fraction: float = 0.1, validation_fraction: float = 0.3,
                         svm_c: float = 1.0, seed: int = 0, threshold: float | None = None) -> BoundaryFit:
    """The whole protocol as one function of (latents [N, D], scores [N]): keep the top and bottom
    `keep_fraction`, fit, return the boundary. The trainer streams the same steps batch by batch."""
    keeper = ExtremeKeeper(max(MIN_PER_CLASS, int(len(latents) * keep_fraction)))
    finite = np.isfinite(scores)
    keeper.add(scores[finite], latents.reshape(len(latents), -1)[finite])
    return fit_kept(keeper, validation_fraction, svm_c, seed, threshold)


# ---- the plug-in -----------------------------------------------------------------------------


@dataclass(frozen=True)
class InterFaceGANOptions:
    boundary: str
    conditions: tuple[str, ...] = ()
    start_distance: float = -3.0
    end_distance: float = 3.0
    num_frames: int = 8
    # Distances from the start latent (False) or from its foot point on the boundary (True).
    from_boundary: bool = False
    # W+ rows the edit touches (None: all); a W boundary is then broadcast over those rows.
    rows: RowRange | None = None


@dataclass(frozen=True)
class BoundarySpec:
    basics: JobBasics
    attribute: Attribute
    space: str
    num_samples: int = 2000
    keep_fraction: float = 0.1
    validation_fraction: float = 0.3
    svm_c: float = 1.0
    threshold: float | None = None
    quality: Attribute | None = None
    quality_min: float = 0.0


@dataclass(frozen=True)
class CustomBoundarySpec:
    basics: JobBasics
    latents: Latents
    labels: np.ndarray
    validation_fraction: float = 0.3
    svm_c: float = 1.0
    attribute_name: str = "custom"


@dataclass(frozen=True)
class CorrelationSpec:
    basics: JobBasics
    boundaries: tuple[tuple[str, Boundary, Attribute], ...]
    space: str
    num_samples: int = 1000


@dataclass(frozen=True)
class PreparedBoundaries:
    boundary: Boundary
    conditions: tuple[tuple[str, Boundary], ...]
    space: str  # the space start latents are sampled in


def load_boundary(repo: ModelRepository, name: str, version: int = 0, generator: str | None = None) -> tuple[Boundary, Entry]:
    entry = resolve_trained(repo, BOUNDARY_KIND, "boundary", name, version, generator)
    tensors = load_tensors(entry, "boundary")
    return Boundary(tensors["normal"].numpy(), float(tensors["offset"][0])), entry


def check_fits(name: str, boundary: Boundary, space: str, generator: GeneratorInfo) -> None:
    """FAILED_PRECONDITION unless the generator has the boundary's latent space, of the normal's dimension."""
    spaces = {s.space: s for s in generator.spec.latent_spaces}
    if space not in spaces:
        raise FailedPrecondition(f"boundary {name!r} lives in latent space {space!r}; generator {generator.name!r} "
                                 f"has spaces {', '.join(spaces)}")
    if boundary.normal.size != spaces[space].size:
        raise FailedPrecondition(f"boundary {name!r} has dimension {boundary.normal.size}; latent space {space!r} of generator "
                                 f"{generator.name!r} has dimension {spaces[space].size}")


def boundary_artifact(name: str, boundary: Boundary, generator: GeneratorInfo, space: str, attribute: dict,
                      metrics: dict[str, float] | None = None) -> Trained:
    """A boundary ready for the repository (`Trained.save`)."""
    writer = tensors_writer("boundary.safetensors", {"normal": boundary.normal.astype(np.float32),
                                                     "offset": np.array([boundary.offset], np.float32)})
    return Trained(BOUNDARY_KIND, name, generator, space, metrics or {}, {"boundary": "boundary.safetensors"}, writer,
                   {"attribute": attribute}, boundary)


class InterFaceGAN(Method):
    name = "interfacegan"
    title = "InterFaceGAN"
    artifact_kind = BOUNDARY_KIND
    jobs = ("boundary", "custom_boundary", "correlation")

    # ---- editing ----------------------------------------------------------------------------

    def edit_options(self, message, num_frames: int, limits: EditorConfig) -> InterFaceGANOptions:
        check_distances(start_distance=message.start_distance, end_distance=message.end_distance)
        check_items(len(message.condition_boundaries), "condition_boundaries", LIMITS.list_items, "list_items")
        validate_name(message.boundary, "boundary")
        for index, name in enumerate(message.condition_boundaries):
            validate_name(name, f"condition_boundaries[{index}]")
        if message.boundary in message.condition_boundaries:
            raise InvalidArgument("condition_boundaries: the edited boundary cannot also be a condition")
        rows = RowRange(message.rows.start, message.rows.end) if message.HasField("rows") else None
        return InterFaceGANOptions(message.boundary, tuple(message.condition_boundaries), message.start_distance,
                                   message.end_distance, check_frames(num_frames, limits), message.from_boundary, rows)

    def prepare(self, repo: ModelRepository, generator: GeneratorInfo, options: InterFaceGANOptions) -> PreparedBoundaries:
        boundary, entry = load_boundary(repo, options.boundary, generator=generator.name)
        space = entry.manifest.get("space", "z")
        check_fits(options.boundary, boundary, space, generator)
        conditions = []
        for name in options.conditions:
            condition, condition_entry = load_boundary(repo, name, generator=generator.name)
            if condition_entry.manifest.get("space", "z") != space or condition.normal.size != boundary.normal.size:
                raise FailedPrecondition(f"condition boundary {name!r} lives in {condition_entry.manifest.get('space', 'z')}, "
                                         f"the edited boundary {options.boundary!r} in {space}")
            conditions.append((name, condition))
        if options.rows is not None and space == "w":
            space = "w+"  # a W boundary edits a row range of W+ latents
        generator.space(space)  # the generator must have the boundary's space
        return PreparedBoundaries(boundary, tuple(conditions), space)

    def edit(self, world: World, generator: GeneratorInfo, artifact: PreparedBoundaries, start: Latents,
             options: InterFaceGANOptions, frames: FrameRequest) -> Iterator:
        boundary = artifact.boundary
        boundary.distance_of(start)  # checks that the boundary fits the latents
        direction = conditioned_direction(boundary.normal, [c.normal for _, c in artifact.conditions])
        distances = np.linspace(options.start_distance, options.end_distance, options.num_frames)
        path_latents = trajectory(start, direction, distances, boundary if options.from_boundary else None, options.rows)

        def path():
            for distance, latents in zip(distances, path_latents):
                metrics = {"distance": float(distance), "mean_boundary_distance": float(boundary.distance_of(latents).mean())}
                for name, condition in artifact.conditions:
                    metrics[f"condition_distance/{name}"] = float(condition.distance_of(latents).mean())
                yield latents, metrics

        return path_frames(world, generator, path(), frames, options.num_frames)

    # ---- training ---------------------------------------------------------------------------

    def job_spec(self, kind: str, message, world: World, repo: ModelRepository):
        from latentedit.wire import space_name

        if kind == "boundary":
            num = check_count(message.num_samples or 2000, "num_samples")
            fraction = message.keep_fraction or 0.1
            check_finite(keep_fraction=fraction, validation_fraction=message.validation_fraction, svm_c=message.svm_c,
                         quality_min=message.quality_min, threshold=message.threshold)
            if not 0.0 < fraction <= 0.5:
                raise InvalidArgument(f"keep_fraction {fraction:g} must be in (0, 0.5]")
            if int(num * fraction) < MIN_PER_CLASS:
                raise InvalidArgument(f"num_samples {num} with keep_fraction {fraction:g} keeps {int(num * fraction)} samples per "
                                      f"side; at least {MIN_PER_CLASS} are needed")
            self._check_fit_options(message.validation_fraction, message.svm_c)
            heads = world.heads()
            attribute = resolve_attribute(message.attribute, heads, "attribute")
            quality = resolve_attribute(message.quality_attribute, heads, "quality_attribute") if message.quality_attribute.head else None
            basics = job_basics(world, message.generator, message.options,
                                lambda g: f"{g.name}-{attribute.name.replace('.', '-').replace('[', '').replace(']', '')}")
            space = basics.generator.space(space_name(message.space)).space
            return BoundarySpec(basics, attribute, space, num, fraction, message.validation_fraction or 0.3, message.svm_c or 1.0,
                                message.threshold if message.HasField("threshold") else None, quality, message.quality_min)
        if kind == "custom_boundary":
            from latentedit.wire import from_tensor, latents_from_proto

            self._check_fit_options(message.validation_fraction, message.svm_c)
            check_text(message.attribute_name, "attribute_name")
            basics = job_basics(world, message.generator, message.options, lambda g: f"{g.name}-{message.attribute_name or 'custom'}")
            latents = latents_from_proto(message.latents, basics.generator.spec, "latents")
            check_count(len(latents), "latents: the number of latents", 2 * MIN_PER_CLASS, LIMITS.custom_latents, "custom_latents")
            labels = from_tensor(message.labels, field="labels")
            if labels.ndim != 1 or len(labels) != len(latents):
                raise InvalidArgument(f"labels: {labels.size} labels for {len(latents)} latents; give one label (0 or 1) per latent")
            values = set(np.unique(labels.astype(np.float64)).tolist())
            if not values <= {0.0, 1.0}:
                raise InvalidArgument(f"labels must be 0 or 1; found {sorted(values)[:5]}")
            if min(int((labels > 0).sum()), int((labels <= 0).sum())) < MIN_PER_CLASS:
                raise InvalidArgument(f"labels: each class needs at least {MIN_PER_CLASS} latents")
            return CustomBoundarySpec(basics, latents, (labels > 0).astype(np.int64), message.validation_fraction or 0.3,
                                      message.svm_c or 1.0, message.attribute_name or "custom")
        if kind == "correlation":
            if len(message.boundaries) < 2:
                raise InvalidArgument("boundaries: name at least two boundaries to correlate")
            check_items(len(message.boundaries), "boundaries", LIMITS.list_items, "list_items")
            for index, name in enumerate(message.boundaries):
                validate_name(name, f"boundaries[{index}]")
            basics = job_basics(world, message.generator, message.options, lambda g: f"{g.name}-correlation")
            loaded, spaces = [], set()
            for name in message.boundaries:
                boundary, entry = load_boundary(repo, name, generator=basics.generator.name)
                attribute = Attribute.from_dict(entry.manifest["attribute"])
                if not attribute.head:
                    raise InvalidArgument(f"boundary {name!r} was trained from caller labels; no head scores its attribute")
                loaded.append((name, boundary, attribute))
                spaces.add(entry.manifest.get("space", "z"))
            if len(spaces) > 1:
                raise InvalidArgument(f"boundaries: they live in different latent spaces {sorted(spaces)}")
            num = check_count(message.num_samples or 1000, "num_samples")
            return CorrelationSpec(basics, tuple(loaded), spaces.pop(), num)
        return super().job_spec(kind, message, world, repo)

    @staticmethod
    def _check_fit_options(validation_fraction: float, svm_c: float) -> None:
        check_finite(validation_fraction=validation_fraction, svm_c=svm_c)
        if not 0.0 <= validation_fraction < 1.0:
            raise InvalidArgument(f"validation_fraction {validation_fraction:g} must be in [0, 1)")
        if svm_c < 0:
            raise InvalidArgument(f"svm_c {svm_c:g} must be positive")
        check_range(svm_c, "svm_c", 0, LIMITS.weight_max, "weight_max")

    def job_artifact_kind(self, kind: str) -> str:
        return CORRELATION_KIND if kind == "correlation" else BOUNDARY_KIND

    def train(self, world: World, spec, progress: Progress) -> Trained:
        if isinstance(spec, BoundarySpec):
            return self._train_boundary(world, spec, progress)
        if isinstance(spec, CustomBoundarySpec):
            return self._train_custom(spec, progress)
        if isinstance(spec, CorrelationSpec):
            return self._correlate(world, spec, progress)
        raise InvalidArgument(f"InterFaceGAN cannot train {type(spec).__name__}")

    def _train_boundary(self, world: World, spec: BoundarySpec, progress: Progress) -> Trained:
        b = spec.basics
        keeper = ExtremeKeeper(int(spec.num_samples * spec.keep_fraction))
        scores = np.full(spec.num_samples, np.nan)
        heads = sorted({spec.attribute.head} | ({spec.quality.head} if spec.quality else set()))
        num_filtered = 0  # samples the quality filter dropped
        def sampled() -> Iterator[Latents]:
            for index, _start, count in batches(spec.num_samples, b.batch_size):
                progress.check()
                yield world.sample(b.generator, count, batch_seed(b.seed, index), spec.space)

        # Batch k+1 is synthesized while batch k is scored (generator and scorer busy at once).
        for (_index, start, count), (latents, outputs) in zip(batches(spec.num_samples, b.batch_size),
                                                               scored_batches(world, b.generator, sampled(), heads)):
            progress.check()
            values = spec.attribute.extract(outputs)
            if spec.quality is not None:
                scored = np.isfinite(values)
                values = quality_filtered(values, spec.quality.extract(outputs), spec.quality_min)
                num_filtered += int((scored & ~np.isfinite(values)).sum())
            usable = np.isfinite(values)
            keeper.add(values[usable], latents.flat()[usable])
            scores[start : start + count] = values
            progress.report("sampling and scoring", 0.85 * (start + count) / spec.num_samples,
                            message=f"scored {start + count}/{spec.num_samples} samples")
        progress.check()
        progress.report("fitting the SVM", 0.87)
        kept, labels = kept_labels(keeper, spec.threshold)
        fit = fit_boundary(kept, labels, spec.validation_fraction, spec.svm_c, b.seed)
        # Accuracy on all samples: regenerate their latents from the seeds (nothing was kept).
        progress.report("measuring accuracy on all samples", 0.9)
        finite = np.isfinite(scores)
        threshold = spec.threshold if spec.threshold is not None else float(np.median(scores[finite]))
        correct = 0
        for index, start, count in batches(spec.num_samples, b.batch_size):
            progress.check()
            latents = world.sample(b.generator, count, batch_seed(b.seed, index), spec.space)
            batch_scores = scores[start : start + count]
            ok = np.isfinite(batch_scores)
            correct += int(np.sum((fit.boundary.distance(latents.flat()[ok]) > 0) == (batch_scores[ok] > threshold)))
        metrics = {"validation_accuracy": fit.validation_accuracy, "train_accuracy": fit.train_accuracy,
                   "all_samples_accuracy": correct / max(int(finite.sum()), 1), "num_samples": float(spec.num_samples),
                   "num_kept": float(len(kept)), "num_positive": float(labels.sum()), "num_negative": float(len(labels) - labels.sum()),
                   "num_filtered": float(num_filtered), "score_threshold": threshold}
        progress.report("writing the boundary", 0.98, metrics)
        return boundary_artifact(b.name, fit.boundary, b.generator, spec.space, spec.attribute.to_dict(), metrics)

    def _train_custom(self, spec: CustomBoundarySpec, progress: Progress) -> Trained:
        b = spec.basics
        progress.report("fitting the SVM", 0.2)
        fit = fit_boundary(spec.latents.flat(), spec.labels, spec.validation_fraction, spec.svm_c, b.seed)
        metrics = {"validation_accuracy": fit.validation_accuracy, "train_accuracy": fit.train_accuracy,
                   "all_samples_accuracy": accuracy(fit.boundary, spec.latents.flat(), spec.labels),
                   "num_samples": float(len(spec.latents))}
        progress.report("writing the boundary", 0.9, metrics)
        attribute = {"head": "", "output": spec.attribute_name, "label": "", "index": None}
        return boundary_artifact(b.name, fit.boundary, b.generator, spec.latents.space.space, attribute, metrics)

    def _correlate(self, world: World, spec: CorrelationSpec, progress: Progress) -> Trained:
        """The paper's Tables 2-3: cosine of the normals against the correlation of the attributes' scores."""
        b = spec.basics
        heads = sorted({a.head for _, _, a in spec.boundaries})
        columns = []
        for index, start, count in batches(spec.num_samples, b.batch_size):
            progress.check()
            latents = world.sample(b.generator, count, batch_seed(b.seed + 7919, index), spec.space)
            outputs = world.score(world.synthesize(b.generator, latents), heads)
            columns.append(np.stack([a.extract(outputs) for _, _, a in spec.boundaries], axis=1))
            progress.report("sampling and scoring", 0.95 * (start + count) / spec.num_samples)
        cosine = cosine_matrix([boundary.normal for _, boundary, _ in spec.boundaries])
        correlation = correlation_matrix(np.concatenate(columns))
        names = [n for n, _, _ in spec.boundaries]
        off_diagonal = ~np.eye(len(names), dtype=bool)
        agreement = float(np.corrcoef(cosine[off_diagonal], correlation[off_diagonal])[0, 1]) if len(names) > 2 else float("nan")
        metrics = {"num_samples": float(spec.num_samples), "cosine_correlation_agreement": agreement,
                   "mean_abs_difference": float(np.abs(cosine - correlation)[off_diagonal].mean())}
        report = {"boundaries": names, "attributes": [a.name for _, _, a in spec.boundaries],
                  "cosine": cosine.round(4).tolist(), "correlation": correlation.round(4).tolist()}
        progress.report("done", 1.0, metrics)
        return Trained(CORRELATION_KIND, b.name, b.generator, spec.space, metrics, {"report": "report.json"},
                       json_writer("report.json", report), value=report)

    def describe(self, entry: Entry) -> Editable:
        editable = super().describe(entry)
        attribute = Attribute.from_dict(entry.manifest.get("attribute", {"head": "", "output": "", "index": None}))
        return Editable(**{**editable.__dict__, "attributes": (attribute,)})

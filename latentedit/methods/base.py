"""The Method plug-in contract: every paper is one module implementing it.

A method owns its options (frozen dataclasses holding the defaults, used by the services,
the CLI and the evaluation alike), its training (`train(world, spec, progress) -> Trained`)
and its editing (`edit(world, generator, artifact, start, options, frames) -> Frame...`).
The trainer and the editor only look a method up in `latentedit.methods.registry` and
translate protos at their edge; the evaluation runs the same `edit` on a `LocalWorld`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from latentedit.attributes import Attribute
from latentedit.config import EditorConfig
from latentedit.errors import InvalidArgument, NotFound, shown
from latentedit.latents import Latents
from latentedit.limits import LIMITS, check_range
from latentedit.repository import Entry, ModelRepository, validate_name
from latentedit.world import GeneratorInfo, Scores, World

# Why a trajectory ended (set on its last frame).
COMPLETED, TARGET_REACHED, STEP_LIMIT, DIVERGED = "completed", "target_reached", "step_limit", "diverged"

MIN_SAMPLES = 100
MAX_SAMPLES = LIMITS.job_samples
MAX_JOB_BATCH = LIMITS.job_batch


@dataclass
class Frame:
    """One step of an edit: the latents, their images and scores, and method metrics."""

    index: int
    latents: Latents
    images: np.ndarray | None = None
    scores: Scores = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    stop: str = ""


@dataclass(frozen=True)
class FrameRequest:
    """What the caller wants in every frame: scores of these heads, and the images or not."""

    heads: tuple[str, ...] = ()
    images: bool = True


@dataclass(frozen=True)
class Editable:
    """A trained artifact a method can edit with (what ListEdits shows)."""

    method: str
    name: str
    version: int
    kind: str
    space: str
    attributes: tuple[Attribute, ...] = ()
    condition: str = ""
    num_directions: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    job_id: str = ""
    direction_names: tuple[Any, ...] = ()  # unsupervised directions: what each one moves (DirectionName)


@dataclass
class Trained:
    """A trained artifact ready for the repository: `populate(folder)` writes `files` there."""

    kind: str
    name: str
    generator: GeneratorInfo
    space: str
    metrics: dict[str, float]
    files: dict[str, str]
    populate: Callable[[Path], None]
    manifest: dict[str, Any] = field(default_factory=dict)
    value: Any = None  # the in-memory artifact, for callers that edit with it right away

    def save(self, repo: ModelRepository, provenance: dict[str, Any]) -> Entry:
        manifest = {**self.manifest, **provenance, "kind": self.kind, "space": self.space, "metrics": self.metrics,
                    "generator": {"name": self.generator.name, "version": self.generator.version}, "files": self.files}
        return repo.write(self.name, manifest, self.populate)


class Progress(Protocol):
    def check(self) -> None:
        """Raise `Cancelled` once the work should stop (call between units of work)."""
        ...

    def report(self, phase: str, fraction: float, metrics: dict[str, float] | None = None, message: str = "") -> None:
        ...


class QuietProgress:
    """Progress for in-process callers that need no reporting (evaluation, tests)."""

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self.log = log
        self._phase = ""

    def check(self) -> None:
        return None

    def report(self, phase: str, fraction: float, metrics: dict[str, float] | None = None, message: str = "") -> None:
        if self.log is not None and phase != self._phase:
            self.log(phase)
        self._phase = phase


@dataclass(frozen=True)
class JobBasics:
    """What every training job resolves first: the generator, the artifact name, seed and batch."""

    generator: GeneratorInfo
    name: str
    seed: int = 0
    batch_size: int = 256


def job_basics(world: World, generator_ref, options, default_name: Callable[[GeneratorInfo], str],
               default_batch: int = 256) -> JobBasics:
    """Resolve a job's generator and TrainingOptions (proto) into `JobBasics`, validated."""
    check_finite(**{"options.learning_rate": options.learning_rate})
    if options.artifact_name:
        validate_name(options.artifact_name, "options.artifact_name")
    if generator_ref.name:
        validate_name(generator_ref.name, "generator.name")
    if generator_ref.version < 0:
        raise InvalidArgument(f"generator.version {generator_ref.version} is negative; use 0 for the newest or a version number")
    # Every TrainingOptions field is checked, including those a job kind does not use (0: the default).
    check_range(options.steps, "options.steps", 0, LIMITS.training_steps, "training_steps")
    check_range(options.learning_rate, "options.learning_rate", 0, 1)
    generator = world.generator(generator_ref.name, generator_ref.version)
    batch = options.batch_size or default_batch
    check_range(batch, "options.batch_size", 1, MAX_JOB_BATCH, "job_batch")
    name = validate_name(options.artifact_name or default_name(generator).lower(), "artifact name (from the spec)")
    return JobBasics(generator, name, int(options.seed), batch)


def resolve_attribute(ref, heads, field: str) -> Attribute:
    """`attributes.resolve`, and a label or index given for a scalar output is an error, not ignored."""
    from latentedit.attributes import resolve

    attribute = resolve(ref, heads, field)
    if attribute.index is None:
        if ref.label:
            raise NotFound(f"{field}.label {shown(ref.label)}: {ref.head}.{ref.output} is a scalar and has no labels")
        if ref.index:
            raise InvalidArgument(f"{field}.index {ref.index}: {ref.head}.{ref.output} is a scalar; leave index at 0")
    return attribute


def check_count(value: int, field_name: str, low: int = MIN_SAMPLES, high: int = MAX_SAMPLES, limit: str = "job_samples") -> int:
    check_range(value, field_name, low, high, limit)
    return value


def batch_seed(seed: int, index: int) -> int:
    """The seed of batch `index` of a job: batches can be regenerated without storing latents."""
    return (seed * 1_000_003 + index) % (2**63)


def batches(total: int, size: int) -> Iterator[tuple[int, int, int]]:
    """(index, start, count) of consecutive batches covering `total` items."""
    for index, start in enumerate(range(0, total, size)):
        yield index, start, min(size, total - start)


def render(world: World, generator: GeneratorInfo, latents: Latents, frames: FrameRequest,
           extra_heads: Sequence[str] = ()) -> tuple[np.ndarray | None, Scores]:
    """Images of the latents and their scores by the requested (and `extra_heads`) heads.

    Nothing is synthesized when the caller wants neither images nor scores."""
    heads = list(dict.fromkeys([*frames.heads, *extra_heads]))
    if not heads and not frames.images:
        return None, {}
    images = world.synthesize(generator, latents)
    return images, world.score(images, heads)


def requested(scores: Scores, frames: FrameRequest) -> Scores:
    return {head: scores[head] for head in frames.heads if head in scores}


def path_frames(world: World, generator: GeneratorInfo, path: Iterable[tuple[Latents, dict[str, float]]],
                frames: FrameRequest, length: int) -> Iterator[Frame]:
    """Frames of a trajectory known ahead (linear methods): each rendered and sent in order,
    the last one marked COMPLETED. `path` yields (latents, metrics) per frame."""
    for index, (latents, metrics) in enumerate(path):
        images, scores = render(world, generator, latents, frames)
        yield Frame(index, latents, images if frames.images else None, scores, metrics,
                    COMPLETED if index == length - 1 else "")


def check_frames(num_frames: int, limits: EditorConfig, default: int = 8) -> int:
    frames = num_frames or default
    if not 1 <= frames <= limits.max_frames:
        raise InvalidArgument(f"num_frames {frames} must be in 1..{limits.max_frames}")
    return frames


def check_finite(**values: float) -> None:
    for name, value in values.items():
        if not np.isfinite(value):
            raise InvalidArgument(f"{name} must be a finite number; got {value}")


def check_distances(**values: float) -> None:
    """Edit distances / strides: finite and within +-LIMITS.edit_distance."""
    check_finite(**values)
    for name, value in values.items():
        check_range(value, name, -LIMITS.edit_distance, LIMITS.edit_distance, "edit_distance")


class Method(ABC):
    """One paper's method. Subclasses set the class attributes and implement the hooks."""

    name: ClassVar[str]  # registry key = the EditRequest `method` field that selects it
    title: ClassVar[str]
    artifact_kind: ClassVar[str]
    jobs: ClassVar[tuple[str, ...]] = ()  # StartJobRequest `spec` fields it trains

    # ---- editing --------------------------------------------------------------------------

    @abstractmethod
    def edit_options(self, message: Any, num_frames: int, limits: EditorConfig) -> Any:
        """The method's EditRequest message -> its options dataclass (validated, defaults filled)."""

    @abstractmethod
    def prepare(self, repo: ModelRepository, generator: GeneratorInfo, options: Any) -> Any:
        """Load and check what the edit needs (artifacts) before any frame; has a `space`."""

    @abstractmethod
    def edit(self, world: World, generator: GeneratorInfo, artifact: Any, start: Latents, options: Any,
             frames: FrameRequest) -> Iterator[Frame]:
        """Frames of the edit, each yielded as soon as it exists."""

    # ---- training -------------------------------------------------------------------------

    def job_spec(self, kind: str, message: Any, world: World, repo: ModelRepository) -> Any:
        """A StartJobRequest spec (proto) -> the method's training spec, validated up front."""
        raise InvalidArgument(f"{self.name} trains no {kind} jobs")

    def train(self, world: World, spec: Any, progress: Progress) -> Trained:
        raise InvalidArgument(f"{self.name} has no training")

    def job_artifact_kind(self, kind: str) -> str:
        """The repository kind a job of `kind` writes (checked against the name at job start)."""
        return self.artifact_kind

    # ---- listing --------------------------------------------------------------------------

    def editables(self, repo: ModelRepository, generator: str = "") -> list[Editable]:
        """The trained artifacts of this method (for `generator` when given)."""
        out = []
        for entry in repo.entries(self.artifact_kind):
            if generator and entry.manifest.get("generator", {}).get("name") != generator:
                continue
            out.append(self.describe(entry))
        return out

    def describe(self, entry: Entry) -> Editable:
        manifest = entry.manifest
        return Editable(self.name, entry.name, entry.version, self.artifact_kind, manifest.get("space", "z"),
                        metrics={k: float(v) for k, v in manifest.get("metrics", {}).items()}, job_id=manifest.get("job_id", ""))


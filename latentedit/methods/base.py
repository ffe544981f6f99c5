"""The Method plug-in contract: every paper is one module implementing it.

A method owns its options (frozen dataclasses holding the defaults, used by the services,
the CLI and the evaluation alike), its training (`train(world, spec, progress) -> Trained`)
and its editing (`edit(world, generator, artifact, start, options, frames) -> Frame...`).
The trainer and the editor only look a method up in `latentedit.methods.registry` and
translate protos at their edge; the evaluation runs the same `edit` on a `LocalWorld`.
"""

from __future__ import annotations

import contextvars
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from latentedit.attributes import Attribute
from latentedit.config import EditorConfig
from latentedit.errors import Cancelled, InvalidArgument, NotFound, shown
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


# Rows (latents x frames) synthesized and scored per call by `path_frames` after the first frame.
DEFAULT_CHUNK_ROWS = 16


@dataclass(frozen=True)
class FrameRequest:
    """What the caller wants in every frame: scores of these heads, and the images or not.

    `chunk_rows`: how `path_frames` renders a trajectory known ahead. 0: the plain loop, one
    synthesize then one score call per frame, in sequence. Otherwise the first frame alone, then
    chunks of about this many rows (whole frames, at least one), each chunk synthesized while the
    previous one is scored (see `path_frames`)."""

    heads: tuple[str, ...] = ()
    images: bool = True
    chunk_rows: int = DEFAULT_CHUNK_ROWS


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


Synthesize = Callable[[Latents], np.ndarray]


def path_frames(world: World, generator: GeneratorInfo, path: Iterable[tuple[Latents, dict[str, float]]],
                frames: FrameRequest, length: int, synthesize: Synthesize | None = None) -> Iterator[Frame]:
    """Frames of a trajectory known ahead (open-loop methods): each rendered and yielded in order,
    the last one marked COMPLETED. `path` yields (latents, metrics) per frame; `synthesize`
    renders latents (default: `world.synthesize`; a method with its own rendering, e.g. DP-LaSE's
    subspace refinement, passes one that takes any number of rows).

    With `frames.chunk_rows` 0 every frame is synthesized, then scored, then yielded. Otherwise
    the first frame goes alone (the lowest latency to the first frame), then the rest in chunks of
    whole frames: while chunk k is scored, chunk k+1 is synthesized, and the frames of chunk k-1
    are with the consumer (encoded, sent). Frames, latents and scores are those of the plain loop,
    in the same order. At most two chunks are in flight: a consumer that stops (closes this
    generator, or a RemoteWorld whose caller has gone) stops the generator and scorer work within
    one chunk."""
    if frames.chunk_rows <= 0 or (not frames.heads and not frames.images):
        return RenderedFrames(_sequential_frames(world, generator, path, frames, length, synthesize))
    return RenderedFrames(_Pipeline(world, generator, frames, synthesize).frames(path, length))


class RenderedFrames(Iterator[Frame]):
    """`path_frames`' answer: it decides itself how far ahead it renders, so a caller that would
    compute the next frame while handling this one (the editor, for closed-loop methods) need not."""

    renders_ahead = True

    def __init__(self, frames: Generator[Frame, None, None]) -> None:
        self._frames = frames

    def __next__(self) -> Frame:
        return next(self._frames)

    def close(self) -> None:
        self._frames.close()


def _sequential_frames(world: World, generator: GeneratorInfo, path: Iterable[tuple[Latents, dict[str, float]]],
                       frames: FrameRequest, length: int, synthesize: Synthesize | None) -> Generator[Frame, None, None]:
    for index, (latents, metrics) in enumerate(path):
        if synthesize is None:
            images, scores = render(world, generator, latents, frames)
        elif frames.heads or frames.images:
            images = synthesize(latents)
            scores = world.score(images, list(frames.heads))
        else:
            images, scores = None, {}
        yield Frame(index, latents, images if frames.images else None, scores, metrics,
                    COMPLETED if index == length - 1 else "")


def _split_scores(scores: Scores, start: int, stop: int) -> Scores:
    return {head: {key: values[start:stop] for key, values in outputs.items()} for head, outputs in scores.items()}


class _Pipeline:
    """`path_frames`' chunked rendering: one worker thread calls the generator, another the
    scorer, so the two are busy at the same time; the consumer's thread only takes results."""

    def __init__(self, world: World, generator: GeneratorInfo, frames: FrameRequest, synthesize: Synthesize | None) -> None:
        self.world = world
        self.heads = list(frames.heads)
        self.images = frames.images
        self.chunk_rows = frames.chunk_rows
        self.synthesize: Synthesize = synthesize or (lambda latents: world.synthesize(generator, latents))
        self.stopped = threading.Event()

    def _render(self, chunk: list[tuple[int, Latents, dict[str, float]]], scorer: ThreadPoolExecutor) -> Future:
        """Synthesize the chunk (in the calling generator thread); score it on the scorer thread."""
        if self.stopped.is_set():
            raise Cancelled("the edit's consumer has gone")
        latents = chunk[0][1] if len(chunk) == 1 else Latents(chunk[0][1].space, np.concatenate([c[1].values for c in chunk]))
        images = self.synthesize(latents)
        if self.stopped.is_set():
            raise Cancelled("the edit's consumer has gone")
        return scorer.submit(contextvars.copy_context().run, self._score, images)

    def _score(self, images: np.ndarray) -> tuple[np.ndarray, Scores]:
        if self.stopped.is_set():
            raise Cancelled("the edit's consumer has gone")
        return images, (self.world.score(images, self.heads) if self.heads else {})

    def _chunks(self, path: Iterable[tuple[Latents, dict[str, float]]]) -> Iterator[list[tuple[int, Latents, dict[str, float]]]]:
        chunk: list[tuple[int, Latents, dict[str, float]]] = []
        rows = 0
        for index, (latents, metrics) in enumerate(path):
            chunk.append((index, latents, metrics))
            rows += len(latents)
            if index == 0 or rows + len(latents) > self.chunk_rows:  # the first frame alone; then whole frames
                yield chunk
                chunk, rows = [], 0
        if chunk:
            yield chunk

    def rendered(self, chunks: Iterator[list[tuple[int, Latents, dict[str, float]]]]
                 ) -> Generator[tuple[list[tuple[int, Latents, dict[str, float]]], np.ndarray, Scores], None, None]:
        """(chunk, images, scores) of each chunk, in order, the next synthesized while this one is scored."""
        generator_thread = ThreadPoolExecutor(1, thread_name_prefix="edit-synthesize")
        scorer_thread = ThreadPoolExecutor(1, thread_name_prefix="edit-score")
        in_flight: deque[tuple[list[tuple[int, Latents, dict[str, float]]], Future]] = deque()

        def launch() -> None:
            chunk = next(chunks, None)  # the path's own work (latents, metrics) runs here, in order
            if chunk is not None:
                # Each task runs in a copy of the caller's context (its trace span, for the downstream calls).
                in_flight.append((chunk, generator_thread.submit(contextvars.copy_context().run, self._render, chunk,
                                                                 scorer_thread)))

        try:
            launch()
            first = True
            while in_flight:
                chunk, synthesized = in_flight.popleft()
                images, scores = synthesized.result().result()
                # Two chunks in flight: one at the generator, one at the scorer. The first chunk
                # runs alone, so nothing competes with it for the first frame's latency.
                launch()
                if first or len(in_flight) < 2:
                    launch()
                first = False
                yield chunk, images, scores
        finally:
            # The consumer has gone (or an error): nothing new starts, queued chunks are dropped, and
            # the calls in flight end (a RemoteWorld whose caller went cancels them) before this
            # returns, so no call of this edit reaches a service once its handler is done.
            self.stopped.set()
            generator_thread.shutdown(wait=True, cancel_futures=True)
            scorer_thread.shutdown(wait=True, cancel_futures=True)

    def frames(self, path: Iterable[tuple[Latents, dict[str, float]]], length: int) -> Generator[Frame, None, None]:
        for chunk, images, scores in self.rendered(self._chunks(path)):
            start = 0
            for index, latents, metrics in chunk:
                stop = start + len(latents)
                yield Frame(index, latents, images[start:stop] if self.images else None,
                            _split_scores(scores, start, stop), metrics, COMPLETED if index == length - 1 else "")
                start = stop


def scored_batches(world: World, generator: GeneratorInfo, batches: Iterable[Latents], heads: Sequence[str]
                   ) -> Generator[tuple[Latents, Scores], None, None]:
    """(latents, scores of their images) of each batch, in order: batch k+1 is synthesized while
    batch k is scored (training jobs that sample and score). At most two batches are in flight
    beyond the one handed out; closing this generator stops the rest."""
    pipeline = _Pipeline(world, generator, FrameRequest(tuple(heads), images=False, chunk_rows=1), None)
    no_metrics: dict[str, float] = {}
    items = ([(index, latents, no_metrics)] for index, latents in enumerate(batches))
    for chunk, _images, scores in pipeline.rendered(items):
        yield chunk[0][1], scores


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


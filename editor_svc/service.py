"""EditorService: a thin adapter from the v1 messages to the method registry.

Every RPC translates the request, calls the method through a `RemoteWorld` scoped to the
caller (its deadline on every downstream call, cancelled when it goes away), and translates
each frame back as soon as the method yields it. No method math lives here.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import torch

from latentedit import wire
from latentedit.api.v1 import editor_pb2, editor_pb2_grpc, trainer_pb2, types_pb2
from latentedit.config import EditorConfig
from latentedit.errors import InvalidArgument, ResourceExhausted
from latentedit.latents import Latents
from latentedit.methods import registry
from latentedit.methods.base import COMPLETED, DIVERGED, STEP_LIMIT, TARGET_REACHED, Editable, Frame, FrameRequest
from latentedit.methods.inversion import invert
from latentedit.repository import ModelRepository, validate_name
from latentedit.rpc.remote_world import CallScope, RemoteWorld, Services
from latentedit.world import GeneratorInfo, LocalWorld, World, require_heads

STOP_REASONS = {COMPLETED: editor_pb2.STOP_REASON_COMPLETED, TARGET_REACHED: editor_pb2.STOP_REASON_TARGET_REACHED,
                STEP_LIMIT: editor_pb2.STOP_REASON_STEP_LIMIT, DIVERGED: editor_pb2.STOP_REASON_DIVERGED}


def editable_to_proto(editable: Editable) -> editor_pb2.EditableArtifact:
    return editor_pb2.EditableArtifact(
        artifact=trainer_pb2.ArtifactRef(ref=types_pb2.ModelRef(name=editable.name, version=editable.version),
                                         kind=wire.ARTIFACT_KINDS.get(editable.kind, trainer_pb2.ARTIFACT_KIND_UNSPECIFIED)),
        attributes=[a.to_ref() for a in editable.attributes],
        condition=wire.CONDITION_KINDS.get(editable.condition, trainer_pb2.CONDITION_KIND_UNSPECIFIED),
        num_directions=editable.num_directions,
        space=wire.space_code(editable.space),
        metrics=editable.metrics,
        job_id=editable.job_id,
        method=editable.method,
        direction_names=[editor_pb2.DirectionName(direction_index=n.index, attribute=n.attribute.to_ref(),
                                                  correlation=n.correlation, slope=n.slope, summary=n.summary())
                         for n in editable.direction_names],
    )


def frame_to_proto(frame: Frame, encoding: int) -> editor_pb2.EditFrame:
    message = editor_pb2.EditFrame(index=frame.index, latents=wire.latents_to_proto(frame.latents),
                                   scores=wire.scores_to_proto(frame.scores), metrics=frame.metrics,
                                   stop_reason=STOP_REASONS.get(frame.stop, editor_pb2.STOP_REASON_UNSPECIFIED))
    if frame.images is not None:
        message.images.CopyFrom(wire.encode_images(frame.images, encoding))
    return message


def computed_ahead(frames: Iterator[Frame], poll_s: float = 0.1) -> Iterator[Frame]:
    """The frames of `frames`, each next one computed in a worker thread while the caller handles
    the one before (encodes and sends it): one frame ahead at most, so a caller that goes away
    leaves at most one frame's work started. Errors reach the caller at the frame they stopped."""
    taken = threading.Semaphore(1)  # frames the worker may compute before the caller takes the last one
    ready: queue.Queue = queue.Queue()
    stopped = threading.Event()

    def work() -> None:
        try:
            while True:
                while not taken.acquire(timeout=poll_s):
                    if stopped.is_set():
                        return
                if stopped.is_set():
                    return
                frame = next(frames, None)
                ready.put(("frame", frame) if frame is not None else ("end", None))
                if frame is None:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            ready.put(("error", exc))
        finally:
            close = getattr(frames, "close", None)
            if close is not None:
                close()  # in this thread, which ran it: a method's finally blocks run here

    worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), name="edit-ahead", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "error":
                raise value
            if kind == "end":
                return
            taken.release()
            yield value
    finally:
        stopped.set()


class InversionStats:
    """Inversions whose optimisation is running here (worker threads), and the steps taken.

    The worker outlives its RPC until it notices the caller has gone; these let operators and
    tests see that it stops."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.running = 0
        self.steps = 0

    def started(self) -> None:
        with self._changed:
            self.running += 1

    def step_done(self) -> None:
        with self._changed:
            self.steps += 1
            self._changed.notify_all()

    def finished(self) -> None:
        with self._changed:
            self.running -= 1
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[InversionStats], bool], timeout_s: float) -> bool:
        """Block until `predicate(self)` holds; False if `timeout_s` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout_s)


class EditorServicer(editor_pb2_grpc.EditorServiceServicer):
    def __init__(self, repo: ModelRepository, config: EditorConfig, services: Services) -> None:
        self.repo = repo
        self.config = config
        self.services = services
        # Invert needs gradients through the generator, which no RPC carries: it runs here.
        self._local = LocalWorld(repo, config.default_generator)
        self._lookups = ThreadPoolExecutor(8, thread_name_prefix="edit-lookup")  # short metadata calls of Edit
        self.inversions = InversionStats()

    def _world(self, context: grpc.ServicerContext, what: str) -> RemoteWorld:
        return RemoteWorld(self.services, CallScope.for_rpc(context, self.config.call_timeout_s, what))

    def ListEdits(self, request, context):
        wire.check_finite_fields(request)
        ref = request.generator
        if ref.version < 0:
            raise InvalidArgument(f"generator.version {ref.version} is negative; use 0 for the newest or a version number")
        if ref.name:
            self.repo.resolve(ref.name, ref.version, kind="generator")  # INVALID_ARGUMENT or NOT_FOUND for a bad name
        elif ref.version:
            raise InvalidArgument("generator.version: give generator.name too (an empty name lists every generator's edits)")
        edits = [editable_to_proto(e) for m in registry.METHODS.values() for e in m.editables(self.repo, request.generator.name)]
        return editor_pb2.ListEditsResponse(edits=edits)

    def Edit(self, request, context):
        method = registry.method(request.WhichOneof("method"))
        wire.check_finite_fields(request)  # NaN passes every range check: refuse it first, naming the field
        if request.generator.name:
            validate_name(request.generator.name, "generator.name")
        if request.generator.version < 0:
            raise InvalidArgument(f"generator.version {request.generator.version} is negative; use 0 for the newest or a version number")
        options = method.edit_options(getattr(request, method.name), request.num_frames, self.config)
        if request.image_encoding not in types_pb2.ImageEncoding.values():
            raise InvalidArgument(f"image_encoding {request.image_encoding} is unknown")
        world = self._world(context, "the edit")
        # The scorer's heads are asked for while the generator is resolved (two calls at once, not in turn).
        heads = self._lookups.submit(contextvars.copy_context().run, require_heads, world, request.score_heads)
        generator = world.generator(request.generator.name, request.generator.version)
        frames = FrameRequest(tuple(heads.result()), images=not request.omit_images, chunk_rows=self.config.chunk_rows)
        artifact = method.prepare(self.repo, generator, options)
        start = self._start(request, world, generator, artifact.space)
        edit = method.edit(world, generator, artifact, start, options, frames)
        if not getattr(edit, "renders_ahead", False):
            edit = computed_ahead(edit)  # closed-loop methods: the next step runs while this frame is encoded and sent
        for frame in edit:
            yield frame_to_proto(frame, request.image_encoding)

    def _start(self, request, world: World, generator: GeneratorInfo, space: str) -> Latents:
        """Start latents in the artifact's space: sampled from a seed, or the caller's."""
        which = request.WhichOneof("start")
        if which is None:
            raise InvalidArgument("start: give a seed or latents")
        if which == "seed":
            count = request.seed.count or 1
            if not 1 <= count <= self.config.max_batch:
                raise (InvalidArgument if count < 1 else ResourceExhausted)(f"seed.count {count} must be in 1..{self.config.max_batch}")
            return world.sample(generator, count, request.seed.seed, space)
        latents = wire.latents_from_proto(request.latents, generator.spec)
        if not 1 <= len(latents) <= self.config.max_batch:
            raise (InvalidArgument if len(latents) < 1 else ResourceExhausted)(
                f"latents.values: {len(latents)} latents; send 1..{self.config.max_batch}")
        if latents.space.space != space and not (space == "w" and latents.space.space == "w+"):
            raise InvalidArgument(f"latents.space: this edit works on {space} latents; these are {latents.space.space}")
        return latents

    # ---- Invert -----------------------------------------------------------------------------

    def Invert(self, request, context):
        # Its one float field, learning_rate, has a range check that NaN and Inf fail.
        generator = self._local.generator(request.generator.name, request.generator.version)
        space = generator.space(wire.space_name(request.space))
        if not request.HasField("images"):
            raise InvalidArgument("images: no images given; send raw uint8 [N, H, W, 3] or PNG files")
        images = wire.decode_images(request.images, field="images")
        if len(images) > self.config.max_batch:
            raise ResourceExhausted(f"images: {len(images)} images, more than the limit {self.config.max_batch}")
        if min(images.shape[1:3]) < 1:
            raise InvalidArgument(f"images: size {images.shape[2]}x{images.shape[1]} has no pixels")
        steps = request.steps or 300
        if not 1 <= steps <= self.config.max_invert_steps:
            raise InvalidArgument(f"steps {steps} must be in 1..{self.config.max_invert_steps}")
        report_every = request.report_every or 10
        if report_every < 1:
            raise InvalidArgument(f"report_every {report_every} must be at least 1 (0: every 10 steps)")
        rate = request.learning_rate or 0.1
        if not 0 < rate <= 1:
            raise InvalidArgument(f"learning_rate {rate:g} must be in (0, 1]")
        model = self._local.model(generator.name, generator.version)
        resolution = generator.spec.resolution
        targets = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if targets.shape[-2:] != (resolution, resolution):
            targets = torch.nn.functional.interpolate(targets, size=(resolution, resolution), mode="bilinear",
                                                      align_corners=False, antialias=True)
        updates: list[editor_pb2.InvertProgress] = []

        def progress(step: int, errors: np.ndarray) -> bool:
            # Called after every step, so a caller that has gone (cancel, deadline) stops the
            # optimisation at once, however rarely it asked for progress.
            self.inversions.step_done()
            if step % report_every == 0 or step == steps:
                updates.append(editor_pb2.InvertProgress(step=step, total_steps=steps, reconstruction_error=wire.to_tensor(errors)))
            return context.is_active()

        # Optimisation runs in a worker thread; progress messages go out as they are produced.
        result: dict = {}

        def work() -> None:
            try:
                result["out"] = invert(model, space, targets, steps, rate, int(request.seed), report_every=1, progress=progress)
            except Exception as exc:  # noqa: BLE001 - re-raised in the RPC thread, where the interceptor maps it
                result["error"] = exc
            finally:
                self.inversions.finished()

        self.inversions.started()
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        sent = 0
        while worker.is_alive() or sent < len(updates):
            worker.join(0.05)
            while sent < len(updates):
                yield updates[sent]
                sent += 1
            if not context.is_active():
                return
        if "error" in result:
            raise result["error"]
        latents, errors = result["out"]
        recovered = Latents(space, latents)
        yield editor_pb2.InvertProgress(
            step=steps, total_steps=steps, reconstruction_error=wire.to_tensor(errors), done=True,
            latents=wire.latents_to_proto(recovered),
            reconstructions=wire.encode_images(self._local.synthesize(generator, recovered), types_pb2.IMAGE_ENCODING_RAW_UINT8),
        )

"""GeneratorService: a thin adapter from the v1 messages to the generator pool."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import grpc
import numpy as np

from generator_svc.backends import GeneratorBackend
from generator_svc.pool import GeneratorPool, LoadedGenerator
from latentedit import wire
from latentedit.api.v1 import generator_pb2, generator_pb2_grpc, types_pb2
from latentedit.batching import result_within
from latentedit.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from latentedit.latents import Latents, LatentSpaceSpec
from latentedit.models.generator import IMAGE_LAYER
from latentedit.rpc.serving import deadline_seconds

log = logging.getLogger(__name__)

# Requests a single SynthesizeStream may have read and not yet answered: the server stops
# reading there until the client takes an answer (back-pressure).
STREAM_WINDOW = 8
_END = object()  # the reader's last item: no more answers will follow


def model_info(loaded: LoadedGenerator, versions: list[int]) -> generator_pb2.ModelInfo:
    spec = loaded.spec
    return generator_pb2.ModelInfo(
        ref=types_pb2.ModelRef(name=loaded.entry.name, version=loaded.entry.version),
        kind="generator",
        architecture=spec.architecture,
        latent_spaces=[
            generator_pb2.LatentSpaceInfo(space=wire.space_code(s.space), dim=s.dim, num_ws=s.num_ws, prior=s.prior)
            for s in spec.latent_spaces
        ],
        resolution=spec.resolution,
        channels=spec.channels,
        layers=[generator_pb2.LayerInfo(name=l.name, shape=list(l.shape), description=l.description) for l in spec.layers],
        supports_truncation=spec.supports_truncation,
        versions=versions,
        backends=loaded.backend_order(),
        provenance={k: str(v) for k, v in loaded.entry.manifest.get("provenance", {}).items()},
        max_request_batch=loaded.config.max_request_batch,
    )


def _space(loaded: LoadedGenerator, code: int) -> LatentSpaceSpec:
    spaces = loaded.spec.latent_spaces
    name = wire.space_name(code)
    for space in spaces:
        if name is None or space.space == name:
            return space
    allowed = ", ".join(types_pb2.LatentSpace.Name(wire.space_code(s.space)) for s in spaces)
    raise InvalidArgument(f"{loaded.entry.name} has no latent space {types_pb2.LatentSpace.Name(code)}; allowed: {allowed}")


def _check_latent_shape(loaded: LoadedGenerator, space: LatentSpaceSpec, tensor: types_pb2.Tensor) -> None:
    """Say precisely what is wrong when latents do not have their space's shape: W+ with the
    wrong number of rows, or latents of another space (Z sent as W) recognisable by shape."""
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) < 1 or shape[1:] == space.shape:
        return  # right shape (or no batch axis: wire.from_tensor says so)
    name = types_pb2.LatentSpace.Name(wire.space_code(space.space))
    if space.space == "w+" and len(shape) == 3 and shape[2] == space.dim:
        raise InvalidArgument(f"latents.values: {name} latents of {loaded.entry.name} have num_ws = {space.num_ws} rows "
                              f"of {space.dim}; these have {shape[1]} rows (shape {list(shape)})")
    for other in loaded.spec.latent_spaces:
        if other.space != space.space and shape[1:] == other.shape:
            other_name = types_pb2.LatentSpace.Name(wire.space_code(other.space))
            raise InvalidArgument(
                f"latents.values: shape {list(shape)} is that of {other_name} latents of {loaded.entry.name}, but "
                f"latents.space is {name} ({space.describe()}); set latents.space to {other_name} or send {name} latents")


# Truncation further from w_avg than this is extrapolation nobody means (StyleGAN uses 0.5-1).
LIMIT_PSI = 10.0


@dataclass(frozen=True)
class _SynthesisJob:
    loaded: LoadedGenerator
    backend: GeneratorBackend
    inputs: np.ndarray
    from_layer: str
    to_layers: list[str]


class GeneratorServicer(generator_pb2_grpc.GeneratorServiceServicer):
    def __init__(self, pool: GeneratorPool) -> None:
        self.pool = pool
        self.stream_stats = StreamStats()
        self._streams: set[_StreamReader] = set()
        self._streams_lock = threading.Lock()

    # ---- RPCs -----------------------------------------------------------------------------

    def ListModels(self, request, context):
        models = []
        for name in self.pool.repo.names("generator"):
            models.append(model_info(self.pool.get(name), self.pool.repo.versions(name)))
        return generator_pb2.ListModelsResponse(models=models, default_model=self.pool.config.default_model)

    def Sample(self, request, context):
        # Sampling does not queue (no batcher to drop it): a caller already gone gets nothing computed.
        if deadline_seconds(context) <= 0:
            raise DeadlineExceeded("the deadline passed before sampling started")
        loaded = self._model(request.model)
        space = _space(loaded, request.space)
        self._check_batch(request.count, loaded, "count")
        psi = float(request.truncation_psi)
        if psi not in (0.0, 1.0):
            if not np.isfinite(psi) or not -LIMIT_PSI <= psi <= LIMIT_PSI:
                raise InvalidArgument(f"truncation_psi {psi} must be finite and within [-{LIMIT_PSI}, {LIMIT_PSI}]")
            if not loaded.spec.supports_truncation:
                why = ("its checkpoint has no w_avg (the mean of W truncation pulls towards)"
                       if len(loaded.spec.latent_spaces) > 1 else "it has no mapping network")
                raise InvalidArgument(f"{loaded.entry.name} does not support truncation: {why}; leave truncation_psi at "
                                      "0 or 1")
            if space.space not in ("w", "w+"):
                raise InvalidArgument(f"truncation_psi acts in W or W+; {loaded.entry.name} was asked for "
                                      f"{types_pb2.LatentSpace.Name(wire.space_code(space.space))} latents: sample "
                                      "LATENT_SPACE_W or LATENT_SPACE_W_PLUS")
        else:
            psi = 1.0
        latents = Latents(space, loaded.sample(space, request.count, request.seed, psi))
        return generator_pb2.SampleResponse(model=self._ref(loaded), latents=wire.latents_to_proto(latents))

    def Synthesize(self, request, context):
        return self._answer(request, context)

    def SynthesizeStream(self, request_iterator, context) -> Iterator[generator_pb2.SynthesizeResponse]:
        stream = _StreamReader(self, request_iterator, lambda: deadline_seconds(context))
        with self._streams_lock:
            self._streams.add(stream)
        # The RPC ending for any reason (client cancel, deadline, shutdown) stops the reader
        # and drops the stream's queued work, even if gRPC never resumes this generator.
        if not context.add_callback(lambda: self._end_stream(stream)):
            self._end_stream(stream)
        stream.start()
        try:
            while True:
                item = stream.answers.get()
                if item is _END:
                    return
                if isinstance(item, grpc.RpcError):
                    return  # the client went away mid-stream: nobody to answer
                if isinstance(item, BaseException):
                    raise item
                request, job, future = item
                outputs = result_within(future, deadline_seconds(context))
                yield self._finish(job, request, outputs)
                stream.answered(future)
        finally:
            self._end_stream(stream)

    def _end_stream(self, stream: _StreamReader) -> None:
        stream.stop()
        with self._streams_lock:
            self._streams.discard(stream)

    # ---- helpers --------------------------------------------------------------------------

    def _answer(self, request, context) -> generator_pb2.SynthesizeResponse:
        job = self._prepare(request)
        outputs = job.loaded.run(
            job.backend, job.inputs, job.from_layer, job.to_layers, deadline_seconds(context), context.add_callback
        )
        return self._finish(job, request, outputs)

    def _model(self, ref: types_pb2.ModelRef) -> LoadedGenerator:
        return self.pool.get(ref.name, ref.version)

    @staticmethod
    def _ref(loaded: LoadedGenerator) -> types_pb2.ModelRef:
        return types_pb2.ModelRef(name=loaded.entry.name, version=loaded.entry.version)

    @staticmethod
    def _check_batch(count: int, loaded: LoadedGenerator, field: str) -> None:
        if count <= 0:
            raise InvalidArgument(f"{field}: the batch is empty; send 1 to {loaded.config.max_request_batch} items")
        if count > loaded.config.max_request_batch:
            raise ResourceExhausted(
                f"{field}: batch of {count} is larger than the limit {loaded.config.max_request_batch}; split it"
            )

    def _prepare(self, request) -> _SynthesisJob:
        """Validate a Synthesize request and decide what to run where."""
        loaded = self._model(request.model)
        spec = loaded.spec
        which = request.WhichOneof("input")
        if which is None:
            raise InvalidArgument("input: set either latents or features")
        if which == "latents":
            space = _space(loaded, request.latents.space)
            _check_latent_shape(loaded, space, request.latents.values)
            values = wire.from_tensor(request.latents.values, field="latents.values", dtypes=wire.FLOAT_DTYPES,
                                      shape=[None, *space.shape])
            wire.check_latent_range(values, "latents.values")  # finite but far beyond the prior overflows inside
            x = loaded.to_input(Latents(space, values))
            from_layer = spec.layers[0].name
        else:
            from_layer = request.features.layer
            index = spec.layer_index(from_layer)
            if index == len(spec.layers) - 1:
                raise InvalidArgument(f"features.layer {from_layer!r} is the output; give an earlier layer")
            x = wire.from_tensor(
                request.features.values,
                field="features.values",
                dtypes=wire.FLOAT_DTYPES,
                shape=[None, *spec.layers[index].shape],
            )
        self._check_batch(len(x), loaded, f"{which}.values")
        if request.image_encoding not in types_pb2.ImageEncoding.values():
            raise InvalidArgument(
                f"image_encoding {request.image_encoding} is unknown; allowed: IMAGE_ENCODING_RAW_UINT8, IMAGE_ENCODING_PNG"
            )
        for name in request.return_layers:
            if spec.layer_index(name) <= spec.layer_index(from_layer):
                raise InvalidArgument(f"return_layers: {name!r} does not come after the input layer {from_layer!r}")
        to_layers = list(dict.fromkeys([*request.return_layers, *([] if request.omit_images else [IMAGE_LAYER])]))
        if not to_layers:
            raise InvalidArgument("nothing to return: omit_images is set and return_layers is empty")
        backend = loaded.choose_backend(request.backend, from_layer, to_layers)
        return _SynthesisJob(loaded, backend, x.astype(np.float32, copy=False), from_layer, to_layers)

    def _finish(self, job: _SynthesisJob, request, outputs: dict[str, np.ndarray]) -> generator_pb2.SynthesizeResponse:
        response = generator_pb2.SynthesizeResponse(
            model=self._ref(job.loaded), backend=job.backend.kind, request_id=request.request_id
        )
        if not request.omit_images:
            images = wire.float_to_uint8_images(outputs[IMAGE_LAYER])
            response.images.CopyFrom(wire.encode_images(images, request.image_encoding))
        for name in request.return_layers:
            response.features.append(types_pb2.LayerFeatures(layer=name, values=wire.to_tensor(outputs[name])))
        return response

    def close(self) -> None:
        """Stop every open stream's reader and drop its queued work."""
        with self._streams_lock:
            streams = list(self._streams)
        for stream in streams:
            stream.stop()


class StreamStats:
    """What the SynthesizeStream readers of one servicer have done (for operators and tests)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests_read = 0
        # Readers waiting right now for their client to take answers before they read on.
        self.readers_waiting = 0
        # The most requests one stream has had read and not yet answered.
        self.largest_read_ahead = 0

    def read_one(self, read_ahead: int) -> None:
        with self._lock:
            self.requests_read += 1
            self.largest_read_ahead = max(self.largest_read_ahead, read_ahead)

    def reader_waits(self, change: int) -> None:
        with self._lock:
            self.readers_waiting += change


class _StreamReader:
    """The reading side of one SynthesizeStream.

    A thread reads up to STREAM_WINDOW requests ahead of the answers and queues each in its
    batcher as soon as it is read, so one stream's requests batch together; `answers` hands
    them back in request order. `stop` (the RPC ended, the response generator finished, the
    service is shutting down) ends the thread and cancels the stream's queued requests, so
    nothing more is computed for a stream nobody reads.
    """

    def __init__(self, servicer: GeneratorServicer, requests: Iterator, time_left: Callable[[], float]) -> None:
        self._servicer = servicer
        self._time_left = time_left  # seconds before the stream's deadline
        self._stats = servicer.stream_stats
        self._requests = requests
        self._changed = threading.Condition()
        self._unanswered = 0
        self._queued: set[Future] = set()
        self._stopped = False
        self.answers: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._read, name="synth-stream-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._changed:
            if self._stopped:
                return
            self._stopped = True
            queued, self._queued = self._queued, set()
            self._changed.notify_all()
        for future in queued:
            future.cancel()  # a request the batcher has not started leaves its queue

    def answered(self, future: Future) -> None:
        """The answer to one request has gone out: room to read one more."""
        with self._changed:
            self._queued.discard(future)
            self._unanswered -= 1
            self._changed.notify_all()

    def _read(self) -> None:
        try:
            while self._reserve_room():
                try:
                    request = next(self._requests)
                except StopIteration:
                    return
                with self._changed:
                    self._stats.read_one(self._unanswered)
                job = self._servicer._prepare(request)
                future = job.loaded.submit(job.backend, job.inputs, job.from_layer, job.to_layers, self._time_left())
                with self._changed:
                    if self._stopped:
                        future.cancel()
                        return
                    self._queued.add(future)
                self.answers.put((request, job, future))
        except Exception as exc:  # noqa: BLE001 - a bad request, or the client went away: the stream ends with it
            self.answers.put(exc)
        finally:
            self.answers.put(_END)

    def _reserve_room(self) -> bool:
        """Wait until fewer than STREAM_WINDOW requests are unanswered; False once stopped."""
        with self._changed:
            if self._unanswered >= STREAM_WINDOW and not self._stopped:
                self._stats.reader_waits(+1)
                try:
                    self._changed.wait_for(lambda: self._stopped or self._unanswered < STREAM_WINDOW)
                finally:
                    self._stats.reader_waits(-1)
            if self._stopped:
                return False
            self._unanswered += 1
            return True

"""GeneratorService: a thin adapter from the v1 messages to the generator pool."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from generator_svc.backends import GeneratorBackend
from generator_svc.pool import GeneratorPool, LoadedGenerator
from latentedit import wire
from latentedit.api.v1 import generator_pb2, generator_pb2_grpc, types_pb2
from latentedit.errors import InvalidArgument, ResourceExhausted
from latentedit.latents import Latents, LatentSpaceSpec
from latentedit.models.generator import IMAGE_LAYER
from latentedit.rpc.serving import deadline_seconds

log = logging.getLogger(__name__)

# Requests a single SynthesizeStream may have in flight before the server stops reading.
STREAM_WINDOW = 8


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
        self._stream_executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="synth-stream")

    # ---- RPCs -----------------------------------------------------------------------------

    def ListModels(self, request, context):
        models = []
        for name in self.pool.repo.names("generator"):
            models.append(model_info(self.pool.get(name), self.pool.repo.versions(name)))
        return generator_pb2.ListModelsResponse(models=models, default_model=self.pool.config.default_model)

    def Sample(self, request, context):
        loaded = self._model(request.model)
        space = _space(loaded, request.space)
        self._check_batch(request.count, loaded, "count")
        if request.truncation_psi not in (0.0, 1.0) and not loaded.spec.supports_truncation:
            raise InvalidArgument(f"{loaded.entry.name} does not support truncation; leave truncation_psi at 0 or 1")
        latents = Latents(space, loaded.sample(space, request.count, request.seed))
        return generator_pb2.SampleResponse(model=self._ref(loaded), latents=wire.latents_to_proto(latents))

    def Synthesize(self, request, context):
        return self._answer(request, context)

    def SynthesizeStream(self, request_iterator, context) -> Iterator[generator_pb2.SynthesizeResponse]:
        # Read ahead so that requests of one stream batch together, answering in order.
        pending: queue.Queue = queue.Queue(maxsize=STREAM_WINDOW)
        done = object()

        def reader() -> None:
            try:
                for request in request_iterator:
                    if not context.is_active():
                        break
                    pending.put(self._stream_executor.submit(self._answer, request, context))
            except Exception as exc:  # noqa: BLE001 - e.g. the client went away mid-stream
                failed: Future = Future()
                failed.set_exception(exc)
                pending.put(failed)
            pending.put(done)

        threading.Thread(target=reader, name="synth-stream-reader", daemon=True).start()
        while True:
            item = pending.get()
            if item is done:
                return
            yield item.result()

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
            x = loaded.to_input(Latents(space, wire.from_tensor(request.latents.values, field="latents.values",
                                                                dtypes=wire.FLOAT_DTYPES, shape=[None, *space.shape])))
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
        self._stream_executor.shutdown(wait=False, cancel_futures=True)

"""The World behind the services: generator_svc and scorer_svc over gRPC.

One rule for every downstream call, whoever makes it: its timeout is the caller's remaining
deadline, capped at `max_call_s` (which alone applies when the caller has none, as for a
training job). A call is not started once the caller has gone, and the call in flight is
cancelled when the caller goes. A dependency that is down becomes UNAVAILABLE naming it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from latentedit import wire
from latentedit.api.v1 import generator_pb2, generator_pb2_grpc, scorer_pb2, scorer_pb2_grpc, types_pb2
from latentedit.errors import Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from latentedit.latents import Latents
from latentedit.models.generator import IMAGE_LAYER, StagedGenerator
from latentedit.repository import ModelRepository, validate_name
from latentedit.rpc.client import connect, dependency
from latentedit.rpc.security import ClientSecurity, SecurityConfigError
from latentedit.scoring.base import OutputSpec
from latentedit.world import GeneratorInfo, HeadInfo, Scores

log = logging.getLogger(__name__)
HEAD_KIND_NAMES = {
    scorer_pb2.HEAD_KIND_ATTRIBUTE: "attribute",
    scorer_pb2.HEAD_KIND_KEYPOINTS: "keypoints",
    scorer_pb2.HEAD_KIND_IDENTITY: "identity",
    scorer_pb2.HEAD_KIND_QUALITY: "quality",
    scorer_pb2.HEAD_KIND_CAPTION: "caption",
}


class CallScope:
    """The deadline and cancellation of the caller on whose behalf services are called."""

    def __init__(self, deadline: float | None = None, is_active: Callable[[], bool] = lambda: True,
                 max_call_s: float = 300.0, what: str = "the call") -> None:
        self.deadline = deadline  # time.monotonic() value, or None
        self.is_active = is_active
        self.max_call_s = max_call_s
        self.what = what
        self._cancelled = False
        self._in_flight: set[grpc.Future] = set()
        self._lock = threading.Lock()

    @classmethod
    def for_rpc(cls, context: grpc.ServicerContext, max_call_s: float, what: str) -> CallScope:
        """The scope of a client's RPC: its deadline, and cancellation when it goes away."""
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        scope = cls(deadline, context.is_active, max_call_s, what)
        context.add_callback(scope.cancel)
        return scope

    def timeout(self) -> float:
        """Seconds the next call may take; raises once the caller has gone or run out of time."""
        if self._cancelled or not self.is_active():
            raise Cancelled(f"the caller cancelled {self.what}")
        if self.deadline is None:
            return self.max_call_s
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"the caller's deadline passed before {self.what} finished")
        return min(remaining, self.max_call_s)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            in_flight = list(self._in_flight)
        for future in in_flight:
            future.cancel()

    def call(self, method, request, service: str, address: str):
        """One downstream unary call under this scope."""
        timeout = self.timeout()
        with dependency(service, address):
            future = method.future(request, timeout=timeout)
            with self._lock:
                self._in_flight.add(future)
                cancelled = self._cancelled
            if cancelled:
                future.cancel()
            try:
                return future.result()
            except grpc.FutureCancelledError as exc:
                raise Cancelled(f"the caller cancelled {self.what}") from exc
            finally:
                with self._lock:
                    self._in_flight.discard(future)


@dataclass
class Services:
    """Channels to the generator and the scorer, shared by every RemoteWorld of a process.

    They carry this service's own credentials (`security`: its token and client certificate),
    never a caller's; plaintext when None. When a file of those credentials changes (a rotated
    client certificate, a new service token), the next call opens new channels with them; calls
    in flight finish on the old ones."""

    generator_address: str
    scorer_address: str
    generator_channel: grpc.Channel | None = None
    scorer_channel: grpc.Channel | None = None
    security: ClientSecurity | None = None
    service: str = "client"  # who calls, for the observability client interceptors
    max_message_bytes: int = 64 * 1024 * 1024  # the calling service's configured limit, both directions

    def __post_init__(self) -> None:
        self.security = self.security or ClientSecurity()
        # Channels handed in are the caller's to manage: never replaced.
        self._rotatable = self.security.tls and self.generator_channel is None and self.scorer_channel is None
        self._lock = threading.Lock()
        self._stamp = self.security.files_stamp()
        self._failed_stamp: tuple | None = None
        self._open(self.generator_channel, self.scorer_channel)

    def _open(self, generator_channel: grpc.Channel | None = None, scorer_channel: grpc.Channel | None = None) -> None:
        assert self.security is not None
        self.generator_channel = generator_channel or connect(self.generator_address, security=self.security,
                                                              service=self.service, max_message_bytes=self.max_message_bytes)
        self.scorer_channel = scorer_channel or connect(self.scorer_address, security=self.security, service=self.service,
                                                        max_message_bytes=self.max_message_bytes)
        self._generator = generator_pb2_grpc.GeneratorServiceStub(self.generator_channel)
        self._scorer = scorer_pb2_grpc.ScorerServiceStub(self.scorer_channel)

    def _refresh(self) -> None:
        if not self._rotatable:
            return
        assert self.security is not None
        stamp = self.security.files_stamp()
        if stamp is None or stamp in (self._stamp, self._failed_stamp):
            return
        with self._lock:
            if stamp in (self._stamp, self._failed_stamp):
                return
            try:
                self._open()
            except SecurityConfigError as exc:  # a rotation half done: keep the channels we have until the files change again
                self._failed_stamp = stamp
                log.warning("credential files changed but cannot be used yet: %s", exc)
                return
            self._stamp = stamp
        log.info("%s: credential files changed; new channels to the generator and scorer", self.service)

    @property
    def generator(self) -> generator_pb2_grpc.GeneratorServiceStub:
        self._refresh()
        return self._generator

    @property
    def scorer(self) -> scorer_pb2_grpc.ScorerServiceStub:
        self._refresh()
        return self._scorer


class RemoteWorld:
    """The World through generator_svc and scorer_svc, under one caller's `CallScope`."""

    def __init__(self, services: Services, scope: CallScope, repo: ModelRepository | None = None) -> None:
        self.services = services
        self.scope = scope
        self.repo = repo  # for generator_module: the trainer shares the generator's repository
        self._heads: list[HeadInfo] | None = None

    def _generator_call(self, method, request):
        return self.scope.call(method, request, "generator", self.services.generator_address)

    def _scorer_call(self, method, request):
        return self.scope.call(method, request, "scorer", self.services.scorer_address)

    @staticmethod
    def _ref(generator: GeneratorInfo) -> types_pb2.ModelRef:
        return types_pb2.ModelRef(name=generator.name, version=generator.version)

    def generator(self, name: str = "", version: int = 0) -> GeneratorInfo:
        # Checked here as well as by the repository, so every World caller gets the same answer.
        if name:
            validate_name(name, "generator.name")
        if version < 0:
            raise InvalidArgument(f"generator.version {version} is negative")
        response = self._generator_call(self.services.generator.ListModels, generator_pb2.ListModelsRequest())
        wanted = name or response.default_model
        for info in response.models:
            if info.ref.name != wanted:
                continue
            if version in (0, info.ref.version):
                return GeneratorInfo(info.ref.name, info.ref.version, wire.spec_from_model_info(info))
            if version in info.versions:
                # An older version: the service loads it on demand and describes it in Sample's answer.
                sampled = self._generator_call(self.services.generator.Sample, generator_pb2.SampleRequest(
                    model=types_pb2.ModelRef(name=wanted, version=version), count=1))
                return GeneratorInfo(sampled.model.name, sampled.model.version, wire.spec_from_model_info(info))
            raise NotFound(f"generator {wanted!r} has no version {version}; versions: {list(info.versions)}")
        names = ", ".join(m.ref.name for m in response.models) or "none"
        raise NotFound(f"no generator named {wanted!r}; generators: {names}")

    def generator_module(self, generator: GeneratorInfo) -> StagedGenerator:
        if self.repo is None:
            raise FailedPrecondition("this work needs gradients through the generator, so its weights in this "
                                     "process; this service has no model repository to load them from")
        return _local_generator(self.repo, generator.name, generator.version)

    def sample(self, generator: GeneratorInfo, count: int, seed: int, space: str | None = None) -> Latents:
        spec = generator.space(space)
        response = self._generator_call(self.services.generator.Sample, generator_pb2.SampleRequest(
            model=self._ref(generator), count=count, seed=seed, space=wire.space_code(spec.space)))
        return wire.latents_from_proto(response.latents, generator.spec)

    def _synthesize(self, generator: GeneratorInfo, request: generator_pb2.SynthesizeRequest) -> generator_pb2.SynthesizeResponse:
        request.model.CopyFrom(self._ref(generator))
        return self._generator_call(self.services.generator.Synthesize, request)

    def synthesize(self, generator: GeneratorInfo, latents: Latents) -> np.ndarray:
        response = self._synthesize(generator, generator_pb2.SynthesizeRequest(latents=wire.latents_to_proto(latents)))
        return wire.decode_images(response.images)

    def features(self, generator: GeneratorInfo, latents: Latents, layers: Sequence[str]) -> dict[str, np.ndarray]:
        wanted = [layer for layer in layers if layer != IMAGE_LAYER]
        response = self._synthesize(generator, generator_pb2.SynthesizeRequest(
            latents=wire.latents_to_proto(latents), return_layers=wanted, omit_images=IMAGE_LAYER not in layers))
        out = {f.layer: wire.from_tensor(f.values, field=f"features.{f.layer}") for f in response.features}
        if IMAGE_LAYER in layers:
            out[IMAGE_LAYER] = wire.decode_images(response.images)
        return out

    def synthesize_from(self, generator: GeneratorInfo, layer: str, features: np.ndarray) -> np.ndarray:
        response = self._synthesize(generator, generator_pb2.SynthesizeRequest(
            features=types_pb2.LayerFeatures(layer=layer, values=wire.to_tensor(features.astype(np.float32)))))
        return wire.decode_images(response.images)

    def heads(self) -> list[HeadInfo]:
        if self._heads is None:
            response = self._scorer_call(self.services.scorer.ListHeads, scorer_pb2.ListHeadsRequest())
            self._heads = [
                HeadInfo(h.name, HEAD_KIND_NAMES.get(h.kind, "attribute"),
                         tuple(OutputSpec(o.name, tuple(int(d) for d in o.shape), o.min, o.max, tuple(o.labels), o.description)
                               for o in h.outputs), h.differentiable)
                for h in response.heads]
        return self._heads

    def score(self, images: np.ndarray, heads: Sequence[str]) -> Scores:
        if not heads:
            return {}
        request = scorer_pb2.ScoreRequest(images=wire.encode_images(images, types_pb2.IMAGE_ENCODING_RAW_UINT8), heads=list(heads))
        return wire.scores_from_proto(self._scorer_call(self.services.scorer.Score, request).heads)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        response = self._scorer_call(self.services.scorer.EmbedText, scorer_pb2.EmbedTextRequest(texts=list(texts)))
        return wire.from_tensor(response.embeddings, field="embeddings")


_LOCAL_GENERATORS: dict[tuple[str, str, int], StagedGenerator] = {}
_LOCAL_LOCK = threading.Lock()


def _local_generator(repo: ModelRepository, name: str, version: int) -> StagedGenerator:
    """A process-wide cache of generators loaded for gradients (one copy per name and version)."""
    from latentedit.models.registry import load_generator

    key = (str(repo.root), name, version)
    with _LOCAL_LOCK:
        if key not in _LOCAL_GENERATORS:
            _LOCAL_GENERATORS[key] = load_generator(repo.resolve(name, version, kind="generator"))
        return _LOCAL_GENERATORS[key]

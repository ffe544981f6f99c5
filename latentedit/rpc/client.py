"""Small client helpers for callers of the v1 API (the CLI, tests, benchmarks, other services)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from latentedit import observability, wire
from latentedit.api.v1 import generator_pb2, generator_pb2_grpc, scorer_pb2, scorer_pb2_grpc, types_pb2
from latentedit.errors import FailedPrecondition, RemoteError, Unavailable
from latentedit.rpc.security import ClientSecurity
from latentedit.rpc.serving import client_channel_options


def connect(address: str, token: str | None = None, ca_file: str | None = None, *, cert_file: str | None = None,
            key_file: str | None = None, tls: bool | None = None, security: ClientSecurity | None = None,
            service: str = "client", max_message_bytes: int = 64 * 1024 * 1024) -> grpc.Channel:
    """A channel to `address`, wrapped in the observability client interceptors of `service`.

    With `security` exactly that; otherwise from the arguments, then the environment
    (LATENTEDIT_TOKEN, LATENTEDIT_CA, LATENTEDIT_CERT, LATENTEDIT_KEY): TLS when a CA file or a
    client certificate is given (or `tls=True`: the system's roots), plaintext otherwise; a token
    rides on every call as `authorization: Bearer <token>`, over TLS only."""
    if security is None:
        security = ClientSecurity.from_args(token, ca_file, cert_file, key_file, tls)
    if security.tls:
        channel = grpc.secure_channel(address, security.channel_credentials(), options=client_channel_options(max_message_bytes))
    else:
        channel = grpc.insecure_channel(address, options=client_channel_options(max_message_bytes))
    return grpc.intercept_channel(channel, *observability.client_interceptors(service))


def wait_serving(channel: grpc.Channel, service: str = "", timeout_s: float = 120.0, what: str = "service") -> None:
    """Poll grpc.health.v1 until `service` reports SERVING, or raise Unavailable."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError as exc:
            last = f"{exc.code().name}: {exc.details()}"
        time.sleep(0.2)
    raise Unavailable(f"{what} did not report SERVING within {timeout_s:.0f} s (last: {last})")


class NotListening(Unavailable):
    """Nothing answers at the address at all (refused, unresolvable, handshake failed): waiting will not help."""


# A connection refused this long is "nothing listening", not "about to listen": it covers a
# process that has just started and binds its port within a moment.
UNREACHABLE_AFTER_S = 2.0


def await_serving(channel: grpc.Channel, address: str, what: str, timeout_s: float = 120.0, *,
                  unreachable_after_s: float = UNREACHABLE_AFTER_S, hint: str = "",
                  on_wait: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
    """For a person waiting at a command line: tell "nothing there" from "starting up" quickly.

    Nothing answering health checks at `address` for `unreachable_after_s` raises NotListening
    (its message names the address, gRPC's reason and `hint`, e.g. how to start the service).
    A server that answers but is not SERVING yet (models loading) is waited for, up to
    `timeout_s`; `on_wait` gets one line when the waiting starts and one every 10 s after.
    Services calling each other keep `wait_serving`, which waits the whole time either way."""
    stub = health_pb2_grpc.HealthStub(channel)
    start = clock()
    answered, told, attempts = False, -1.0, 0
    last = "no answer"
    while True:
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            answered, last = True, health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                # Refused, unresolvable, TLS refused, or no answer within 2 s (an unroutable
                # address, or a server too busy to answer): not an answer either way.
                last = exc.details() if code == grpc.StatusCode.UNAVAILABLE else "no answer within 2 s"
            else:  # it answered, though not as hoped (e.g. UNIMPLEMENTED: not a gRPC health server); waiting won't help
                raise NotListening(f"{what} at {address} answered the health check with {code.name}: {exc.details()}") from None
        attempts += 1
        elapsed = clock() - start
        if not answered and elapsed >= unreachable_after_s and attempts >= 2:
            refused = "refused" in last.lower()
            headline = f"nothing is listening at {address} ({what})" if refused else f"cannot reach {what} at {address}"
            raise NotListening(f"{headline}: {last}" + (f"; {hint}" if hint else ""))
        if answered:
            if elapsed >= timeout_s:
                raise Unavailable(f"{what} at {address} answers but did not report SERVING within {timeout_s:.0f} s "
                                  f"(last: {last})")
            if on_wait is not None and (told < 0 or elapsed - told >= 10):
                told = elapsed
                on_wait(f"{what} at {address} is up but not SERVING yet ({last}: loading models?); "
                        f"waited {elapsed:.0f} s of at most {timeout_s:.0f} s")
        time.sleep(0.2)


def synthesize_request(
    model: types_pb2.ModelRef,
    latents: np.ndarray,
    encoding: int = types_pb2.IMAGE_ENCODING_RAW_UINT8,
    backend: int = types_pb2.BACKEND_UNSPECIFIED,
    space: str = "z",
) -> generator_pb2.SynthesizeRequest:
    """Latents of `space` -> images."""
    return generator_pb2.SynthesizeRequest(
        model=model,
        latents=types_pb2.Latents(space=wire.space_code(space), values=wire.to_tensor(latents)),
        image_encoding=encoding,
        backend=backend,
    )


def score_request(images: np.ndarray, heads: list[str]) -> scorer_pb2.ScoreRequest:
    """uint8 NHWC images, sent raw (the cheapest encoding), scored by `heads`."""
    return scorer_pb2.ScoreRequest(images=wire.encode_images(images, types_pb2.IMAGE_ENCODING_RAW_UINT8), heads=heads)


class GeneratorClient:
    def __init__(self, channel: grpc.Channel, model: str = "", version: int = 0) -> None:
        self.stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        self.model = model
        self.version = version

    def ref(self) -> types_pb2.ModelRef:
        return types_pb2.ModelRef(name=self.model, version=self.version)

    def sample(self, count: int, seed: int, timeout: float = 60, space: str = "z") -> np.ndarray:
        request = generator_pb2.SampleRequest(model=self.ref(), count=count, seed=seed, space=wire.space_code(space))
        response = self.stub.Sample(request, timeout=timeout)
        return wire.from_tensor(response.latents.values, field="latents")

    def synthesize(
        self,
        latents: np.ndarray,
        encoding: int = types_pb2.IMAGE_ENCODING_RAW_UINT8,
        backend: int = types_pb2.BACKEND_UNSPECIFIED,
        timeout: float = 60,
        space: str = "z",
    ) -> np.ndarray:
        """Latents -> uint8 NHWC images."""
        request = synthesize_request(self.ref(), latents, encoding, backend, space)
        return wire.decode_images(self.stub.Synthesize(request, timeout=timeout).images)


@contextlib.contextmanager
def dependency(name: str, address: str) -> Iterator[None]:
    """Turn a failed call to another service into an error that names it."""
    try:
        yield
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            raise Unavailable(f"the {name} service at {address} is unavailable: {exc.details()}") from exc
        if code == grpc.StatusCode.CANCELLED:
            # Our own cancellations never reach here as RpcError: this one came from the server,
            # which dropped the call (for example while shutting down).
            raise Unavailable(f"the {name} service at {address} dropped the call (shutting down?): {exc.details()}") from exc
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            # This service's own credentials were refused: its set-up, not the caller's token.
            raise FailedPrecondition(f"the {name} service at {address} refused this service's credentials "
                                     f"({code.name}: {exc.details()}); check security.service_token_file") from exc
        raise RemoteError(code, f"the {name} service at {address} answered {code.name}: {exc.details()}") from exc


class ScorerClient:
    def __init__(self, channel: grpc.Channel) -> None:
        self.stub = scorer_pb2_grpc.ScorerServiceStub(channel)

    def list_heads(self, timeout: float = 30) -> list[scorer_pb2.HeadInfo]:
        return list(self.stub.ListHeads(scorer_pb2.ListHeadsRequest(), timeout=timeout).heads)

    def score(self, images: np.ndarray, heads: list[str], timeout: float = 300) -> dict[str, dict[str, np.ndarray]]:
        """uint8 NHWC images -> {head: {output: array}} (captions under the output "captions")."""
        return wire.scores_from_proto(self.stub.Score(score_request(images, heads), timeout=timeout).heads)

    def embed_text(self, texts: list[str], timeout: float = 60) -> np.ndarray:
        response = self.stub.EmbedText(scorer_pb2.EmbedTextRequest(texts=texts), timeout=timeout)
        return wire.from_tensor(response.embeddings, field="embeddings")

"""Server scaffolding shared by every service.

One `ServiceHost` per process: a gRPC server with explicit message-size limits and bounded
concurrency, `grpc.health.v1` (NOT_SERVING until the service says it is warm), server
reflection, one interceptor that turns `LatentEditError`s into status codes, and a graceful
shutdown on SIGTERM / SIGINT (health goes NOT_SERVING, new calls are refused, calls in flight
get a grace period to finish).

Services are built with `ServiceHost.for_service(name, config)`: TLS and bearer tokens from
`config.security` (`latentedit.rpc.security`), observability from `config.observability`. The
interceptor chain, outermost first: observability (so refused calls are counted and traced
too), authentication (refuses before any handler work), error mapping.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from latentedit import observability
from latentedit.config import Config, SecurityConfig, ServingOptions
from latentedit.errors import LatentEditError
from latentedit.observability import ObservabilityConfig
from latentedit.rpc.security import ServerSecurity, check_service_scopes, resolve

log = logging.getLogger(__name__)
# Health service name that reports the process alive, for Kubernetes liveness probes: it
# stays SERVING while models load (readiness, under "", is NOT_SERVING then).
LIVENESS = "liveness"


# Keepalive, set here once for both sides. Clients ping idle connections every 30 s (a peer that
# vanished without a FIN, as a killed pod does, is noticed within 40 s and its address dropped
# from the round-robin set); servers accept pings that often, idle or not, instead of answering
# GOAWAY "too_many_pings" as gRPC's 5-minute default would.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
MAX_RECONNECT_BACKOFF_MS = 5_000


def channel_options(max_message_bytes: int = 64 * 1024 * 1024) -> list[tuple[str, Any]]:
    """Options for servers (and the base of clients'): the same explicit size limits on both sides."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def client_channel_options(max_message_bytes: int = 64 * 1024 * 1024) -> list[tuple[str, Any]]:
    """Client channels: the size limits, keepalive, and round-robin load balancing.

    gRPC's default policy (pick_first) sends every call of a channel to one backend, so behind a
    plain Kubernetes Service a second generator replica would get nothing. With round_robin a
    `dns:///generator-headless:50051` target (a headless Service: one A record per ready pod)
    spreads calls over every address the name resolves to, and re-resolves when one goes away."""
    return [
        *channel_options(max_message_bytes),
        ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # gRPC's reconnect backoff grows to 120 s by default: a dependency back after a restart
        # would stay "connection refused" to its callers for up to two minutes.
        ("grpc.min_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]


def _already_aborted(context: grpc.ServicerContext) -> bool:
    code = context.code() if hasattr(context, "code") else None
    return code is not None and code != grpc.StatusCode.OK


def _abort_for(exc: BaseException, context: grpc.ServicerContext, method: str) -> None:
    if isinstance(exc, LatentEditError):
        context.abort(exc.code, exc.message)
    log.exception("unhandled error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}; see the server log")


class CallCounter:
    """How many RPCs are inside this server's handlers: the shutdown log says how many it
    drains, and callers (tests, operators) can wait for a server to go idle."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.in_flight = 0
        self.started = 0

    def enter(self) -> None:
        with self._changed:
            self.in_flight += 1
            self.started += 1
            self._changed.notify_all()

    def leave(self) -> None:
        with self._changed:
            self.in_flight -= 1
            self._changed.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no call is inside a handler; False if `timeout_s` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: self.in_flight == 0, timeout_s)


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Maps LatentEditError to its status code and anything else to INTERNAL, for every RPC,
    and counts the calls inside handlers."""

    def __init__(self, calls: CallCounter | None = None) -> None:
        self.calls = calls or CallCounter()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        if getattr(behaviour, "experimental_non_blocking", False):
            # It answers through a callback gRPC passes it (health's Watch): nothing returns or
            # yields through a wrapper, and wrapping it would break gRPC's calling convention.
            return handler
        if handler.unary_unary:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._wrap_unary(handler.stream_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, method))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._wrap_stream(handler.stream_stream, method))
        return handler

    def _wrap_unary(self, fn: Callable, method: str) -> Callable:
        @functools.wraps(fn)
        def wrapper(request, context):
            self.calls.enter()
            try:
                return fn(request, context)
            except Exception as exc:
                if _already_aborted(context):
                    raise
                _abort_for(exc, context, method)
            finally:
                self.calls.leave()

        return wrapper

    def _wrap_stream(self, fn: Callable, method: str) -> Callable:
        @functools.wraps(fn)
        def wrapper(request, context) -> Iterator:
            self.calls.enter()
            try:
                yield from fn(request, context)
            except Exception as exc:
                if _already_aborted(context):
                    raise
                _abort_for(exc, context, method)
            finally:
                # Also when gRPC drops the stream after a cancel or a passed deadline.
                self.calls.leave()

        return wrapper


class StopsOnSignal:
    """SIGTERM / SIGINT request a stop; `wait()` blocks until then and stops gracefully. A subclass
    sets `self._stop_requested = threading.Event()` and implements `stop()`."""

    _stop_requested: threading.Event

    def stop(self) -> None:
        raise NotImplementedError

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop_requested.set())

    def wait(self) -> None:
        """Block until a stop is requested, then shut down gracefully."""
        while not self._stop_requested.wait(0.5):
            pass
        self.stop()


class ServiceHost(StopsOnSignal):
    """Hosts one or more servicers on one port with health, reflection and shutdown.

    `security` None serves plaintext without tokens (tests and embedding that build a host by
    hand); the services pass their config's section through `for_service`, where plaintext
    needs `insecure: true`. A section that cannot work raises SecurityConfigError (one line)
    here, before anything loads."""

    def __init__(self, options: ServingOptions, security: SecurityConfig | None = None, service: str = "",
                 observability_config: ObservabilityConfig | None = None) -> None:
        self.options = options
        self.service = service or "latentedit"
        self.security: ServerSecurity | None = resolve(security) if security is not None else None
        if security is not None and self.security is None:
            log.warning("%s: serving plaintext without tokens (security.insecure); any client that reaches the port "
                        "can call every RPC", self.service)
        self.observability = observability_config or ObservabilityConfig()
        self.calls = CallCounter()
        interceptors: list[grpc.ServerInterceptor] = [*observability.server_interceptors(self.service)]
        if self.security is not None:
            interceptors.append(self.security.interceptor())
        interceptors.append(ErrorMappingInterceptor(self.calls))
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=options.max_workers, thread_name_prefix="rpc"),
            interceptors=interceptors,
            options=channel_options(options.max_message_bytes),
            maximum_concurrent_rpcs=options.max_concurrent_rpcs,
        )
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names: list[str] = []
        self._on_shutdown: list[Callable[[], None]] = []
        self._stop_requested = threading.Event()
        self.port = 0

    @classmethod
    def for_service(cls, name: str, config: Config) -> ServiceHost:
        """The host of service `name` (generator, scorer, trainer, editor) as `config` says."""
        return cls(config.services[name], config.security, name, config.observability)

    def add(self, register: Callable[[Any, grpc.Server], None], servicer: Any, full_name: str) -> None:
        if self.security is not None:
            check_service_scopes(full_name)
        register(servicer, self.server)
        self.service_names.append(full_name)

    def on_shutdown(self, callback: Callable[[], None]) -> None:
        self._on_shutdown.append(callback)

    def start(self) -> int:
        names = [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        self.set_serving(False)
        observability.start(self.service, self.observability)
        address = f"{self.options.host}:{self.options.port}"
        if self.security is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, self.security.credentials())
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.options.host}:{self.options.port}")
        self.server.start()
        log.info("listening on port %d (%s): %s", self.port, self.transport(), ", ".join(self.service_names))
        return self.port

    def transport(self) -> str:
        if self.security is None:
            return "plaintext, no tokens"
        mode = "mutual TLS" if self.security.require_client_cert else "TLS"
        return f"{mode}, {len(self.security.tokens.current().tokens)} bearer token(s), certificate {self.security.certificates.description}"

    def set_serving(self, serving: bool) -> None:
        """Readiness: "" and each service name. "liveness" is SERVING while the process runs."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            self.health.set(name, status)
        self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)

    def _label(self) -> str:
        return ", ".join(name.rsplit(".", 1)[-1] for name in self.service_names) or "server"

    def stop(self, grace_s: float | None = None) -> None:
        grace = self.options.grace_period_s if grace_s is None else grace_s
        log.info("%s shutting down: health NOT_SERVING, %.1f s grace for %d call(s) in flight", self._label(), grace,
                 self.calls.in_flight)
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        for callback in self._on_shutdown:
            try:
                callback()
            except Exception:  # noqa: BLE001 - shutdown goes on
                log.exception("shutdown callback failed")
        log.info("%s stopped", self._label())


def deadline_seconds(context: grpc.ServicerContext, default: float = 300.0) -> float:
    """Seconds left before the caller's deadline (a default when it set none)."""
    remaining = context.time_remaining()
    # gRPC reports "no deadline" as None or as a huge number (about 9e18 s).
    if remaining is None or remaining > 1e8:
        return default
    return max(0.0, remaining)


class PeriodicTask:
    """Runs `fn` every `interval_s` seconds on a daemon thread until `stop()`; errors are logged."""

    def __init__(self, name: str, interval_s: float, fn: Callable[[], None]) -> None:
        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    fn()
                except Exception:  # noqa: BLE001 - keep going; the next round may succeed
                    log.exception("%s failed", name)

        self._thread = threading.Thread(target=loop, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

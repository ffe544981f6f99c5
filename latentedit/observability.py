"""Metrics, traces and structured logs for the services (the production issue, #12).

The contract the serving layer wires (latentedit/rpc/serving.py and rpc/client.py call these):

- `ObservabilityConfig`: the `observability:` section of the YAML config.
- `start(service, config)`: once per process, before serving (metrics HTTP port, tracer
  provider, JSON logs). Calling it again (several services in one process) adds that service.
- `server_interceptors(service)`: gRPC server interceptors for every RPC of that service; put
  them first (outermost) in the server's interceptor list.
- `client_interceptors(service)`: interceptors for the channels a service (or client) opens
  (`grpc.intercept_channel(channel, *client_interceptors(name))`), so a trace continues
  across editor -> generator -> scorer.

Metrics (Prometheus text format at http://<host>:<metrics_port>/metrics; `prometheus_client`'s
process and Python collectors come with them):

    latentedit_rpcs_total{service,method,code}              RPCs handled, by final status code
    latentedit_rpc_duration_seconds{service,method}         handler latency (streams: until the last message)
    latentedit_rpcs_in_flight{service}                      RPCs inside handlers now
    latentedit_stream_messages_total{service,method,direction}  messages streamed (direction: sent,
                                                            received); the editor's Edit frames are
                                                            method="latentedit.v1.EditorService/Edit", sent
    latentedit_client_rpcs_total{service,method,code}       calls this service made to others
    latentedit_batch_size_rows{batcher}                     rows per batch computed (histogram)
    latentedit_batch_duration_seconds{batcher}              compute time per batch
    latentedit_batcher_rows_total{batcher}                  rows computed (rate() = rows/s)
    latentedit_batcher_dropped_rows_total{batcher,reason}   rows dropped unrun (cancelled, expired)
    latentedit_batcher_refused_total{batcher,reason}        requests refused at admission (queue_full, deadline, queue_wait)
    latentedit_batcher_queue_rows{batcher}                  rows waiting now
    latentedit_batchers{batcher}                            batchers alive (one thread each)
    latentedit_model_load_seconds{kind}                     time to load (and warm) a model
    latentedit_models_loaded{kind}                          models loaded now (generator versions, ...)
    latentedit_model_evictions_total{kind}                  models unloaded by the LRU bound

Jobs by state (and anything else counted elsewhere) come through `register_gauge_callback`.

Traces: OpenTelemetry spans for every RPC, server side (context taken from the call's
metadata, W3C `traceparent`) and client side (context injected into the call's metadata), so
one edit is one trace over the editor, generator and scorer. Exported over OTLP/gRPC when
`otlp_endpoint` is set (`http://collector:4317`: plaintext; `https://...`: TLS); with
`record_spans` the last spans stay in memory (`recorded_spans()`, for tests and debugging).

Logs: with `json_logs`, one JSON object per line on stderr with time, level, logger, message,
service, and the trace and span ids of the RPC the line was logged in.
"""

from __future__ import annotations

import collections
import json
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from latentedit.errors import LatentEditError

log = logging.getLogger(__name__)

# Finished spans kept in memory when `record_spans` is on (oldest dropped first).
RECORDED_SPANS_LIMIT = 10_000
# Methods counted in metrics but not traced: probes would fill the traces with noise.
UNTRACED_PREFIXES = ("grpc.health.", "grpc.reflection.")
# Server-side codes that mark a span as an error (OpenTelemetry's gRPC conventions): the
# others are the caller's mistake, recorded as the status code attribute only.
SERVER_ERROR_CODES = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
                                grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS})


@dataclass
class ObservabilityConfig:
    metrics_port: int = 0  # 0: no metrics endpoint
    # Host the metrics endpoint binds ("0.0.0.0": every IPv4 interface).
    metrics_host: str = "0.0.0.0"
    # Per-service ports, for several services on one host (the local `serve` of all four):
    # e.g. {"generator": 9101, "scorer": 9102}; a service not named uses metrics_port.
    metrics_ports: dict[str, int] = field(default_factory=dict)
    otlp_endpoint: str = ""  # empty: traces are not exported
    # Share of new traces recorded (a caller's sampled trace is always continued).
    trace_sample_ratio: float = 1.0
    # Keep the last RECORDED_SPANS_LIMIT finished spans in this process (recorded_spans()).
    record_spans: bool = False
    json_logs: bool = False

    def port_for(self, service: str) -> int:
        return int(self.metrics_ports.get(service, self.metrics_port))


# ---- metrics ---------------------------------------------------------------------------------

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

RPCS = Counter("latentedit_rpcs", "RPCs handled, by service, method and final status code.", ["service", "method", "code"])
RPC_DURATION = Histogram("latentedit_rpc_duration_seconds", "Time inside the handler (streams: until the last message).",
                         ["service", "method"], buckets=_LATENCY_BUCKETS)
RPCS_IN_FLIGHT = Gauge("latentedit_rpcs_in_flight", "RPCs inside this service's handlers now.", ["service"])
STREAM_MESSAGES = Counter("latentedit_stream_messages", "Messages of streaming RPCs (direction: sent or received).",
                          ["service", "method", "direction"])
CLIENT_RPCS = Counter("latentedit_client_rpcs", "Calls this service made to other services, by final status code.",
                      ["service", "method", "code"])
BATCH_SIZE = Histogram("latentedit_batch_size_rows", "Rows per batch computed.", ["batcher"], buckets=_ROW_BUCKETS)
BATCH_DURATION = Histogram("latentedit_batch_duration_seconds", "Compute time per batch.", ["batcher"], buckets=_LATENCY_BUCKETS)
BATCHER_ROWS = Counter("latentedit_batcher_rows", "Rows computed by batchers (rate() gives rows/s).", ["batcher"])
BATCHER_DROPPED = Counter("latentedit_batcher_dropped_rows", "Rows dropped before computing: cancelled (caller gone) or "
                          "expired (deadline passed while queued).", ["batcher", "reason"])
BATCHER_REFUSED = Counter("latentedit_batcher_refused", "Requests refused at admission: queue_full (row bound), deadline "
                          "(the work ahead outlasts the caller's deadline) or queue_wait (it outlasts max_queue_wait_s).",
                          ["batcher", "reason"])
MODEL_LOAD = Histogram("latentedit_model_load_seconds", "Time to load a model (and warm it up, for generators).", ["kind"],
                       buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
MODELS_LOADED = Gauge("latentedit_models_loaded", "Models loaded now, by kind.", ["kind"])
MODEL_EVICTIONS = Counter("latentedit_model_evictions", "Models unloaded by an LRU bound, by kind.", ["kind"])


class BatcherMetrics:
    """The metrics of one kind of batcher (children resolved once, not per batch)."""

    def __init__(self, kind: str) -> None:
        self._size = BATCH_SIZE.labels(kind)
        self._duration = BATCH_DURATION.labels(kind)
        self._rows = BATCHER_ROWS.labels(kind)
        self._kind = kind

    def batch(self, rows: int, seconds: float) -> None:
        self._size.observe(rows)
        self._duration.observe(seconds)
        self._rows.inc(rows)

    def dropped(self, reason: str, rows: int) -> None:
        BATCHER_DROPPED.labels(self._kind, reason).inc(rows)

    def refused(self, reason: str) -> None:
        BATCHER_REFUSED.labels(self._kind, reason).inc()


def batcher_metrics(kind: str) -> BatcherMetrics:
    return BatcherMetrics(kind)


def observe_model_load(kind: str, seconds: float) -> None:
    MODEL_LOAD.labels(kind).observe(seconds)


GaugeFn = Callable[[], float | Mapping[tuple[str, ...], float]]


class _CallbackGauges(Collector):
    """Gauges whose values are read from callbacks at scrape time (`register_gauge_callback`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gauges: dict[str, tuple[str, tuple[str, ...], GaugeFn]] = {}

    def set(self, name: str, help_text: str, fn: GaugeFn, labels: Sequence[str]) -> None:
        with self._lock:
            self._gauges[name] = (help_text, tuple(labels), fn)

    def remove(self, name: str, fn: GaugeFn | None = None) -> None:
        with self._lock:
            if fn is None or (name in self._gauges and self._gauges[name][2] is fn):
                self._gauges.pop(name, None)

    def describe(self):
        return []  # values are only known at scrape time; names may be added later

    def collect(self):
        with self._lock:
            gauges = list(self._gauges.items())
        for name, (help_text, labels, fn) in gauges:
            family = GaugeMetricFamily(name, help_text, labels=list(labels))
            try:
                value = fn()
            except Exception:  # noqa: BLE001 - one broken callback must not break the scrape
                log.exception("gauge callback %s failed", name)
                continue
            if isinstance(value, Mapping):
                for key, number in value.items():
                    family.add_metric([str(k) for k in key], float(number))
            else:
                family.add_metric([], float(value))
            yield family


_CALLBACK_GAUGES = _CallbackGauges()
REGISTRY.register(_CALLBACK_GAUGES)


def register_gauge_callback(name: str, help_text: str, fn: GaugeFn, labels: Sequence[str] = ()) -> None:
    """Expose gauge `name`, read from `fn()` at every scrape.

    `fn` returns a number (no labels) or a mapping from label-value tuples to numbers, e.g. for
    jobs by state: `register_gauge_callback("latentedit_jobs", "Jobs by state", store.count_by_state,
    labels=("state",))` with `count_by_state() -> {("RUNNING",): 1, ("QUEUED",): 3}`. Registering a
    name again replaces its callback (a service rebuilt in the same process)."""
    _CALLBACK_GAUGES.set(name, help_text, fn, labels)


def unregister_gauge_callback(name: str, fn: GaugeFn | None = None) -> None:
    """Stop exposing `name`; with `fn`, only while `fn` is still its callback (a service shutting
    down must not remove the gauge of one built after it in the same process)."""
    _CALLBACK_GAUGES.remove(name, fn)


# ---- traces ----------------------------------------------------------------------------------


class SpanRecorder(SpanExporter):
    """Keeps the last `limit` finished spans in memory, for tests and debugging."""

    def __init__(self, limit: int = RECORDED_SPANS_LIMIT) -> None:
        self._spans: deque[ReadableSpan] = deque(maxlen=limit)
        self._changed = threading.Condition()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._changed:
            self._spans.extend(spans)
            self._changed.notify_all()
        return SpanExportResult.SUCCESS

    def spans(self) -> list[ReadableSpan]:
        with self._changed:
            return list(self._spans)

    def clear(self) -> None:
        with self._changed:
            self._spans.clear()

    def wait_for(self, predicate: Callable[[list[ReadableSpan]], bool], timeout_s: float) -> bool:
        """Block until `predicate(spans)` holds; False if `timeout_s` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(list(self._spans)), timeout_s)

    def shutdown(self) -> None:
        pass


@dataclass
class _State:
    services: list[str] = field(default_factory=list)
    provider: TracerProvider | None = None
    otlp_endpoints: set[str] = field(default_factory=set)
    recorder: SpanRecorder | None = None
    metrics_servers: dict[tuple[str, int], Any] = field(default_factory=dict)
    json_handler: logging.Handler | None = None


_STATE = _State()
_STATE_LOCK = threading.RLock()


def start(service: str, config: ObservabilityConfig) -> None:
    """Set up this process's metrics endpoint, tracing and logging for `service`.

    Once per process in production; each further call (services sharing a process, as in the
    tests) adds its service and whatever its config asks for that is not yet running."""
    with _STATE_LOCK:
        if service not in _STATE.services:
            _STATE.services.append(service)
        _start_tracing(service, config)
        port = config.port_for(service)
        if port:
            key = (config.metrics_host, port)
            if key not in _STATE.metrics_servers:
                try:
                    _STATE.metrics_servers[key] = start_http_server(port, addr=config.metrics_host)
                except OSError as exc:
                    raise RuntimeError(
                        f"{service}: cannot serve metrics on {config.metrics_host}:{port} ({exc.strerror}); several services "
                        f"on one host need their own ports: observability.metrics_ports, e.g. {{generator: 9101, scorer: 9102}}"
                    ) from exc
                log.info("%s: metrics on http://%s:%d/metrics", service, config.metrics_host, port)
        if config.json_logs and _STATE.json_handler is None:
            _STATE.json_handler = _use_json_logs()


def _start_tracing(service: str, config: ObservabilityConfig) -> None:
    if _STATE.provider is None:
        resource = Resource.create({"service.name": f"latentedit-{service}", "service.namespace": "latentedit"})
        provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(config.trace_sample_ratio)))
        trace.set_tracer_provider(provider)
        if trace.get_tracer_provider() is not provider:  # someone else (an embedding app) set one first
            log.warning("a tracer provider was already set in this process; latentedit spans go to it")
            return
        _STATE.provider = provider
    provider = _STATE.provider
    if config.record_spans and _STATE.recorder is None:
        _STATE.recorder = SpanRecorder()
        provider.add_span_processor(SimpleSpanProcessor(_STATE.recorder))
    if config.otlp_endpoint and config.otlp_endpoint not in _STATE.otlp_endpoints:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
        _STATE.otlp_endpoints.add(config.otlp_endpoint)
        log.info("%s: exporting traces over OTLP to %s", service, config.otlp_endpoint)


def recorder() -> SpanRecorder | None:
    """The in-memory span recorder (None unless a config asked for `record_spans`)."""
    return _STATE.recorder


def recorded_spans() -> list[ReadableSpan]:
    return [] if _STATE.recorder is None else _STATE.recorder.spans()


def flush(timeout_s: float = 10.0) -> bool:
    """Export every finished span now (before a process exits, or in a test)."""
    provider = _STATE.provider
    return True if provider is None else provider.force_flush(int(timeout_s * 1000))


def metrics_text() -> str:
    """This process's metrics in the Prometheus text format (what /metrics serves)."""
    from prometheus_client import generate_latest

    return generate_latest(REGISTRY).decode()


def _tracer(service: str) -> trace.Tracer:
    return trace.get_tracer(f"latentedit.{service}")


def current_trace_id() -> str:
    """The current span's trace id as 32 hex digits ("" outside any trace)."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


# ---- server interceptor ----------------------------------------------------------------------


def _final_code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    code = context.code() if hasattr(context, "code") else None
    return code if isinstance(code, grpc.StatusCode) else None


def _code_of_error(exc: BaseException, context: grpc.ServicerContext) -> grpc.StatusCode:
    if isinstance(exc, LatentEditError):  # raised by the handler (this interceptor inside the error mapping)
        return exc.code
    aborted = _final_code(context)  # context.abort() by the handler or an inner interceptor
    if aborted is not None and aborted != grpc.StatusCode.OK:
        return aborted
    return grpc.StatusCode.INTERNAL


def _code_of_end(context: grpc.ServicerContext) -> grpc.StatusCode:
    """The code of a call whose handler ended or was closed without raising."""
    code = _final_code(context)
    if code is not None and code != grpc.StatusCode.OK:
        return code
    if not context.is_active():  # the caller went away before the end: the RPC did not end OK
        remaining = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
    return grpc.StatusCode.OK


class _ServerCall:
    """One RPC's metrics and span; `end` once with the final code."""

    def __init__(self, interceptor: ServerInterceptor, method: str, context: grpc.ServicerContext) -> None:
        self.interceptor = interceptor
        self.method = method
        self.started = time.perf_counter()
        self.sent = 0
        self.span: trace.Span | None = None
        parent = propagate.extract({key: value for key, value in context.invocation_metadata() or ()
                                    if isinstance(value, str)})
        if not method.startswith(UNTRACED_PREFIXES):
            service_name, _, method_name = method.partition("/")
            self.span = interceptor.tracer.start_span(
                method, context=parent, kind=SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": service_name, "rpc.method": method_name,
                            "latentedit.service": interceptor.service},
            )
            self.context = trace.set_span_in_context(self.span, parent)
        else:
            self.context = parent
        interceptor.in_flight.inc()
        self._ended = False

    def attach(self) -> object:
        return otel_context.attach(self.context)

    @staticmethod
    def detach(token: object) -> None:
        otel_context.detach(token)  # type: ignore[arg-type]

    def end(self, code: grpc.StatusCode, error: BaseException | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        interceptor = self.interceptor
        interceptor.in_flight.dec()
        RPCS.labels(interceptor.service, self.method, code.name).inc()
        RPC_DURATION.labels(interceptor.service, self.method).observe(time.perf_counter() - self.started)
        if self.span is not None:
            self.span.set_attribute("rpc.grpc.status_code", code.value[0])
            if self.sent:
                self.span.set_attribute("rpc.messages_sent", self.sent)
            if error is not None and not isinstance(error, LatentEditError) and code == grpc.StatusCode.INTERNAL:
                self.span.record_exception(error)
            if code in SERVER_ERROR_CODES:
                self.span.set_status(Status(StatusCode.ERROR, code.name))
            self.span.end()


class _CountingRequests:
    """A request iterator that counts the messages the handler reads."""

    def __init__(self, requests: Iterator, counter: Any) -> None:
        self._requests = requests
        self._counter = counter

    def __iter__(self) -> _CountingRequests:
        return self

    def __next__(self) -> Any:
        item = next(self._requests)
        self._counter.inc()
        return item

    def __getattr__(self, name: str) -> Any:  # the rest of grpc's request iterator (e.g. is_active)
        return getattr(self._requests, name)


class ServerInterceptor(grpc.ServerInterceptor):
    """Metrics and a server span for every RPC of one service."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.tracer = _tracer(service)
        self.in_flight = RPCS_IN_FLIGHT.labels(service)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        if getattr(behaviour, "experimental_non_blocking", False):
            # Answers through a callback gRPC passes it (health's Watch): left as it is (see serving.py).
            return handler
        method = handler_call_details.method.lstrip("/")
        if handler.unary_unary:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, method, False))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._unary(handler.stream_unary, method, True))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._stream(handler.unary_stream, method, False))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._stream(handler.stream_stream, method, True))
        return handler

    def _requests(self, requests: Any, method: str, streaming: bool) -> Any:
        if not streaming:
            return requests
        return _CountingRequests(requests, STREAM_MESSAGES.labels(self.service, method, "received"))

    def _unary(self, fn: Callable, method: str, request_streaming: bool) -> Callable:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            call = _ServerCall(self, method, context)
            token = call.attach()
            try:
                response = fn(self._requests(request, method, request_streaming), context)
            except BaseException as exc:
                call.end(_code_of_error(exc, context), exc)
                raise
            finally:
                call.detach(token)
            call.end(_code_of_end(context))
            return response

        return wrapper

    def _stream(self, fn: Callable, method: str, request_streaming: bool) -> Callable:
        sent_counter = STREAM_MESSAGES.labels(self.service, method, "sent")

        def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = _ServerCall(self, method, context)
            inner: Any = None
            try:
                # The span is the current context only while the handler runs (each step of
                # its generator), never across a yield: gRPC may close this generator from
                # another thread.
                token = call.attach()
                try:
                    inner = iter(fn(self._requests(request, method, request_streaming), context))
                finally:
                    call.detach(token)
                while True:
                    token = call.attach()
                    try:
                        item = next(inner)
                    except StopIteration:
                        break
                    finally:
                        call.detach(token)
                    call.sent += 1
                    sent_counter.inc()
                    yield item
            except GeneratorExit:  # gRPC stopped reading: the caller cancelled or its deadline passed
                call.end(_code_of_end(context) if not context.is_active() else grpc.StatusCode.CANCELLED)
                raise
            except BaseException as exc:
                call.end(_code_of_error(exc, context), exc)
                raise
            finally:
                close = getattr(inner, "close", None)
                if close is not None:
                    close()
                call.end(_code_of_end(context))

        return wrapper


# ---- client interceptor ----------------------------------------------------------------------


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class ClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """A client span for every call, its context injected into the call's metadata (W3C
    traceparent), so the server's span continues the caller's trace; counts calls by code."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.tracer = _tracer(service)

    def _call(self, continuation: Callable, details: grpc.ClientCallDetails, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        method = method.lstrip("/")
        traced = not method.startswith(UNTRACED_PREFIXES)
        span: trace.Span | None = None
        metadata = list(details.metadata or ())
        if traced:
            service_name, _, method_name = method.partition("/")
            span = self.tracer.start_span(method, kind=SpanKind.CLIENT,
                                          attributes={"rpc.system": "grpc", "rpc.service": service_name,
                                                      "rpc.method": method_name, "latentedit.service": self.service})
            carrier: dict[str, str] = {}
            propagate.inject(carrier, context=trace.set_span_in_context(span))
            metadata.extend(carrier.items())
        new_details = _CallDetails(details.method, details.timeout, metadata, details.credentials,
                                   getattr(details, "wait_for_ready", None), getattr(details, "compression", None))
        try:
            call = continuation(new_details, request)
        except BaseException:
            self._done(span, method, grpc.StatusCode.UNKNOWN)
            raise

        def done(finished: Any) -> None:
            try:
                code = finished.code()
            except Exception:  # noqa: BLE001
                code = grpc.StatusCode.UNKNOWN
            self._done(span, method, code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN)

        call.add_done_callback(done)
        return call

    def _done(self, span: trace.Span | None, method: str, code: grpc.StatusCode) -> None:
        CLIENT_RPCS.labels(self.service, method, code.name).inc()
        if span is not None:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code != grpc.StatusCode.OK:
                span.set_status(Status(StatusCode.ERROR, code.name))
            span.end()

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return self._call(continuation, client_call_details, request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return self._call(continuation, client_call_details, request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return self._call(continuation, client_call_details, request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return self._call(continuation, client_call_details, request_iterator)


def server_interceptors(service: str) -> list[Any]:
    """Metrics and tracing for every RPC of `service`: put these first in the server's list."""
    return [ServerInterceptor(service)]


def client_interceptors(service: str) -> list[Any]:
    """Tracing (context into each call's metadata) and call counts for channels `service` opens."""
    return [ClientInterceptor(service)]


# ---- logs ------------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the trace and span ids of the span current when it was logged."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": ",".join(_STATE.services),
            "thread": record.threadName,
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = format(span_context.trace_id, "032x")
            entry["span_id"] = format(span_context.span_id, "016x")
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _use_json_logs() -> logging.Handler:
    """JSON on every handler of the root logger (a stderr handler when it has none)."""
    root = logging.getLogger()
    formatter = JsonFormatter()
    if not root.handlers:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        root.addHandler(handler)
        if root.level == logging.WARNING:  # the default: nothing set it
            root.setLevel(logging.INFO)
    for handler in root.handlers:
        handler.setFormatter(formatter)
    return root.handlers[0]

"""Metrics, traces and JSON logs (latentedit/observability.py) through real services.

The metrics are read the way Prometheus reads them: over HTTP from each service's metrics
port, parsed by prometheus_client's own text parser. Traces are read from the in-process span
recorder (services in this process) or from an OTLP collector this test runs (services as
processes). Every wait is on a signal (a condition or the collector), bounded by WAIT_S.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from concurrent import futures

import grpc
import numpy as np
import pytest
import yaml
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from latentedit import observability, wire
from latentedit.api.v1 import editor_pb2, editor_pb2_grpc, generator_pb2, generator_pb2_grpc, types_pb2
from latentedit.rpc.client import connect, wait_serving
from tests.conftest import ROOT, free_port, start_services

WAIT_S = 60.0
MODEL = types_pb2.ModelRef(name="dcgan-faces")
EDIT = "latentedit.v1.EditorService/Edit"
SYNTHESIZE = "latentedit.v1.GeneratorService/Synthesize"
SCORE = "latentedit.v1.ScorerService/Score"
BOUNDARY = "obs-axis0"


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of http://127.0.0.1:port/metrics, by (sample name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _write_boundary(repo) -> None:
    """A boundary to edit along: any unit vector will do."""
    from latentedit.methods.interfacegan import Boundary, boundary_artifact
    from latentedit.world import LocalWorld

    normal = np.zeros(100, np.float32)
    normal[0] = 1
    generator = LocalWorld(repo).generator("dcgan-faces")
    boundary_artifact(BOUNDARY, Boundary(normal, 0.0), generator, "z", {"head": "", "output": BOUNDARY}).save(repo, {})


def _edit_request(seed: int, frames: int = 3) -> editor_pb2.EditRequest:
    return editor_pb2.EditRequest(seed=editor_pb2.SeedStart(seed=seed, count=2), num_frames=frames, score_heads=["expression"],
                                  interfacegan=editor_pb2.InterFaceGANEdit(boundary=BOUNDARY, start_distance=-2, end_distance=2))


def _synthesize_request(rows: int) -> generator_pb2.SynthesizeRequest:
    z = np.random.default_rng(rows).standard_normal((rows, 100)).astype(np.float32)
    return generator_pb2.SynthesizeRequest(model=MODEL, latents=types_pb2.Latents(space=types_pb2.LATENT_SPACE_Z,
                                                                                   values=wire.to_tensor(z)))


@pytest.fixture(scope="module")
def suite(installed_repo):
    """Generator, scorer and editor in this process, with a metrics port and the span recorder."""
    _write_boundary(installed_repo)
    port = free_port()
    config, hosts = start_services(installed_repo, names=("generator", "scorer", "editor"),
                                   observability__metrics_port=port, observability__record_spans=True)
    channels = {name: connect(f"localhost:{host.port}") for name, host in hosts.items()}
    for channel in channels.values():
        wait_serving(channel, timeout_s=WAIT_S)
    yield port, hosts, channels
    for channel in channels.values():
        channel.close()
    for host in reversed(list(hosts.values())):
        host.stop(0)


def test_metrics_endpoint_counts_rpcs_by_code_batches_and_frames(suite):
    port, hosts, channels = suite
    generator = generator_pb2_grpc.GeneratorServiceStub(channels["generator"])
    editor = editor_pb2_grpc.EditorServiceStub(channels["editor"])
    before = scrape(port)

    for rows in (3, 5):
        generator.Synthesize(_synthesize_request(rows), timeout=60)
    empty = generator_pb2.SynthesizeRequest(model=MODEL, latents=types_pb2.Latents(
        space=types_pb2.LATENT_SPACE_Z, values=wire.to_tensor(np.zeros((0, 100), np.float32))))
    with pytest.raises(grpc.RpcError) as refused:
        generator.Synthesize(empty, timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as missing:
        list(editor.Edit(editor_pb2.EditRequest(seed=editor_pb2.SeedStart(seed=0, count=1), num_frames=2,
                                                interfacegan=editor_pb2.InterFaceGANEdit(boundary="no-such-boundary")),
                         timeout=60))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    frames = list(editor.Edit(_edit_request(seed=11, frames=4), timeout=120))
    # The editor's handler returns after gRPC has sent its last frame: wait for it to leave.
    assert hosts["editor"].calls.wait_idle(WAIT_S)
    after = scrape(port)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    # RPCs by service, method and code: exactly ours where only this test calls (the editor
    # calls the generator too, so its OK count grows by at least ours).
    assert delta("latentedit_rpcs_total", service="generator", method=SYNTHESIZE, code="INVALID_ARGUMENT") == 1
    assert delta("latentedit_rpcs_total", service="generator", method=SYNTHESIZE, code="OK") >= 2
    assert delta("latentedit_rpcs_total", service="editor", method=EDIT, code="OK") == 1
    assert delta("latentedit_rpcs_total", service="editor", method=EDIT, code="NOT_FOUND") == 1
    assert delta("latentedit_rpcs_total", service="scorer", method=SCORE, code="OK") >= 1
    # Latency histograms by method, one observation per RPC.
    assert delta("latentedit_rpc_duration_seconds_count", service="generator", method=SYNTHESIZE) >= 3
    assert delta("latentedit_rpc_duration_seconds_count", service="editor", method=EDIT) == 2
    # Frames streamed: the editor's Edit responses, each one counted.
    assert len(frames) == 4
    assert delta("latentedit_stream_messages_total", service="editor", method=EDIT, direction="sent") == len(frames)
    # The editor's own calls downstream, by code.
    assert delta("latentedit_client_rpcs_total", service="editor", method=SYNTHESIZE, code="OK") >= 1
    assert delta("latentedit_client_rpcs_total", service="editor", method=SCORE, code="OK") >= 1
    # Batches: sizes (histogram) and rows (a counter, whose rate is rows/s) of both batchers.
    assert delta("latentedit_batch_size_rows_count", batcher="generator") >= 2
    assert delta("latentedit_batch_size_rows_sum", batcher="generator") >= 3 + 5
    assert delta("latentedit_batcher_rows_total", batcher="generator") >= 3 + 5
    assert delta("latentedit_batch_size_rows_sum", batcher="scorer") >= 2 * len(frames)
    assert value(after, "latentedit_batchers", batcher="generator") >= 1
    assert ("latentedit_batcher_queue_rows", frozenset({("batcher", "generator")})) in after
    # Models: the generator's load time was measured at start-up and it counts as loaded.
    assert value(after, "latentedit_model_load_seconds_count", kind="generator") >= 1
    assert value(after, "latentedit_model_load_seconds_count", kind="head") >= 1
    assert value(after, "latentedit_models_loaded", kind="generator") >= 1
    assert value(after, "latentedit_rpcs_in_flight", service="generator") == 0


def test_gauge_callbacks_are_read_at_scrape_time(suite):
    """What the trainer uses for jobs by state: a callback read at every scrape."""
    port = suite[0]
    states = {("RUNNING",): 1, ("QUEUED",): 3}
    observability.register_gauge_callback("latentedit_test_jobs", "Jobs by state (test)", lambda: dict(states), labels=("state",))
    try:
        assert value(scrape(port), "latentedit_test_jobs", state="QUEUED") == 3
        states[("QUEUED",)] = 0
        states[("SUCCEEDED",)] = 4
        samples = scrape(port)
        assert value(samples, "latentedit_test_jobs", state="QUEUED") == 0
        assert value(samples, "latentedit_test_jobs", state="SUCCEEDED") == 4
    finally:
        observability.unregister_gauge_callback("latentedit_test_jobs")
    assert ("latentedit_test_jobs", frozenset({("state", "SUCCEEDED")})) not in scrape(port)


def test_a_stopped_trainer_stops_exposing_its_jobs_gauge(installed_repo, fresh_repo, caplog):
    """A trainer's jobs gauge reads its store; once stopped (store closed) the gauge goes with it, and
    stopping an older trainer leaves a newer one's gauge in place (found in CI: a closed SQLite store
    logged an error at every scrape)."""
    from prometheus_client import REGISTRY

    from tests.conftest import make_config
    from trainer_svc.server import build

    older, _ = build(make_config(fresh_repo))
    newer, _ = build(make_config(installed_repo))
    try:
        older.stop(0)
        with caplog.at_level(logging.ERROR, logger="latentedit.observability"):
            assert "latentedit_jobs" in {family.name for family in REGISTRY.collect()}
    finally:
        newer.stop(0)
    with caplog.at_level(logging.ERROR, logger="latentedit.observability"):
        assert "latentedit_jobs" not in {family.name for family in REGISTRY.collect()}
    assert not [r for r in caplog.records if "gauge callback" in r.getMessage()], caplog.text


def _trace_of(spans, edit_trace_id):
    return [s for s in spans if s.context.trace_id == edit_trace_id]


def test_one_edit_is_one_trace_across_editor_generator_and_scorer(suite):
    _, hosts, channels = suite
    recorder = observability.recorder()
    assert recorder is not None
    editor = editor_pb2_grpc.EditorServiceStub(channels["editor"])
    calls = editor.Edit(_edit_request(seed=23), timeout=120)
    frames = list(calls)
    assert len(frames) == 3

    def edit_spans(spans):
        return [s for s in spans if s.name == EDIT and s.attributes.get("latentedit.service") == "editor"
                and s.attributes.get("rpc.messages_sent") == 3]

    assert recorder.wait_for(lambda spans: bool(edit_spans(spans)), WAIT_S), "the Edit server span never ended"
    edit = edit_spans(recorder.spans())[-1]

    def downstream_done(spans):  # spans end (and are recorded) after their answer has gone out
        servers = {(s.attributes.get("latentedit.service"), s.name) for s in _trace_of(spans, edit.context.trace_id)
                   if s.kind.name == "SERVER"}
        return {("editor", EDIT), ("generator", SYNTHESIZE), ("scorer", SCORE)} <= servers

    assert recorder.wait_for(downstream_done, WAIT_S), "the generator's and scorer's spans never joined the edit's trace"
    trace = _trace_of(recorder.spans(), edit.context.trace_id)
    by_id = {s.context.span_id: s for s in trace}
    servers = [s for s in trace if s.kind.name == "SERVER"]
    # The test's channel (rpc.client.connect) traces too: its client span is the root, the edit under it.
    caller = by_id[edit.parent.span_id]
    assert caller.kind.name == "CLIENT" and caller.attributes["latentedit.service"] == "client" and caller.parent is None
    for span in servers:
        if span is edit:
            continue
        # Each downstream server span is the child of an editor client span, itself under the edit.
        client = by_id.get(span.parent.span_id) if span.parent else None
        assert client is not None and client.kind.name == "CLIENT", f"{span.name} has no client parent in the trace"
        assert client.attributes["latentedit.service"] == "editor" and client.name == span.name
        assert client.parent is not None and client.parent.span_id == edit.context.span_id
    names = {s.name for s in servers}
    assert {EDIT, SYNTHESIZE, SCORE} <= names, names
    assert all(s.attributes["rpc.grpc.status_code"] == 0 for s in servers)


def test_a_caller_trace_is_continued_and_a_failed_call_marks_its_span(suite):
    """A caller's own traceparent is continued by the server; the span records the status code."""
    from opentelemetry import trace

    _, _, channels = suite
    tracer = trace.get_tracer("tests.caller")
    channel = grpc.intercept_channel(channels["generator"], *observability.client_interceptors("caller"))
    generator = generator_pb2_grpc.GeneratorServiceStub(channel)
    with tracer.start_as_current_span("caller-root") as root:
        with pytest.raises(grpc.RpcError):
            generator.Synthesize(generator_pb2.SynthesizeRequest(model=types_pb2.ModelRef(name="no-such-model")), timeout=30)
    trace_id = root.get_span_context().trace_id
    recorder = observability.recorder()

    def server_span(spans):
        return [s for s in _trace_of(spans, trace_id) if s.kind.name == "SERVER" and s.name == SYNTHESIZE]

    assert recorder.wait_for(lambda spans: bool(server_span(spans)), WAIT_S)
    span = server_span(recorder.spans())[0]
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    client = [s for s in _trace_of(recorder.spans(), trace_id) if s.kind.name == "CLIENT"][0]
    assert span.parent.span_id == client.context.span_id and client.parent.span_id == root.get_span_context().span_id
    assert client.status.status_code.name == "ERROR"


def test_json_logs_carry_the_trace_id_of_the_rpc_they_were_logged_in():
    from opentelemetry import trace

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(observability.JsonFormatter())
    logger = logging.getLogger("tests.observability.json")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.info("outside any trace")
        with trace.get_tracer("tests").start_as_current_span("work") as span:
            logger.warning("inside %s", "a span")
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["outside any trace", "inside a span", "failed"]
    assert "trace_id" not in lines[0]
    expected = format(span.get_span_context().trace_id, "032x")
    assert lines[1]["trace_id"] == expected and lines[2]["trace_id"] == expected
    assert lines[1]["span_id"] == format(span.get_span_context().span_id, "016x")
    assert lines[1]["level"] == "WARNING" and lines[1]["logger"] == "tests.observability.json"
    assert "ValueError: boom" in lines[2]["exception"]
    assert lines[0]["time"].endswith("Z")


def test_health_watch_still_streams_through_the_interceptors(suite):
    """The observability interceptor leaves non-blocking handlers (health's Watch) as they are."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    _, _, channels = suite
    watch = health_pb2_grpc.HealthStub(channels["scorer"]).Watch(health_pb2.HealthCheckRequest(service="liveness"), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


# ---- the services as processes: metrics ports, OTLP export, JSON logs --------------------------


class OtlpCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver, as an OpenTelemetry Collector would be: keeps (service.name, span)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.spans: list[tuple[str, object]] = []

    def Export(self, request, context):
        with self._changed:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), "")
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope_spans.spans)
            self._changed.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, predicate, timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: predicate(list(self.spans)), timeout_s)


def _serve_process(name: str, config_path, log_path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OTEL_BSP_SCHEDULE_DELAY": "200"}  # export every 0.2 s
    env.pop("LATENTEDIT_REPOSITORY", None)
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "latentedit", "--config", str(config_path), "serve", name],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_serving_while_alive(process: subprocess.Popen, address: str, name: str, log_path) -> None:
    channel = grpc.insecure_channel(address)
    try:
        for _ in range(int(WAIT_S * 2)):
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}: {log_path.read_text()[-3000:]}")
            try:
                wait_serving(channel, timeout_s=1, what=name)
                return
            except Exception:  # noqa: BLE001 - not up yet
                continue
        raise AssertionError(f"{name} never reported SERVING: {log_path.read_text()[-3000:]}")
    finally:
        channel.close()


@pytest.mark.slow
def test_services_as_processes_export_one_trace_serve_metrics_and_log_json(installed_repo, tmp_path):
    _write_boundary(installed_repo)
    collector = OtlpCollector()
    receiver = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    otlp_port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    names = ("generator", "scorer", "editor")
    ports = {name: free_port() for name in names}
    metrics_ports = {name: free_port() for name in names}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({
        "repository": str(installed_repo.root),
        "services": {name: {"port": port, "grace_period_s": 5} for name, port in ports.items()},
        "security": {"insecure": True},
        "observability": {"otlp_endpoint": f"http://127.0.0.1:{otlp_port}", "metrics_ports": metrics_ports,
                          "metrics_host": "127.0.0.1", "json_logs": True},
    }))
    logs = {name: tmp_path / f"{name}.log" for name in names}
    processes = {name: _serve_process(name, config_path, logs[name]) for name in names}
    try:
        for name in names:
            _wait_serving_while_alive(processes[name], f"localhost:{ports[name]}", name, logs[name])
        before = {name: scrape(port) for name, port in metrics_ports.items()}
        channel = grpc.insecure_channel(f"localhost:{ports['editor']}")
        frames = list(editor_pb2_grpc.EditorServiceStub(channel).Edit(_edit_request(seed=5, frames=3), timeout=120))
        channel.close()
        assert len(frames) == 3

        def edit_trace(spans):
            edits = [s for service, s in spans if service == "latentedit-editor" and s.name == EDIT]
            return edits[-1].trace_id if edits else None

        def three_services(spans):  # spans are exported after their answer has gone out
            trace_id = edit_trace(spans)
            servers = {(service, s.name) for service, s in spans if s.trace_id == trace_id and s.kind == s.SPAN_KIND_SERVER}
            return {("latentedit-editor", EDIT), ("latentedit-generator", SYNTHESIZE), ("latentedit-scorer", SCORE)} <= servers

        assert collector.wait_for(three_services, WAIT_S), "the three services' spans of the edit never reached the collector"
        trace_id = edit_trace(collector.spans)
        in_trace = [(service, s) for service, s in collector.spans if s.trace_id == trace_id]
        editor_clients = {s.span_id: s for service, s in in_trace if service == "latentedit-editor" and s.kind == s.SPAN_KIND_CLIENT}
        downstream = [(service, s) for service, s in in_trace
                      if service != "latentedit-editor" and s.kind == s.SPAN_KIND_SERVER]
        assert {s.name for _, s in downstream} >= {SYNTHESIZE, SCORE}
        for service, span in downstream:  # each under the editor's call to it, carried across processes in metadata
            assert span.parent_span_id in editor_clients, f"{service} {span.name} is not under an editor client span"
        after = {name: scrape(port) for name, port in metrics_ports.items()}
        for name, method in (("generator", SYNTHESIZE), ("scorer", SCORE), ("editor", EDIT)):
            grown = value(after[name], "latentedit_rpcs_total", service=name, method=method, code="OK") - value(
                before[name], "latentedit_rpcs_total", service=name, method=method, code="OK")
            assert grown >= 1, f"{name}'s metrics port shows no new {method} call"
        frames_sent = value(after["editor"], "latentedit_stream_messages_total", service="editor", method=EDIT, direction="sent")
        assert frames_sent == 3
        assert value(after["generator"], "process_resident_memory_bytes") > 0
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        receiver.stop(0)
    records = [json.loads(line) for line in logs["editor"].read_text().splitlines() if line.startswith("{")]
    assert any("listening on port" in r["message"] and r["service"] == "editor" for r in records), records[:5]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)


def test_a_metrics_port_in_use_stops_start_up_naming_the_per_service_ports():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = observability.ObservabilityConfig(metrics_port=port, metrics_host="127.0.0.1")
        with pytest.raises(RuntimeError, match=f"cannot serve metrics on 127.0.0.1:{port}.*observability.metrics_ports"):
            observability.start("obs-test", config)

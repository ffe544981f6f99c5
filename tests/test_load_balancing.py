"""gRPC load balancing: one editor spreads its calls over every generator a target resolves to.

A multi-address `ipv4:` target on loopback stands in for a headless Service's DNS answer (one
A record per ready pod): the channel's round_robin policy is what spreads the calls, whatever
resolved the addresses."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from latentedit.api.v1 import editor_pb2, editor_pb2_grpc
from latentedit.rpc.client import connect, wait_serving
from latentedit.rpc.serving import KEEPALIVE_TIME_MS, MAX_RECONNECT_BACKOFF_MS, client_channel_options
from tests.conftest import free_port, make_config

ROOT = Path(__file__).resolve().parent.parent


def test_client_channels_balance_round_robin_and_keep_alive():
    options = dict(client_channel_options(1234))
    assert json.loads(options["grpc.service_config"]) == {"loadBalancingConfig": [{"round_robin": {}}]}
    assert options["grpc.keepalive_time_ms"] == KEEPALIVE_TIME_MS
    # A restarted dependency is retried within seconds, not gRPC's default of up to 120 s.
    assert options["grpc.max_reconnect_backoff_ms"] == MAX_RECONNECT_BACKOFF_MS <= 10_000
    assert options["grpc.max_send_message_length"] == options["grpc.max_receive_message_length"] == 1234


def _synthesize_calls(metrics_port: int) -> float:
    """Synthesize RPCs this generator answered OK, read from its metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as response:
        text = response.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "latentedit_rpcs_total" and sample.labels.get("code") == "OK" \
                    and sample.labels.get("method", "").endswith("Synthesize"):
                total += sample.value
    return total


@pytest.fixture
def two_generators(tmp_path, installed_repo):
    """Two generator processes on one repository, each with its own gRPC and metrics port."""
    processes, ports, metrics_ports = [], [], []
    try:
        for index in range(2):
            port, metrics_port = free_port(), free_port()
            path = tmp_path / f"generator-{index}.yaml"
            path.write_text(yaml.safe_dump({"repository": str(installed_repo.root), "security": {"insecure": True},
                                            "services": {"generator": {"port": port}},
                                            "observability": {"metrics_port": metrics_port}}))
            processes.append(subprocess.Popen([sys.executable, "-m", "latentedit", "--config", str(path), "serve",
                                               "generator"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            ports.append(port)
            metrics_ports.append(metrics_port)
        for port, process in zip(ports, processes):
            wait_serving(connect(f"localhost:{port}"), timeout_s=180, what=f"generator on {port}")
            assert process.poll() is None
        yield ports, metrics_ports
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(60)


def test_one_editor_spreads_its_calls_over_two_generator_processes(two_generators, installed_repo, fresh_repo):
    from latentedit.methods.interfacegan import Boundary, boundary_artifact
    from latentedit.rpc.launch import build_service
    from latentedit.world import LocalWorld

    ports, metrics_ports = two_generators
    normal = np.zeros(100, np.float32)
    normal[0] = 1
    boundary_artifact("axis0", Boundary(normal, 0.0), LocalWorld(fresh_repo).generator("dcgan-faces"), "z",
                      {"head": "", "output": "axis0"}).save(fresh_repo, {})
    config = make_config(fresh_repo)
    config.addresses["generator"] = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
    hosts = {}
    try:
        for name in ("scorer", "editor"):
            hosts[name] = build_service(name, config)
            config.services[name].port = hosts[name].port
        before = [_synthesize_calls(port) for port in metrics_ports]
        editor = editor_pb2_grpc.EditorServiceStub(grpc.insecure_channel(f"localhost:{hosts['editor'].port}"))
        edits = 12
        for seed in range(edits):
            frames = list(editor.Edit(editor_pb2.EditRequest(
                seed=editor_pb2.SeedStart(seed=seed, count=1), num_frames=2,
                interfacegan=editor_pb2.InterFaceGANEdit(boundary="axis0", start_distance=-1, end_distance=1)), timeout=120))
            assert len(frames) == 2
        # Metrics are updated when each RPC ends; the last one may still be finishing on its server.
        deadline = time.monotonic() + 30
        while True:
            served = [_synthesize_calls(port) - start for port, start in zip(metrics_ports, before)]
            if sum(served) >= edits * 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert sum(served) == edits * 2, served  # one Synthesize per frame
        # pick_first would give one generator all 24 calls; round_robin alternates.
        assert min(served) >= edits // 2, served
    finally:
        for host in reversed(list(hosts.values())):
            host.stop(0)

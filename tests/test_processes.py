"""The suite as separate processes, driven through the CLI and the public API only."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

from latentedit.api.v1 import editor_pb2, generator_pb2, scorer_pb2, trainer_pb2, types_pb2
from latentedit.client import GeneratorClient, connect, wait_serving

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
FULL_APIS = {
    "latentedit.v1.GeneratorService": generator_pb2,
    "latentedit.v1.ScorerService": scorer_pb2,
    "latentedit.v1.TrainerService": trainer_pb2,
    "latentedit.v1.EditorService": editor_pb2,
}


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _write_config(tmp_path, repo_root):
    ports = dict(zip(("generator", "scorer", "trainer", "editor"), _free_ports(4)))
    config = {
        "repository": str(repo_root),
        "services": {name: {"port": port, "grace_period_s": 10} for name, port in ports.items()},
        "generator": {"poll_interval_s": 1},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, ports


def _cli(*args, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LATENTEDIT_REPOSITORY", None)
    return subprocess.Popen([sys.executable, "-m", "latentedit", *args], cwd=ROOT, env=env, **kwargs)


def _wait_serving_while_alive(process, address, name, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited with {process.returncode}: {process.stdout.read()}")
        try:
            wait_serving(connect(address), timeout_s=2, what=name)
            return
        except Exception:  # noqa: BLE001 - not up yet
            continue
    raise AssertionError(f"{name} at {address} never reported SERVING")


@pytest.fixture
def suite(tmp_path, installed_repo):
    config, ports = _write_config(tmp_path, installed_repo.root)
    process = _cli("--config", str(config), "serve", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for name, port in ports.items():
            _wait_serving_while_alive(process, f"localhost:{port}", name)
        yield config, ports, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def test_four_services_with_reflection_health_and_a_generated_grid(suite, tmp_path):
    config, ports, process = suite
    for service, module in FULL_APIS.items():
        short = service.split(".")[-1].removesuffix("Service").lower()
        channel = connect(f"localhost:{ports[short]}")
        database = ProtoReflectionDescriptorDatabase(channel)
        assert service in set(database.get_services())
        described = descriptor_pool.DescriptorPool(database).FindServiceByName(service)
        expected = module.DESCRIPTOR.services_by_name[service.split(".")[-1]]
        assert [m.name for m in described.methods] == [m.name for m in expected.methods]
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

    out = tmp_path / "grid.png"
    generate = _cli("--config", str(config), "generate", "--count", "9", "--seed", "5", "--out", str(out),
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = generate.communicate(timeout=120)
    assert generate.returncode == 0, output
    grid = np.asarray(Image.open(out))
    assert grid.shape[0] >= 3 * 64 and grid.shape[1] >= 3 * 64
    assert grid.std() > 20  # faces, not a blank canvas

    # Methods of services not built yet answer UNIMPLEMENTED, and the process keeps running.
    from latentedit.api.v1 import editor_pb2_grpc

    with pytest.raises(grpc.RpcError) as info:
        editor_pb2_grpc.EditorServiceStub(connect(f"localhost:{ports['editor']}")).ListEdits(
            editor_pb2.ListEditsRequest(), timeout=5
        )
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert process.poll() is None


def test_sigterm_drains_in_flight_calls_then_exits(tmp_path, installed_repo):
    config, ports = _write_config(tmp_path, installed_repo.root)
    process = _cli("--config", str(config), "serve", "generator", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"localhost:{ports['generator']}"
    try:
        _wait_serving_while_alive(process, address, "generator")
        client = GeneratorClient(connect(address))
        latents = np.random.default_rng(0).standard_normal((1024, 100)).astype(np.float32)
        result = {}

        def slow_call():
            try:
                result["images"] = client.synthesize(latents, backend=types_pb2.BACKEND_TORCH, timeout=60)
            except grpc.RpcError as exc:
                result["error"] = exc

        caller = threading.Thread(target=slow_call)
        caller.start()
        time.sleep(0.3)  # the call is in flight
        process.send_signal(signal.SIGTERM)
        caller.join(60)
        assert "error" not in result, result.get("error")
        assert result["images"].shape == (1024, 64, 64, 3)
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
        assert "shutting down" in output and "stopped" in output
    finally:
        if process.poll() is None:
            process.kill()

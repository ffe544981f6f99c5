"""Failure handling across services: cancellation, a dependency dying, a trainer restart."""

import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import yaml

from latentedit import wire
from latentedit.api.v1 import editor_pb2, editor_pb2_grpc, trainer_pb2, trainer_pb2_grpc, types_pb2
from latentedit.rpc.client import connect, wait_serving
from latentedit.rpc.launch import build_service
from tests.conftest import ROOT, free_port, make_config


@pytest.fixture
def services(installed_repo):
    """Generator (with its pool, to watch its work), scorer and editor in this process."""
    from generator_svc.server import build as build_generator

    config = make_config(installed_repo)
    generator_host, pool = build_generator(config)
    config.services["generator"].port = generator_host.port
    hosts = {"generator": generator_host}
    for name in ("scorer", "editor"):
        hosts[name] = build_service(name, config)
        config.services[name].port = hosts[name].port
    # A boundary to edit along: any unit vector will do for these tests.
    from latentedit.methods.interfacegan import Boundary, boundary_artifact
    from latentedit.world import LocalWorld

    normal = np.zeros(100, np.float32)
    normal[0] = 1
    generator = LocalWorld(installed_repo).generator("dcgan-faces")
    boundary_artifact("axis0", Boundary(normal, 0.0), generator, "z", {"head": "", "output": "axis0"}).save(installed_repo, {})
    yield config, hosts, pool
    for host in hosts.values():
        host.stop(0)


def _rows_synthesized(pool):
    loaded = pool.get("dcgan-faces")
    return sum(b.stats.rows for b in loaded._batchers.values())


def _long_edit():
    return editor_pb2.EditRequest(seed=editor_pb2.SeedStart(seed=0, count=64), num_frames=200,
                                  interfacegan=editor_pb2.InterFaceGANEdit(boundary="axis0", start_distance=-2, end_distance=2))


def test_cancelling_an_edit_stops_the_generator_calls(services):
    config, hosts, pool = services
    stub = editor_pb2_grpc.EditorServiceStub(connect(f"localhost:{hosts['editor'].port}"))
    call = stub.Edit(_long_edit(), timeout=120)
    next(call)
    next(call)
    call.cancel()
    time.sleep(0.5)  # a call already in flight may finish
    settled = _rows_synthesized(pool)
    time.sleep(1.5)
    assert _rows_synthesized(pool) == settled, "the editor kept calling the generator after the client cancelled"
    assert settled < 200 * 64 / 2


def test_a_dead_generator_gives_unavailable_naming_it(services):
    config, hosts, _ = services
    stub = editor_pb2_grpc.EditorServiceStub(connect(f"localhost:{hosts['editor'].port}"))
    call = stub.Edit(_long_edit(), timeout=120)
    next(call)
    hosts["generator"].stop(0)
    with pytest.raises(grpc.RpcError) as info:
        for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"generator service at localhost:{config.services['generator'].port}" in info.value.details()


def test_trainer_restart_keeps_every_job_record(services, tmp_path):
    """Kill -9 the trainer mid-job: after a restart, finished jobs are intact, the running one failed with its reason."""
    config, hosts, _ = services
    trainer_port = free_port()
    path = tmp_path / "trainer.yaml"
    path.write_text(yaml.safe_dump({
        "repository": config.repository,
        "services": {"trainer": {"port": trainer_port}},
        "addresses": {"generator": f"localhost:{config.services['generator'].port}",
                      "scorer": f"localhost:{config.services['scorer'].port}"},
    }))

    def start():
        process = subprocess.Popen([sys.executable, "-m", "latentedit", "--config", str(path), "serve", "trainer"], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        channel = connect(f"localhost:{trainer_port}")
        wait_serving(channel, timeout_s=60, what="trainer")
        return process, trainer_pb2_grpc.TrainerServiceStub(channel)

    process, stub = start()
    try:
        z = np.random.default_rng(0).standard_normal((200, 100)).astype(np.float32)
        done = stub.StartJob(trainer_pb2.StartJobRequest(idempotency_key="restart-done", custom_boundary=trainer_pb2.CustomBoundaryJobSpec(
            latents=types_pb2.Latents(space=1, values=wire.to_tensor(z)), labels=wire.to_tensor((z[:, 0] > 0).astype(np.int64)),
            options=trainer_pb2.TrainingOptions(artifact_name="restart-custom"))), timeout=60)
        list(stub.WatchJob(trainer_pb2.WatchJobRequest(id=done.id), timeout=60))
        running = stub.StartJob(trainer_pb2.StartJobRequest(idempotency_key="restart-running", boundary=trainer_pb2.BoundaryJobSpec(
            attribute=types_pb2.AttributeRef(head="pose", output="yaw"), num_samples=100000, keep_fraction=0.1)), timeout=60)
        while stub.GetJob(trainer_pb2.GetJobRequest(id=running.id), timeout=10).state != trainer_pb2.JOB_STATE_RUNNING:
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        process, stub = start()
        jobs = {j.id: j for j in stub.ListJobs(trainer_pb2.ListJobsRequest(), timeout=10).jobs}
        assert jobs[done.id].state == trainer_pb2.JOB_STATE_SUCCEEDED and jobs[done.id].artifact.ref.name == "restart-custom"
        assert jobs[running.id].state == trainer_pb2.JOB_STATE_FAILED and "interrupted" in jobs[running.id].error
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)

"""Failure handling across services: cancellation, deadlines, bad inputs, a dependency dying,
a trainer restart.

Nothing here sleeps to let work "settle": every wait is on a server-side signal (calls inside
a server's handlers, the editor's inversion stats, job states), bounded by WAIT_S.
"""

import signal
import subprocess
import sys
from concurrent import futures

import grpc
import numpy as np
import pytest
import yaml

from latentedit import wire
from latentedit.api.v1 import editor_pb2, editor_pb2_grpc, trainer_pb2, trainer_pb2_grpc, types_pb2
from latentedit.rpc.client import connect, wait_serving
from latentedit.rpc.launch import build_service
from latentedit.rpc.serving import channel_options
from tests.conftest import ROOT, free_port, make_config

WAIT_S = 60.0  # bound on every wait for a server-side signal (the machine may be busy)
CALLER_DEADLINE_S = 20.0
JOB_CALL_CAP_S = 250.0
# gRPC's timeout header keeps few digits and rounds up: a forwarded deadline may grow by about 1 s.
HEADER_ROUNDING_S = 2.0


def _build_services(repo):
    """Generator (with its pool, to watch its work), scorer and editor (with its servicer) in this process."""
    from editor_svc.server import build as build_editor
    from generator_svc.server import build as build_generator

    config = make_config(repo)
    generator_host, pool = build_generator(config)
    config.services["generator"].port = generator_host.port
    hosts = {"generator": generator_host, "scorer": build_service("scorer", config)}
    config.services["scorer"].port = hosts["scorer"].port
    hosts["editor"], editor = build_editor(config)
    config.services["editor"].port = hosts["editor"].port
    # A boundary to edit along: any unit vector will do for these tests.
    from latentedit.methods.interfacegan import Boundary, boundary_artifact
    from latentedit.world import LocalWorld

    normal = np.zeros(100, np.float32)
    normal[0] = 1
    generator = LocalWorld(repo).generator("dcgan-faces")
    boundary_artifact("axis0", Boundary(normal, 0.0), generator, "z", {"head": "", "output": "axis0"}).save(repo, {})
    return config, hosts, pool, editor


@pytest.fixture(scope="module")
def services(installed_repo):
    """Shared by the tests that leave every service running."""
    config, hosts, pool, editor = _build_services(installed_repo)
    yield config, hosts, pool, editor
    for host in hosts.values():
        host.stop(0)


@pytest.fixture
def own_services(installed_repo):
    """For a test that stops one of them."""
    config, hosts, pool, editor = _build_services(installed_repo)
    yield config, hosts, pool, editor
    for host in hosts.values():
        host.stop(0)


def _rows_synthesized(pool):
    loaded = pool.get("dcgan-faces")
    return sum(b.stats.rows for b in loaded._batchers.values())


def _editor(hosts):
    return editor_pb2_grpc.EditorServiceStub(connect(f"localhost:{hosts['editor'].port}"))


def _long_edit(count=64, frames=200):
    return editor_pb2.EditRequest(seed=editor_pb2.SeedStart(seed=0, count=count), num_frames=frames,
                                  interfacegan=editor_pb2.InterFaceGANEdit(boundary="axis0", start_distance=-2, end_distance=2))


def _wait_idle(hosts, after):
    """The editor's handlers, then the generator's, have returned: nothing more can reach the generator."""
    for name in ("editor", "generator"):
        assert hosts[name].calls.wait_idle(WAIT_S), (
            f"the {name} still had {hosts[name].calls.in_flight} call(s) in its handlers {WAIT_S:.0f} s after {after}")


def _probe_edit(hosts):
    """A 2-frame, 1-seed edit: 2 rows for the generator, queued behind any batch it is running."""
    frames = list(_editor(hosts).Edit(_long_edit(count=1, frames=2), timeout=60))
    assert [f.index for f in frames] == [0, 1]


def _rows_once_stopped(hosts, pool):
    """Rows synthesized once nothing is in flight, then proof that nothing more comes: the editor
    still serves, and a new edit adds exactly its own rows."""
    _probe_edit(hosts)  # the batcher runs in order: a batch running when the calls ended is counted once this returns
    settled = _rows_synthesized(pool)
    _probe_edit(hosts)
    assert _rows_synthesized(pool) - settled == 2, "the generator got rows beyond the new edit's: the stopped edit goes on"
    return settled - 2


# ---- cancellation and deadlines of Edit -------------------------------------------------------


def test_cancelling_an_edit_stops_the_generator_calls(services):
    _, hosts, pool, _ = services
    before = _rows_synthesized(pool)
    call = _editor(hosts).Edit(_long_edit(), timeout=120)
    next(call)
    next(call)
    call.cancel()
    _wait_idle(hosts, "the client cancelled the edit")
    done = _rows_once_stopped(hosts, pool) - before
    assert done < 200 * 64 / 2, f"the cancelled edit synthesized {done} of its {200 * 64} rows"


def test_an_edit_past_its_deadline_answers_deadline_exceeded_and_stops_the_generator_calls(services):
    _, hosts, pool, _ = services
    before = _rows_synthesized(pool)
    work = _long_edit(count=256, frames=256)  # minutes of work on a CPU, far more than the deadline
    with pytest.raises(grpc.RpcError) as info:
        list(_editor(hosts).Edit(work, timeout=2))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_idle(hosts, "the edit's deadline passed")
    done = _rows_once_stopped(hosts, pool) - before
    assert done < 256 * 256 / 2, f"the edit synthesized {done} of its {256 * 256} rows after its deadline"


class RecordingProxy(grpc.GenericRpcHandler):
    """A transparent proxy for unary calls that records the time left on each call it forwards."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.channel = connect(target)
        self.calls: list[tuple[str, float]] = []  # (method name, seconds left; inf without a deadline)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=channel_options())
        self.server.add_generic_rpc_handlers([self])
        self.port = self.server.add_insecure_port("localhost:0")
        self.server.start()

    def service(self, handler_call_details):
        method = handler_call_details.method
        forward = self.channel.unary_unary(method)  # bytes in, bytes out

        def handle(request: bytes, context):
            remaining = context.time_remaining()
            remaining = float("inf") if remaining is None or remaining > 1e8 else remaining
            self.calls.append((method.rsplit("/", 1)[-1], remaining))
            try:
                return forward(request, timeout=None if remaining == float("inf") else remaining)
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details())

        return grpc.unary_unary_rpc_method_handler(handle)

    def methods(self, calls=None):
        return {name for name, _ in (self.calls if calls is None else calls)}


@pytest.fixture
def proxied(services, installed_repo):
    """An editor and a trainer whose generator and scorer calls pass through recording proxies."""
    from editor_svc.server import build as build_editor

    config, hosts, _, _ = services
    proxies = {name: RecordingProxy(f"localhost:{hosts[name].port}") for name in ("generator", "scorer")}
    proxied_config = make_config(installed_repo)
    proxied_config.addresses = {name: f"localhost:{proxy.port}" for name, proxy in proxies.items()}
    proxied_config.trainer.call_timeout_s = JOB_CALL_CAP_S  # what a job's calls must carry
    editor_host, _ = build_editor(proxied_config)
    trainer_host = build_service("trainer", proxied_config)
    yield proxies, editor_host, trainer_host
    for host in (editor_host, trainer_host):
        host.stop(0)
    for proxy in proxies.values():
        proxy.server.stop(0)


def _assert_deadline_carried(calls, caller_deadline_s, what):
    for method, remaining in calls:
        assert 0 < remaining <= caller_deadline_s + HEADER_ROUNDING_S, (
            f"{what}: the downstream {method} call arrived with {remaining:.1f} s left, not the caller's {caller_deadline_s:.0f} s deadline")


def test_the_editor_passes_the_callers_deadline_to_the_generator_and_scorer(proxied):
    proxies, editor_host, _ = proxied
    for proxy in proxies.values():
        proxy.calls.clear()
    editor = editor_pb2_grpc.EditorServiceStub(connect(f"localhost:{editor_host.port}"))
    request = _long_edit(count=2, frames=2)
    request.score_heads.append("expression")
    assert len(list(editor.Edit(request, timeout=CALLER_DEADLINE_S))) == 2
    assert proxies["generator"].methods() == {"ListModels", "Sample", "Synthesize"}
    assert proxies["scorer"].methods() == {"ListHeads", "Score"}
    for proxy in proxies.values():
        _assert_deadline_carried(proxy.calls, CALLER_DEADLINE_S, "Edit")


def test_the_trainer_passes_the_callers_deadline_while_validating_and_its_cap_while_training(proxied):
    """StartJob's validation calls carry the caller's deadline; the job's own calls (no caller) carry call_timeout_s."""
    proxies, _, trainer_host = proxied
    trainer = trainer_pb2_grpc.TrainerServiceStub(connect(f"localhost:{trainer_host.port}"))

    def boundary_job(key, batch_size):
        return trainer_pb2.StartJobRequest(idempotency_key=key, boundary=trainer_pb2.BoundaryJobSpec(
            attribute=types_pb2.AttributeRef(head="expression", output="probabilities", label="happy"), num_samples=200,
            keep_fraction=0.1, options=trainer_pb2.TrainingOptions(artifact_name=key, batch_size=batch_size)))

    for proxy in proxies.values():
        proxy.calls.clear()
    # Refused after resolving the head and the generator: only validation calls, no job.
    with pytest.raises(grpc.RpcError) as info:
        trainer.StartJob(boundary_job("", 10**6), timeout=CALLER_DEADLINE_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "options.batch_size" in info.value.details()
    assert proxies["scorer"].methods() == {"ListHeads"} and proxies["generator"].methods() == {"ListModels"}
    for proxy in proxies.values():
        _assert_deadline_carried(proxy.calls, CALLER_DEADLINE_S, "StartJob")

    for proxy in proxies.values():
        proxy.calls.clear()
    job = trainer.StartJob(boundary_job("deadline-cap", 100), timeout=CALLER_DEADLINE_S)
    final = list(trainer.WatchJob(trainer_pb2.WatchJobRequest(id=job.id), timeout=300))[-1].job
    assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED, final.error
    job_calls = [(m, r) for proxy in proxies.values() for m, r in proxy.calls if m in ("Synthesize", "Score")]
    assert {m for m, _ in job_calls} == {"Synthesize", "Score"}
    for method, remaining in job_calls:
        assert CALLER_DEADLINE_S + HEADER_ROUNDING_S < remaining <= JOB_CALL_CAP_S + HEADER_ROUNDING_S, (
            f"the job's {method} call arrived with {remaining:.1f} s left, not the trainer's {JOB_CALL_CAP_S:.0f} s cap")


# ---- Invert: cancellation, deadline, bad inputs -----------------------------------------------


def _faces(count, size=64):
    rng = np.random.default_rng(count)
    return wire.encode_images(rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8), types_pb2.IMAGE_ENCODING_RAW_UINT8)


def _long_inversion():
    # 5000 steps of 16 images, reported only at the end: the worker must notice the caller
    # has gone without any progress message going out.
    return editor_pb2.InvertRequest(images=_faces(16), steps=5000, report_every=5000)


def _wait_inversions_stopped(editor, after):
    assert editor.inversions.wait_for(lambda s: s.running == 0, WAIT_S), (
        f"{editor.inversions.running} inversion(s) still optimising {WAIT_S:.0f} s after {after}")


def _assert_inversion_works(hosts):
    messages = list(_editor(hosts).Invert(editor_pb2.InvertRequest(images=_faces(1), steps=2, report_every=1), timeout=60))
    assert [(m.step, m.done) for m in messages] == [(1, False), (2, False), (2, True)]
    assert wire.decode_images(messages[-1].reconstructions).shape == (1, 64, 64, 3)


def test_cancelling_an_inversion_stops_its_optimisation(services):
    _, hosts, _, editor = services
    steps_before = editor.inversions.steps
    call = _editor(hosts).Invert(_long_inversion(), timeout=300)
    assert editor.inversions.wait_for(lambda s: s.steps > steps_before, WAIT_S), "the inversion never started"
    call.cancel()
    _wait_inversions_stopped(editor, "the client cancelled")
    taken = editor.inversions.steps - steps_before
    assert taken < 5000, "the cancelled inversion ran all its 5000 steps"
    _assert_inversion_works(hosts)


def test_an_inversion_past_its_deadline_answers_deadline_exceeded_and_stops(services):
    _, hosts, _, editor = services
    steps_before = editor.inversions.steps
    with pytest.raises(grpc.RpcError) as info:
        list(_editor(hosts).Invert(_long_inversion(), timeout=2))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_inversions_stopped(editor, "its deadline passed")
    assert editor.inversions.steps > steps_before, "the inversion never started, so its deadline proved nothing"
    assert editor.inversions.steps - steps_before < 5000, "the inversion ran all its 5000 steps after its deadline"
    _assert_inversion_works(hosts)


def _raw(shape):
    return wire.encode_images(np.zeros(shape, np.uint8), types_pb2.IMAGE_ENCODING_RAW_UINT8)


ONE_FACE = _raw((1, 64, 64, 3))
INVALID, NOT_FOUND, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED
BAD_INVERSIONS = {
    "no images": (dict(), INVALID, "images: no images given"),
    "empty batch": (dict(images=_raw((0, 64, 64, 3))), INVALID, "images: the batch is empty"),
    "grey": (dict(images=_raw((1, 64, 64, 1))), INVALID, "images.raw: 1 channels, expected 3"),
    "rgba": (dict(images=_raw((1, 64, 64, 4))), INVALID, "images.raw: 4 channels, expected 3"),
    "no pixels": (dict(images=_raw((1, 0, 64, 3))), INVALID, "images: size 64x0 has no pixels"),
    "not NHWC": (dict(images=_raw((64, 64, 3))), INVALID, "images.raw: shape [64, 64, 3] must be [N, H, W, C]"),
    "float pixels": (dict(images=types_pb2.ImageBatch(raw=wire.to_tensor(np.zeros((1, 64, 64, 3), np.float32)))), INVALID,
                     "images.raw: dtype DATA_TYPE_FP32 not allowed here"),
    "short data": (dict(images=types_pb2.ImageBatch(raw=types_pb2.Tensor(dtype=types_pb2.DATA_TYPE_UINT8, shape=[1, 64, 64, 3],
                                                                         raw_data=b"x" * 10))), INVALID, "raw_data has 10 bytes"),
    "too many": (dict(images=_raw((257, 64, 64, 3))), EXHAUSTED, "images: 257 images, more than the limit 256"),
    "corrupt PNG": (dict(images=types_pb2.ImageBatch(encoding=types_pb2.IMAGE_ENCODING_PNG, png=[b"\x89PNG\r\n\x1a\n garbage"])),
                    INVALID, "images.png[0]: corrupt or unreadable PNG"),
    "unknown encoding": (dict(images=types_pb2.ImageBatch(encoding=99)), INVALID, "images.encoding 99 is unknown"),
    "unknown generator": (dict(generator=types_pb2.ModelRef(name="nope")), NOT_FOUND, "no generator named 'nope'"),
    "unknown version": (dict(generator=types_pb2.ModelRef(name="dcgan-faces", version=9)), NOT_FOUND, "has no version 9"),
    "space it lacks": (dict(space=types_pb2.LATENT_SPACE_W), INVALID, "no latent space 'w'"),
    "unknown space": (dict(space=99), INVALID, "space: 99 is not a LatentSpace"),
    "negative steps": (dict(steps=-1), INVALID, "steps -1 must be in 1..5000"),
    "too many steps": (dict(steps=5001), INVALID, "steps 5001 must be in 1..5000"),
    "negative report_every": (dict(report_every=-3), INVALID, "report_every -3 must be at least 1"),
    "NaN learning rate": (dict(learning_rate=float("nan")), INVALID, "learning_rate nan must be in (0, 1]"),
    "infinite learning rate": (dict(learning_rate=float("inf")), INVALID, "learning_rate inf must be in (0, 1]"),
    "negative learning rate": (dict(learning_rate=-0.1), INVALID, "learning_rate -0.1 must be in (0, 1]"),
}


@pytest.mark.parametrize("case", BAD_INVERSIONS, ids=list(BAD_INVERSIONS))
def test_bad_inversions_get_a_precise_status_and_the_editor_keeps_serving(services, case):
    _, hosts, _, _ = services
    fields, code, message = BAD_INVERSIONS[case]
    request = editor_pb2.InvertRequest(**{"images": ONE_FACE, "steps": 2, **fields})
    if case == "no images":
        request.ClearField("images")
    with pytest.raises(grpc.RpcError) as info:
        list(_editor(hosts).Invert(request, timeout=60))
    assert (info.value.code(), message in info.value.details()) == (code, True), info.value.details()
    _assert_inversion_works(hosts)


# ---- a dependency dying; a trainer restart ----------------------------------------------------


def test_a_dead_generator_gives_unavailable_naming_it(own_services):
    config, hosts, _, _ = own_services
    call = _editor(hosts).Edit(_long_edit(), timeout=120)
    next(call)
    hosts["generator"].stop(0)
    with pytest.raises(grpc.RpcError) as info:
        for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"generator service at localhost:{config.services['generator'].port}" in info.value.details()


def _wait_until_running(stub, job_id):
    seen = []
    for event in stub.WatchJob(trainer_pb2.WatchJobRequest(id=job_id), timeout=WAIT_S):
        if event.job.state == trainer_pb2.JOB_STATE_RUNNING:
            return
        seen.append(trainer_pb2.JobState.Name(event.job.state))
    raise AssertionError(f"job {job_id} was never seen running; states: {seen}")


def test_trainer_restart_keeps_every_job_record(services, tmp_path):
    """Kill -9 the trainer mid-job: after a restart, finished jobs are intact, the running one failed with its reason."""
    config, hosts, _, _ = services
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
        _wait_until_running(stub, running.id)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        process, stub = start()
        jobs = {j.id: j for j in stub.ListJobs(trainer_pb2.ListJobsRequest(), timeout=10).jobs}
        assert jobs[done.id].state == trainer_pb2.JOB_STATE_SUCCEEDED and jobs[done.id].artifact.ref.name == "restart-custom"
        assert jobs[running.id].state == trainer_pb2.JOB_STATE_FAILED and "interrupted" in jobs[running.id].error
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)

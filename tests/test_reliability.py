"""Reliability of the four services as separate processes: overload, kill -9 and a short soak.

What tests/test_editor_faults.py and tests/test_trainer_editor.py already cover in-process is
not repeated here (a generator stopped in-process, a trainer killed mid-job leaving a FAILED
record, queued jobs after a graceful restart, cancellation and deadlines of Edit and Invert).
These tests add what only separate processes show: a generator killed with SIGKILL mid-edit
and restarted, a trainer killed with SIGKILL with a job running and one queued, the
repository after that kill, overload of a generator process, and a soak that checks no
service keeps a thread per call. Every wait is bounded and on a server signal (health,
job states, stream answers); nothing asserts wall-clock speed.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from latentedit.api.v1 import editor_pb2, editor_pb2_grpc, generator_pb2, generator_pb2_grpc, trainer_pb2, types_pb2
from latentedit.install import link_or_copy
from tests import corpus

pytestmark = pytest.mark.slow
BOUNDARY = "reliability-axis"
QUEUE_ROWS = 512  # the generator's queue bound in this suite: small, so a few callers overload it
WAIT_S = 120.0
# How long after a restarted service reports SERVING its callers (editor, trainer) may still answer
# UNAVAILABLE while their channels reconnect. gRPC's default reconnect backoff grows to 120 s, so a
# dependency down for half a minute can leave callers failing for 10-20 s after it is back; the
# suite's channels must reconnect within a few seconds.
RECONNECT_S = 10.0


def _once_reconnected(what, call):
    """`call()` retried while it answers UNAVAILABLE, for at most RECONNECT_S after the restart."""
    deadline = time.monotonic() + RECONNECT_S
    attempts = 0
    while True:
        attempts += 1
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise AssertionError(f"{what}: still {exc.code().name} {RECONNECT_S:.0f} s after the restarted service "
                                     f"reported SERVING ({attempts} attempts): {exc.details()}") from exc
            threading.Event().wait(0.2)  # a bounded poll: no server signal says a client channel has reconnected


@pytest.fixture(scope="module")
def suite(installed_repo, tmp_path_factory):
    work = tmp_path_factory.mktemp("reliability")
    repo = work / "repo"
    shutil.copytree(installed_repo.root, repo, ignore=shutil.ignore_patterns(".cache", ".jobs"), copy_function=link_or_copy)
    processes = corpus.ProcessSuite(repo, work, sections={"generator": {"max_queue_rows": QUEUE_ROWS}})
    try:
        processes.start()
        z = corpus.z(60, seed=1)
        job = corpus.run_job(processes, trainer_pb2.StartJobRequest(custom_boundary=trainer_pb2.CustomBoundaryJobSpec(
            latents=types_pb2.Latents(space=1, values=corpus.tensor(z)), labels=corpus.tensor((z[:, 0] > 0).astype(np.int64)),
            options=trainer_pb2.TrainingOptions(artifact_name=BOUNDARY))), timeout_s=WAIT_S)
        assert job.state == trainer_pb2.JOB_STATE_SUCCEEDED, job.error
        yield processes
    finally:
        processes.stop()


def _editor(suite):
    return editor_pb2_grpc.EditorServiceStub(suite.channel("editor"))


def _edit(count=1, frames=2, seed=0, images=True):
    return editor_pb2.EditRequest(seed=editor_pb2.SeedStart(seed=seed, count=count), num_frames=frames, omit_images=not images,
                                  score_heads=["pose"] if images else [],
                                  interfacegan=editor_pb2.InterFaceGANEdit(boundary=BOUNDARY, start_distance=-1, end_distance=1))


def _assert_edit_works(suite):
    frames = _once_reconnected("an edit", lambda: list(_editor(suite).Edit(_edit(), timeout=WAIT_S)))
    assert [f.index for f in frames] == [0, 1] and frames[-1].stop_reason == editor_pb2.STOP_REASON_COMPLETED


# ---- overload ---------------------------------------------------------------------------------


def test_overload_is_refused_with_resource_exhausted_and_the_generator_serves_afterwards(suite):
    """12 callers at once, 256 rows each, against a queue bound of 512 rows: some are admitted,
    the rest refused with RESOURCE_EXHAUSTED while the admitted work is still running; nothing
    else comes back, and the generator answers a normal call afterwards."""
    stub = generator_pb2_grpc.GeneratorServiceStub(suite.channel("generator"))
    request = generator_pb2.SynthesizeRequest(latents=types_pb2.Latents(space=1, values=corpus.tensor(corpus.z(256))),
                                              image_encoding=types_pb2.IMAGE_ENCODING_PNG)
    rss_before = suite.rss_bytes("generator")
    finished: list[tuple[int, grpc.StatusCode, str]] = []  # in the order the answers arrived
    lock = threading.Lock()
    go = threading.Barrier(12)

    def caller(index):
        go.wait(30)
        try:
            stub.Synthesize(request, timeout=300)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        with lock:
            finished.append((index, code, details))

    with futures.ThreadPoolExecutor(12) as pool:
        list(pool.map(caller, range(12)))
    codes = [code for _, code, _ in finished]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, finished
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1, "12 x 256 rows against a 512-row queue: nothing was refused"
    assert codes.count(grpc.StatusCode.OK) >= 1, "nothing was admitted"
    # Refusals are answered at admission, before the admitted work is done: the last answer is an admitted one.
    assert codes[-1] == grpc.StatusCode.OK, f"a refusal came after every admitted call had finished: {codes}"
    # The generator keeps serving, and the refused calls left no memory behind them (a generous bound:
    # 12 requests of 256 images are about 40 MB of PNG).
    assert corpus.valid_call(suite.channels, "generator").code == grpc.StatusCode.OK
    assert suite.rss_bytes("generator") - rss_before < 1024**3


# ---- kill -9 ----------------------------------------------------------------------------------


def test_a_generator_killed_mid_edit_is_unavailable_named_and_edits_work_after_its_restart(suite):
    call = _editor(suite).Edit(_edit(count=64, frames=200), timeout=WAIT_S)  # every frame synthesizes 64 faces
    next(call)  # the edit is streaming
    suite.kill("generator")
    try:
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert f"generator service at {suite.address('generator')}" in info.value.details(), info.value.details()
        # While it is down, a new edit says the same; once it is back, edits work again.
        with pytest.raises(grpc.RpcError) as down:
            list(_editor(suite).Edit(_edit(), timeout=WAIT_S))
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE and "generator service" in down.value.details()
    finally:
        suite.start("generator")
    _assert_edit_works(suite)
    assert suite.alive("editor")


def _repository_is_whole(root):
    """Every visible version folder has a manifest naming files that exist: nothing half-written."""
    problems = []
    for manifest_dir in sorted(p for p in root.glob("*/*") if not p.parts[-2].startswith(".") and p.is_dir()):
        if manifest_dir.name.startswith("."):
            continue
        manifest = manifest_dir / "manifest.json"
        if not manifest.exists():
            problems.append(f"{manifest_dir}: no manifest")
            continue
        files = json.loads(manifest.read_text()).get("files", {})
        problems += [f"{manifest_dir}: {name} missing" for name in files.values() if not (manifest_dir / name).exists()]
    return problems


def test_a_trainer_killed_mid_job_fails_the_job_with_its_reason_runs_the_queued_one_and_writes_nothing_half(suite):
    stub = corpus.trainer_stub(suite)
    long_job = _once_reconnected("StartJob", lambda: stub.StartJob(trainer_pb2.StartJobRequest(idempotency_key="kill-running", boundary=trainer_pb2.BoundaryJobSpec(
        attribute=corpus.attribute("pose", "yaw"), num_samples=corpus.LONG_JOB_SAMPLES, keep_fraction=0.1,
        options=trainer_pb2.TrainingOptions(artifact_name="never-written"))), timeout=60))
    for event in stub.WatchJob(trainer_pb2.WatchJobRequest(id=long_job.id), timeout=WAIT_S):
        if event.job.state == trainer_pb2.JOB_STATE_RUNNING and event.job.progress > 0:
            break
    else:
        raise AssertionError("the long job never made progress")
    z = corpus.z(60, seed=2)
    queued = stub.StartJob(trainer_pb2.StartJobRequest(idempotency_key="kill-queued", custom_boundary=trainer_pb2.CustomBoundaryJobSpec(
        latents=types_pb2.Latents(space=1, values=corpus.tensor(z)), labels=corpus.tensor((z[:, 1] > 0).astype(np.int64)),
        options=trainer_pb2.TrainingOptions(artifact_name="after-kill"))), timeout=60)
    assert queued.state == trainer_pb2.JOB_STATE_QUEUED  # one worker, busy with the long job

    suite.kill("trainer")
    suite.start("trainer")  # on the same port, the same repository and job store
    stub = corpus.trainer_stub(suite)
    interrupted = stub.GetJob(trainer_pb2.GetJobRequest(id=long_job.id), timeout=30)
    assert interrupted.state == trainer_pb2.JOB_STATE_FAILED and "interrupted" in interrupted.error, interrupted
    final = list(stub.WatchJob(trainer_pb2.WatchJobRequest(id=queued.id), timeout=WAIT_S))[-1].job
    assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED, (trainer_pb2.JobState.Name(final.state), final.error)
    assert final.artifact.ref.name == "after-kill"
    # Every job record survived; the killed job's artifact does not exist, the repository is whole,
    # and the editor lists the new artifact (it reads the same repository).
    ids = {job.id for job in stub.ListJobs(trainer_pb2.ListJobsRequest(page_size=500), timeout=30).jobs}
    assert {long_job.id, queued.id} <= ids
    root = Path(suite.repository)
    assert not (root / "never-written").exists()
    assert _repository_is_whole(root) == []
    listed = {e.artifact.ref.name for e in _editor(suite).ListEdits(editor_pb2.ListEditsRequest(), timeout=30).edits}
    assert "after-kill" in listed and "never-written" not in listed


# ---- soak -------------------------------------------------------------------------------------


def test_a_short_soak_of_100_edits_has_no_errors_and_no_thread_growth(suite):
    """100 edits (1 seed, 2 frames, images and pose scores) one after another: every one completes,
    and no service holds more threads at the end than after the first 10 (no thread per call)."""
    editor = _editor(suite)
    errors = []

    def one(index):
        try:
            frames = list(editor.Edit(_edit(seed=index), timeout=WAIT_S))
            if [f.index for f in frames] != [0, 1]:
                errors.append(f"edit {index}: frames {[f.index for f in frames]}")
        except grpc.RpcError as exc:
            errors.append(f"edit {index}: {exc.code().name}: {exc.details()}")

    for index in range(10):
        one(index)
    warm = {name: suite.threads(name) for name in suite.NAMES}
    for index in range(10, 100):
        one(index)
    assert errors == []
    grown = {name: (warm[name], suite.threads(name)) for name in suite.NAMES if suite.threads(name) > warm[name] + 8}
    assert not grown, f"threads (after warm-up, after 100 edits) grew: {grown}"

"""Trainer jobs and the streaming editor, through real stubs on in-process services.

Numbers the services report (metrics, correlation reports, edited frames) are checked against
what the test computes itself: latents sampled with the job's documented seeds, synthesized and
scored through the generator and scorer stubs, and artifacts loaded from the repository.
"""

import json

import grpc
import numpy as np
import pytest

from latentedit import wire
from latentedit.api.v1 import editor_pb2, editor_pb2_grpc, trainer_pb2, trainer_pb2_grpc, types_pb2
from latentedit.methods.base import batch_seed, batches
from latentedit.methods.interfacegan import load_boundary
from latentedit.repository import ModelRepository
from latentedit.rpc.client import GeneratorClient, ScorerClient
from tests.conftest import make_config

YAW = types_pb2.AttributeRef(head="pose", output="yaw")
HAPPY = types_pb2.AttributeRef(head="expression", output="probabilities", label="happy")
MOUTH_WIDTH = types_pb2.AttributeRef(head="pose", output="mouth_width")
QUALITY = types_pb2.AttributeRef(head="quality", output="face_probability")
TERMINAL = (trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED, trainer_pb2.JOB_STATE_CANCELLED)
WAIT_S = 300  # bound on any one job (the default jobs here take seconds)


@pytest.fixture(scope="module")
def trainer(suite_in_process):
    return trainer_pb2_grpc.TrainerServiceStub(suite_in_process[2]["trainer"])


@pytest.fixture(scope="module")
def editor(suite_in_process):
    return editor_pb2_grpc.EditorServiceStub(suite_in_process[2]["editor"])


@pytest.fixture(scope="module")
def generator_client(suite_in_process):
    return GeneratorClient(suite_in_process[2]["generator"])


@pytest.fixture(scope="module")
def scorer_client(suite_in_process):
    return ScorerClient(suite_in_process[2]["scorer"])


def _boundary_request(key, name, attribute=YAW, samples=600, keep=0.2, **fields):
    return trainer_pb2.StartJobRequest(idempotency_key=key, boundary=trainer_pb2.BoundaryJobSpec(
        attribute=attribute, num_samples=samples, keep_fraction=keep,
        options=trainer_pb2.TrainingOptions(artifact_name=name, batch_size=200), **fields))


def _drain(events, job_id, timeout):
    """The rest of a WatchJob stream; its deadline (`timeout`) bounds the wait with a clear failure."""
    seen = []
    try:
        for event in events:
            seen.append(event)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
        last = trainer_pb2.JobState.Name(seen[-1].job.state) if seen else "no event"
        raise AssertionError(f"job {job_id} did not end within {timeout} s of watching; last state: {last}") from exc
    assert seen and seen[-1].job.state in TERMINAL, f"job {job_id}: the watch ended before the job did"
    return seen


def _wait(trainer, job_id, timeout=WAIT_S):
    """Every WatchJob event until the job ends, waiting at most `timeout` seconds."""
    return _drain(trainer.WatchJob(trainer_pb2.WatchJobRequest(id=job_id), timeout=timeout), job_id, timeout)


def _succeeded(trainer, request):
    final = _wait(trainer, trainer.StartJob(request, timeout=60).id)[-1].job
    assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED, final.error
    return final


def _job_samples(generator_client, scorer_client, num_samples, batch_size, seed, heads):
    """The latents a job with this seed and batch size samples (README: seeded per batch), and their scores."""
    latents, scores = [], []
    for index, _, count in batches(num_samples, batch_size):
        z = generator_client.sample(count, batch_seed(seed, index))
        latents.append(z)
        scores.append(scorer_client.score(generator_client.synthesize(z), heads))
    merged = {head: {out: np.concatenate([s[head][out] for s in scores]) for out in scores[0][head]} for head in scores[0]}
    return np.concatenate(latents), merged


def _happy(scores):
    return scores["expression"]["probabilities"][:, 3]  # the labels are angry, disgust, fear, happy, ...


@pytest.fixture(scope="module")
def yaw_boundary(trainer):
    job = trainer.StartJob(_boundary_request("unit-yaw", "unit-yaw"), timeout=60)
    events = _wait(trainer, job.id)
    assert events[-1].job.state == trainer_pb2.JOB_STATE_SUCCEEDED, events[-1].job.error
    return events


@pytest.fixture(scope="module")
def yaw_samples(generator_client, scorer_client):
    """(latents, yaw, face probability) of the 600 samples the yaw boundary jobs here score (seed 0, batches of 200)."""
    z, scores = _job_samples(generator_client, scorer_client, 600, 200, 0, ["pose", "quality"])
    return z, scores["pose"]["yaw"], scores["quality"]["face_probability"]


def test_boundary_job_streams_progress_and_writes_an_artifact(yaw_boundary, suite_in_process, editor):
    progress = [e.job.progress for e in yaw_boundary]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert any(e.job.phase == "sampling and scoring" for e in yaw_boundary)
    final = yaw_boundary[-1].job
    assert final.metrics["validation_accuracy"] > 0.85
    assert 0.6 < final.metrics["all_samples_accuracy"] <= 1.0
    assert final.metrics["num_kept"] == 240
    assert final.metrics["num_positive"] == final.metrics["num_negative"] == 120  # the top and bottom 20%
    assert final.artifact.ref.name == "unit-yaw" and final.artifact.kind == trainer_pb2.ARTIFACT_KIND_BOUNDARY
    edits = {e.artifact.ref.name: e for e in editor.ListEdits(editor_pb2.ListEditsRequest(), timeout=10).edits}
    assert edits["unit-yaw"].attributes[0].output == "yaw" and edits["unit-yaw"].job_id == final.id
    assert edits["unit-yaw"].metrics["validation_accuracy"] == pytest.approx(final.metrics["validation_accuracy"])


def test_idempotency_key_returns_the_same_job(trainer, yaw_boundary):
    again = trainer.StartJob(_boundary_request("unit-yaw", "unit-yaw"), timeout=60)
    assert again.id == yaw_boundary[-1].job.id
    with pytest.raises(grpc.RpcError) as info:
        trainer.StartJob(_boundary_request("unit-yaw", "unit-yaw", samples=700), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "different spec" in info.value.details()
    listed = trainer.ListJobs(trainer_pb2.ListJobsRequest(states=[trainer_pb2.JOB_STATE_SUCCEEDED]), timeout=10).jobs
    assert yaw_boundary[-1].job.id in {j.id for j in listed}


def test_edit_streams_frames_that_move_the_attribute(editor, yaw_boundary):
    request = editor_pb2.EditRequest(
        seed=editor_pb2.SeedStart(seed=3, count=6),
        interfacegan=editor_pb2.InterFaceGANEdit(boundary="unit-yaw", start_distance=-3, end_distance=3),
        num_frames=5, score_heads=["pose"], image_encoding=types_pb2.IMAGE_ENCODING_PNG)
    frames = list(editor.Edit(request, timeout=120))
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert [f.stop_reason for f in frames] == [0, 0, 0, 0, editor_pb2.STOP_REASON_COMPLETED]
    assert len(frames[0].images.png) == 6
    yaw = np.stack([[wire.from_tensor(o.tensor, field="yaw") for o in f.scores[0].outputs if o.name == "yaw"][0] for f in frames])
    assert (yaw[-1] - yaw[0]).mean() > 30  # degrees, over 6 distance units
    latents = [wire.from_tensor(f.latents.values, field="z") for f in frames]
    np.testing.assert_allclose(np.linalg.norm(latents[-1] - latents[0], axis=1), 6.0, atol=1e-4)


def test_edit_from_given_latents_and_from_the_boundary(editor, yaw_boundary):
    z = np.random.default_rng(0).standard_normal((2, 100)).astype(np.float32)
    request = editor_pb2.EditRequest(
        latents=types_pb2.Latents(space=wire.space_code("z"), values=wire.to_tensor(z)),
        interfacegan=editor_pb2.InterFaceGANEdit(boundary="unit-yaw", start_distance=0, end_distance=0, from_boundary=True),
        num_frames=1, omit_images=True)
    (frame,) = list(editor.Edit(request, timeout=60))
    assert abs(frame.metrics["mean_boundary_distance"]) < 1e-4  # projected onto the hyperplane
    assert not frame.images.raw.raw_data


def test_custom_boundary_from_caller_labels(trainer, suite_in_process):
    rng = np.random.default_rng(5)
    z = rng.standard_normal((2000, 100)).astype(np.float32)
    labels = (z[:, 7] > 0).astype(np.int64)  # a known answer: the attribute is latent axis 7, positive side up
    request = trainer_pb2.StartJobRequest(idempotency_key="custom-7", custom_boundary=trainer_pb2.CustomBoundaryJobSpec(
        latents=types_pb2.Latents(space=wire.space_code("z"), values=wire.to_tensor(z)),
        labels=wire.to_tensor(labels), attribute_name="axis7", options=trainer_pb2.TrainingOptions(artifact_name="axis7")))
    final = _succeeded(trainer, request)
    assert final.metrics["validation_accuracy"] > 0.9
    boundary, entry = load_boundary(ModelRepository(suite_in_process[0].repository), "axis7")
    # The unit normal points to the positive labels along axis 7 (so the rest of it is < 0.6 long).
    assert boundary.normal[7] > 0.8, boundary.normal[7]
    assert entry.manifest["job_id"] == final.id


def test_correlation_report(trainer, yaw_boundary, suite_in_process, generator_client, scorer_client):
    """The report's correlation is np.corrcoef of the attributes on the job's own samples; its cosine is of the stored normals.

    Smiling and mouth width correlate on this generator (about 0.5, measured on 600 samples);
    yaw and smiling do not.
    """
    _succeeded(trainer, _boundary_request("unit-smile", "unit-smile", HAPPY))
    _succeeded(trainer, _boundary_request("unit-mouth-width", "unit-mouth-width", MOUTH_WIDTH))
    names = ["unit-yaw", "unit-smile", "unit-mouth-width"]
    request = trainer_pb2.StartJobRequest(idempotency_key="corr", correlation=trainer_pb2.CorrelationJobSpec(
        boundaries=names, num_samples=400, options=trainer_pb2.TrainingOptions(artifact_name="unit-corr", batch_size=200)))
    _succeeded(trainer, request)

    repo = ModelRepository(suite_in_process[0].repository)
    report = json.loads(repo.resolve("unit-corr").file("report").read_text())
    assert report["boundaries"] == names
    # The correlation job scores fresh samples: seed + 7919 per batch (InterFaceGAN._correlate).
    _, scores = _job_samples(generator_client, scorer_client, 400, 200, 0 + 7919, ["pose", "expression"])
    expected_correlation = np.corrcoef(np.stack([scores["pose"]["yaw"], _happy(scores), scores["pose"]["mouth_width"]]))
    np.testing.assert_allclose(report["correlation"], expected_correlation, atol=0.01)
    normals = np.stack([load_boundary(repo, name)[0].normal for name in names])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    np.testing.assert_allclose(report["cosine"], normals @ normals.T, atol=1e-3)

    smile_and_mouth, yaw_and_smile = expected_correlation[1, 2], expected_correlation[0, 1]
    assert smile_and_mouth > 0.3 and abs(yaw_and_smile) < 0.3, expected_correlation
    # The paper's point: correlated attributes have aligned normals, independent ones do not.
    cosine = np.array(report["cosine"])
    assert cosine[1, 2] > 0.3 and abs(cosine[0, 1]) < 0.3, cosine


def test_threshold_labels_the_kept_samples_by_their_score(trainer, yaw_samples, yaw_boundary, suite_in_process):
    """With a threshold, the kept extremes are labelled score > threshold, not by their end of the ranking."""
    threshold = 30.0  # degrees: above the 120th highest yaw of these 600 samples (about 21)
    final = _succeeded(trainer, _boundary_request("unit-yaw-30", "unit-yaw-30", threshold=threshold))
    _, yaw, _ = yaw_samples
    kept = np.concatenate([np.sort(yaw)[-120:], np.sort(yaw)[:120]])  # the top and bottom 20%
    expected_positive = int((kept > threshold).sum())
    assert 20 < expected_positive < 100, expected_positive  # so that it differs from the ranking's 120
    # Scores re-computed through the services may differ in the last bits: allow samples at the threshold.
    at_threshold = int((np.abs(kept - threshold) < 1e-3).sum())
    assert abs(final.metrics["num_positive"] - expected_positive) <= at_threshold, (final.metrics["num_positive"], expected_positive)
    assert final.metrics["num_positive"] + final.metrics["num_negative"] == 240
    assert final.metrics["score_threshold"] == threshold
    # Still a yaw boundary: its normal leans toward the one fitted on the ranking's ends.
    repo = ModelRepository(suite_in_process[0].repository)
    cosine = load_boundary(repo, "unit-yaw-30")[0].normal @ load_boundary(repo, "unit-yaw")[0].normal
    assert cosine > 0.4, cosine  # measured 0.6: 240 samples in 100 dimensions give noisy normals


def test_threshold_outside_the_kept_scores_fails_the_job_naming_it(trainer):
    request = _boundary_request("unit-yaw-1000", "never", samples=200, keep=0.1, threshold=1000.0)
    final = _wait(trainer, trainer.StartJob(request, timeout=60).id)[-1].job
    assert final.state == trainer_pb2.JOB_STATE_FAILED
    assert "threshold 1000: every kept sample scores on one side of it" in final.error, final.error


def test_quality_filter_drops_the_samples_the_quality_head_rejects(trainer, yaw_samples, suite_in_process):
    """Samples whose face probability is below quality_min never reach the SVM."""
    quality_min = 0.99  # rejects about one sample in ten of this generator's faces
    final = _succeeded(trainer, _boundary_request("unit-yaw-quality", "unit-yaw-quality",
                                                  quality_attribute=QUALITY, quality_min=quality_min))
    z, yaw, face_probability = yaw_samples
    rejected = face_probability < quality_min
    near = int((np.abs(face_probability - quality_min) < 1e-4).sum())
    assert 20 < rejected.sum() < 200, rejected.sum()
    assert abs(final.metrics["num_filtered"] - rejected.sum()) <= near, (final.metrics["num_filtered"], int(rejected.sum()))

    # The boundary is the one fitted on the accepted samples only: refit it here from them.
    from latentedit.methods import interfacegan as ifg

    keeper = ifg.ExtremeKeeper(120)
    keeper.add(yaw[~rejected], z[~rejected])
    expected = ifg.fit_kept(keeper, 0.3, 1.0, seed=0).boundary
    served, _ = load_boundary(ModelRepository(suite_in_process[0].repository), "unit-yaw-quality")
    assert served.normal @ expected.normal > 0.99, served.normal @ expected.normal


def test_cancel_job_stops_within_seconds(trainer):
    """A running job stops at its next batch once cancelled: CANCELLED, having scored at most a batch more."""
    job = trainer.StartJob(_boundary_request("big-cancel", "never", samples=200000), timeout=60)
    # One stream watches the job from start to end; its deadline bounds the whole test.
    events = trainer.WatchJob(trainer_pb2.WatchJobRequest(id=job.id), timeout=120)
    seen = []
    for event in events:
        seen.append(trainer_pb2.JobState.Name(event.job.state))
        if event.job.state == trainer_pb2.JOB_STATE_RUNNING and event.job.progress > 0:
            break
    else:
        raise AssertionError(f"job {job.id} ended without being seen running a batch; states: {seen}")
    at_cancel = trainer.CancelJob(trainer_pb2.CancelJobRequest(id=job.id), timeout=10)
    final = _drain(events, job.id, 120)[-1].job  # the same stream, until the job ends
    assert final.state == trainer_pb2.JOB_STATE_CANCELLED, (trainer_pb2.JobState.Name(final.state), final.error)
    one_batch = 0.85 * 200 / 200000  # the progress one scored batch adds
    assert final.progress <= at_cancel.progress + 1.5 * one_batch, (at_cancel.progress, final.progress)
    assert trainer.GetJob(trainer_pb2.GetJobRequest(id=job.id), timeout=10).state == trainer_pb2.JOB_STATE_CANCELLED


def _services_on(repo, suite_config, name):
    """A trainer or editor in this process on `repo`, using the suite's generator and scorer."""
    from latentedit.rpc.launch import build_service
    from latentedit.rpc.serving import channel_options

    config = make_config(repo)
    for dependency in ("generator", "scorer"):
        config.services[dependency].port = suite_config.services[dependency].port
    host = build_service(name, config)
    return host, grpc.insecure_channel(f"localhost:{host.port}", options=channel_options())


def test_queued_jobs_run_after_a_trainer_restart(fresh_repo, suite_in_process):
    """Stop the trainer with one job running and one queued: the running one fails as interrupted,
    the queued one stays queued and runs to completion once the trainer is back."""
    host, channel = _services_on(fresh_repo, suite_in_process[0], "trainer")
    try:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        running = stub.StartJob(_boundary_request("restart-running", "never", samples=200000), timeout=60)
        for event in stub.WatchJob(trainer_pb2.WatchJobRequest(id=running.id), timeout=60):
            if event.job.state == trainer_pb2.JOB_STATE_RUNNING:
                break
        else:
            raise AssertionError(f"job {running.id} was never seen running")
        queued = stub.StartJob(_boundary_request("restart-queued", "after-restart", samples=200, keep=0.1), timeout=60)
        assert queued.state == trainer_pb2.JOB_STATE_QUEUED  # one worker, busy with the first job
    finally:
        channel.close()
        host.stop(0)

    host, channel = _services_on(fresh_repo, suite_in_process[0], "trainer")
    try:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        interrupted = stub.GetJob(trainer_pb2.GetJobRequest(id=running.id), timeout=10)
        assert interrupted.state == trainer_pb2.JOB_STATE_FAILED and "interrupted" in interrupted.error, interrupted
        final = _wait(stub, queued.id, timeout=120)[-1].job
        assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED, (trainer_pb2.JobState.Name(final.state), final.error)
        assert final.artifact.ref.name == "after-restart"
        _, entry = load_boundary(fresh_repo, "after-restart")
        assert entry.manifest["job_id"] == queued.id
    finally:
        channel.close()
        host.stop(0)


def test_a_boundary_of_another_generator_or_space_is_a_failed_precondition(fresh_repo, suite_in_process, yaw_boundary):
    """Boundaries whose artifact records another generator, a space the generator lacks, or another dimension."""
    from latentedit.methods import interfacegan as ifg
    from latentedit.models.registry import load_generator
    from latentedit.world import GeneratorInfo

    served, _ = load_boundary(ModelRepository(suite_in_process[0].repository), "unit-yaw")
    spec = load_generator(fresh_repo.resolve("dcgan-faces")).spec
    elsewhere = GeneratorInfo("stylegan-elsewhere", 1, spec)
    here = GeneratorInfo("dcgan-faces", fresh_repo.resolve("dcgan-faces").version, spec)
    attribute = {"head": "pose", "output": "yaw", "label": "", "index": None}
    ifg.boundary_artifact("foreign-yaw", served, elsewhere, "z", attribute).save(fresh_repo, {"job_id": ""})
    ifg.boundary_artifact("w-yaw", served, here, "w", attribute).save(fresh_repo, {"job_id": ""})
    wide = ifg.Boundary(np.ones(512, np.float32) / np.sqrt(512), 0.0)
    ifg.boundary_artifact("wide-yaw", wide, here, "z", attribute).save(fresh_repo, {"job_id": ""})

    host, channel = _services_on(fresh_repo, suite_in_process[0], "editor")
    try:
        stub = editor_pb2_grpc.EditorServiceStub(channel)
        base = dict(seed=editor_pb2.SeedStart(seed=0, count=1), num_frames=2)
        precondition = grpc.StatusCode.FAILED_PRECONDITION
        for boundary, text in [
            ("foreign-yaw", "boundary 'foreign-yaw' was trained for generator 'stylegan-elsewhere', not 'dcgan-faces'"),
            ("w-yaw", "boundary 'w-yaw' lives in latent space 'w'; generator 'dcgan-faces' has spaces z"),
            ("wide-yaw", "boundary 'wide-yaw' has dimension 512; latent space 'z' of generator 'dcgan-faces' has dimension 100"),
        ]:
            _expect(stub.Edit, editor_pb2.EditRequest(interfacegan=editor_pb2.InterFaceGANEdit(boundary=boundary), **base),
                    precondition, text)
        # A boundary that fits still edits on the same editor.
        ifg.boundary_artifact("fitting-yaw", served, here, "z", attribute).save(fresh_repo, {"job_id": ""})
        frames = list(stub.Edit(editor_pb2.EditRequest(interfacegan=editor_pb2.InterFaceGANEdit(boundary="fitting-yaw"), **base),
                                timeout=60))
        assert len(frames) == 2
    finally:
        channel.close()
        host.stop(0)


# ---- bad specs --------------------------------------------------------------------------------------


def _expect(call, request, code, text):
    with pytest.raises(grpc.RpcError) as info:
        result = call(request, timeout=60)
        if hasattr(result, "__iter__") and not hasattr(result, "id"):
            list(result)
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details(), info.value.details()


def test_bad_job_specs(trainer):
    INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    _expect(trainer.StartJob, _boundary_request("", "x", types_pb2.AttributeRef(head="beauty", output="score")), NOT_FOUND,
            "attribute.head 'beauty' is unknown")
    _expect(trainer.StartJob, _boundary_request("", "x", types_pb2.AttributeRef(head="pose", output="tilt")), NOT_FOUND,
            "'tilt' is not an output of head 'pose'")
    _expect(trainer.StartJob, _boundary_request("", "x", types_pb2.AttributeRef(head="expression", output="probabilities", label="bored")),
            NOT_FOUND, "'bored' is not a label")
    _expect(trainer.StartJob, _boundary_request("", "x", keep=0.7), INVALID, "keep_fraction 0.7 must be in (0, 0.5]")
    _expect(trainer.StartJob, _boundary_request("", "x", samples=50), INVALID, "num_samples 50 must be in 100..")
    _expect(trainer.StartJob, _boundary_request("", "x", samples=100, keep=0.05), INVALID, "at least 10 are needed")
    z = np.zeros((20, 100), np.float32)
    custom = trainer_pb2.StartJobRequest(custom_boundary=trainer_pb2.CustomBoundaryJobSpec(
        latents=types_pb2.Latents(space=1, values=wire.to_tensor(z)), labels=wire.to_tensor(np.zeros(19, np.int64))))
    _expect(trainer.StartJob, custom, INVALID, "19 labels for 20 latents")
    _expect(trainer.StartJob, trainer_pb2.StartJobRequest(), INVALID, "set one job spec")
    _expect(trainer.GetJob, trainer_pb2.GetJobRequest(id="job-nope"), NOT_FOUND, "no job with id 'job-nope'")


def test_bad_edits(editor, yaw_boundary):
    INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    base = dict(seed=editor_pb2.SeedStart(seed=0, count=1), num_frames=2)
    _expect(editor.Edit, editor_pb2.EditRequest(interfacegan=editor_pb2.InterFaceGANEdit(boundary="smile-ish"), **base),
            NOT_FOUND, "no boundary named 'smile-ish'")
    _expect(editor.Edit, editor_pb2.EditRequest(interfacegan=editor_pb2.InterFaceGANEdit(boundary="unit-yaw"), score_heads=["x"], **base),
            NOT_FOUND, "unknown head(s) ['x']")
    _expect(editor.Edit, editor_pb2.EditRequest(**base), INVALID, "method: choose one")
    _expect(editor.Edit, editor_pb2.EditRequest(interfacegan=editor_pb2.InterFaceGANEdit(boundary="unit-yaw"),
                                                seed=editor_pb2.SeedStart(count=1), num_frames=1000), INVALID, "num_frames 1000")
    _expect(editor.Edit, editor_pb2.EditRequest(interfacegan=editor_pb2.InterFaceGANEdit(boundary="unit-yaw", condition_boundaries=["unit-yaw"]), **base),
            INVALID, "cannot also be a condition")
    bad_latents = types_pb2.Latents(space=1, values=wire.to_tensor(np.zeros((1, 7), np.float32)))
    _expect(editor.Edit, editor_pb2.EditRequest(latents=bad_latents, interfacegan=editor_pb2.InterFaceGANEdit(boundary="unit-yaw"), num_frames=2),
            INVALID, "shape [1, 7] does not match the expected [N, 100]")
    # still serving
    assert len(list(editor.Edit(editor_pb2.EditRequest(interfacegan=editor_pb2.InterFaceGANEdit(boundary="unit-yaw"), **base), timeout=60))) == 2


def _mse(a, b):
    """Per-image mean squared error of uint8 images in [-1, 1] pixel units (as Invert reports it)."""
    return (((a.astype(np.float64) - b.astype(np.float64)) / 127.5) ** 2).mean(axis=(1, 2, 3))


def test_invert_recovers_a_generated_face_and_edits_it(editor, face_latents_and_images, yaw_boundary, generator_client,
                                                       scorer_client, suite_in_process):
    z, images, _ = face_latents_and_images
    request = editor_pb2.InvertRequest(images=wire.encode_images(images[:3], types_pb2.IMAGE_ENCODING_PNG), report_every=50)
    messages = list(editor.Invert(request, timeout=300))
    assert [m.step for m in messages[:-1]] == [50, 100, 150, 200, 250, 300]  # 300 steps by default
    errors = [np.median(wire.from_tensor(m.reconstruction_error, field="e")) for m in messages]
    assert errors[-1] < errors[0] / 3 and errors[-1] < 0.01, errors
    final = messages[-1]
    assert final.done and wire.decode_images(final.reconstructions).shape == (3, 64, 64, 3)

    # The recovered latents, re-synthesized here, draw the same faces: far closer to them than to other
    # faces (measured: MSE 0.002, 0.002, 0.03 against 0.46, 0.44, 0.25). The latents themselves need
    # not come back: this generator draws nearly the same face from distant z (the third lands 15 away).
    recovered = wire.from_tensor(final.latents.values, field="z")
    redrawn = generator_client.synthesize(recovered)
    own, others = _mse(redrawn, images[:3]), _mse(redrawn, images[3:6])
    assert np.median(own) < 0.01 and (own < 0.06).all() and (own < others / 4).all(), (own, others)

    # Its edit moves yaw the boundary's way: re-score the edited frames' images here.
    frames = list(editor.Edit(editor_pb2.EditRequest(latents=final.latents, num_frames=2,
                                                     interfacegan=editor_pb2.InterFaceGANEdit(boundary="unit-yaw", start_distance=0, end_distance=3)), timeout=60))
    assert len(frames) == 2
    yaw = [scorer_client.score(wire.decode_images(f.images), ["pose"])["pose"]["yaw"] for f in frames]
    assert (yaw[1] - yaw[0] > 10).all(), yaw  # degrees over 3 units; measured 24 to 81

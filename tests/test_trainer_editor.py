"""Trainer jobs and the streaming editor, through real stubs on in-process services."""

import time

import grpc
import numpy as np
import pytest

from latentedit import wire
from latentedit.api.v1 import editor_pb2, editor_pb2_grpc, trainer_pb2, trainer_pb2_grpc, types_pb2

YAW = types_pb2.AttributeRef(head="pose", output="yaw")


@pytest.fixture(scope="module")
def trainer(suite_in_process):
    return trainer_pb2_grpc.TrainerServiceStub(suite_in_process[2]["trainer"])


@pytest.fixture(scope="module")
def editor(suite_in_process):
    return editor_pb2_grpc.EditorServiceStub(suite_in_process[2]["editor"])


def _boundary_request(key, name, attribute=YAW, samples=600, keep=0.2):
    return trainer_pb2.StartJobRequest(idempotency_key=key, boundary=trainer_pb2.BoundaryJobSpec(
        attribute=attribute, num_samples=samples, keep_fraction=keep,
        options=trainer_pb2.TrainingOptions(artifact_name=name, batch_size=200)))


def _wait(trainer, job_id, timeout=300):
    events = list(trainer.WatchJob(trainer_pb2.WatchJobRequest(id=job_id), timeout=timeout))
    return events


@pytest.fixture(scope="module")
def yaw_boundary(trainer):
    job = trainer.StartJob(_boundary_request("unit-yaw", "unit-yaw"), timeout=60)
    events = _wait(trainer, job.id)
    assert events[-1].job.state == trainer_pb2.JOB_STATE_SUCCEEDED, events[-1].job.error
    return events


def test_boundary_job_streams_progress_and_writes_an_artifact(yaw_boundary, suite_in_process, editor):
    progress = [e.job.progress for e in yaw_boundary]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert any(e.job.phase == "sampling and scoring" for e in yaw_boundary)
    final = yaw_boundary[-1].job
    assert final.metrics["validation_accuracy"] > 0.85
    assert 0.6 < final.metrics["all_samples_accuracy"] <= 1.0
    assert final.metrics["num_kept"] == 240
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
    from latentedit.methods.interfacegan import load_boundary
    from latentedit.repository import ModelRepository

    rng = np.random.default_rng(5)
    z = rng.standard_normal((2000, 100)).astype(np.float32)
    labels = (z[:, 7] > 0).astype(np.int64)  # a known answer: the attribute is latent axis 7
    request = trainer_pb2.StartJobRequest(idempotency_key="custom-7", custom_boundary=trainer_pb2.CustomBoundaryJobSpec(
        latents=types_pb2.Latents(space=wire.space_code("z"), values=wire.to_tensor(z)),
        labels=wire.to_tensor(labels), attribute_name="axis7", options=trainer_pb2.TrainingOptions(artifact_name="axis7")))
    job = trainer.StartJob(request, timeout=60)
    final = _wait(trainer, job.id)[-1].job
    assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED, final.error
    assert final.metrics["validation_accuracy"] > 0.9
    boundary, entry = load_boundary(ModelRepository(suite_in_process[0].repository), "axis7")
    assert abs(boundary.normal[7]) > 0.8 and entry.manifest["job_id"] == job.id


def test_correlation_report(trainer, yaw_boundary, suite_in_process):
    smile = trainer.StartJob(_boundary_request("unit-smile", "unit-smile",
                                               types_pb2.AttributeRef(head="expression", output="probabilities", label="happy")), timeout=60)
    assert _wait(trainer, smile.id)[-1].job.state == trainer_pb2.JOB_STATE_SUCCEEDED
    request = trainer_pb2.StartJobRequest(idempotency_key="corr", correlation=trainer_pb2.CorrelationJobSpec(
        boundaries=["unit-yaw", "unit-smile"], num_samples=400, options=trainer_pb2.TrainingOptions(artifact_name="unit-corr")))
    final = _wait(trainer, trainer.StartJob(request, timeout=60).id)[-1].job
    assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED, final.error
    import json

    from latentedit.repository import ModelRepository

    entry = ModelRepository(suite_in_process[0].repository).resolve("unit-corr")
    report = json.loads(entry.file("report").read_text())
    cosine, correlation = np.array(report["cosine"]), np.array(report["correlation"])
    assert cosine.shape == correlation.shape == (2, 2)
    np.testing.assert_allclose(np.diag(cosine), 1.0, atol=1e-4)
    assert abs(cosine[0, 1]) < 0.5 and abs(correlation[0, 1]) < 0.5  # pose and smile are nearly independent


def test_cancel_job_stops_within_seconds(trainer):
    job = trainer.StartJob(_boundary_request("big-cancel", "never", samples=200000), timeout=60)
    deadline = time.monotonic() + 30
    while trainer.GetJob(trainer_pb2.GetJobRequest(id=job.id), timeout=10).state != trainer_pb2.JOB_STATE_RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    started = time.monotonic()
    trainer.CancelJob(trainer_pb2.CancelJobRequest(id=job.id), timeout=10)
    while trainer.GetJob(trainer_pb2.GetJobRequest(id=job.id), timeout=10).state == trainer_pb2.JOB_STATE_RUNNING:
        time.sleep(0.1)
    assert time.monotonic() - started < 10
    assert trainer.GetJob(trainer_pb2.GetJobRequest(id=job.id), timeout=10).state == trainer_pb2.JOB_STATE_CANCELLED


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
    _expect(trainer.StartJob, trainer_pb2.StartJobRequest(flow=trainer_pb2.FlowJobSpec()), grpc.StatusCode.UNIMPLEMENTED, "flow jobs")
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


def test_invert_recovers_a_generated_face_and_edits_it(editor, face_latents_and_images, yaw_boundary):
    _, images, _ = face_latents_and_images
    request = editor_pb2.InvertRequest(images=wire.encode_images(images[:3], types_pb2.IMAGE_ENCODING_PNG), report_every=50)
    messages = list(editor.Invert(request, timeout=300))
    assert [m.step for m in messages[:-1]] == [50, 100, 150, 200, 250, 300]  # 300 steps by default
    errors = [np.median(wire.from_tensor(m.reconstruction_error, field="e")) for m in messages]
    assert errors[-1] < errors[0] / 3 and errors[-1] < 0.01, errors
    final = messages[-1]
    assert final.done and wire.decode_images(final.reconstructions).shape == (3, 64, 64, 3)
    frames = list(editor.Edit(editor_pb2.EditRequest(latents=final.latents, num_frames=2,
                                                     interfacegan=editor_pb2.InterFaceGANEdit(boundary="unit-yaw", start_distance=0, end_distance=2)), timeout=60))
    assert len(frames) == 2

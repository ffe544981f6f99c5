"""W* through the trainer and the editor (real stubs, in-process services, the default world)."""

import json
import shutil

import grpc
import numpy as np
import pytest

from latentedit import wire
from latentedit.api.v1 import editor_pb2, editor_pb2_grpc, trainer_pb2, trainer_pb2_grpc, types_pb2
from latentedit.latents import Latents
from latentedit.repository import ModelRepository

YAW = types_pb2.AttributeRef(head="pose", output="yaw")
HAPPY = types_pb2.AttributeRef(head="expression", output="probabilities", label="happy")


@pytest.fixture(scope="module")
def stubs(suite_in_process):
    channels = suite_in_process[2]
    return trainer_pb2_grpc.TrainerServiceStub(channels["trainer"]), editor_pb2_grpc.EditorServiceStub(channels["editor"])


def _spec(name, **fields):
    options = trainer_pb2.TrainingOptions(artifact_name=name, steps=fields.pop("steps", 40), batch_size=64)
    return trainer_pb2.FlowJobSpec(**{"attributes": [YAW], "num_samples": 128, "num_coupling_layers": 2, "hidden_dim": 32,
                                      **fields}, options=options)


@pytest.fixture(scope="module")
def flow_job(stubs):
    trainer = stubs[0]
    job = trainer.StartJob(trainer_pb2.StartJobRequest(idempotency_key="unit-wstar", flow=_spec("unit-wstar")), timeout=60)
    events = list(trainer.WatchJob(trainer_pb2.WatchJobRequest(id=job.id), timeout=600))
    assert events[-1].job.state == trainer_pb2.JOB_STATE_SUCCEEDED, events[-1].job.error
    return events


def test_flow_job_reports_progress_metrics_and_a_listed_artifact(stubs, flow_job, suite_in_process):
    phases = [e.job.phase for e in flow_job]
    # WatchJob sends the job's state when it changes, so a brief phase can be passed over between two
    # events (it was, once, in a full-suite run): the long phases must be seen, in order, and the brief
    # "measuring the proxy space" shows in its metrics (the *_proxy ones below).
    for phase in ("sampling, scoring and perceptual distances", "training the flow"):
        assert phase in phases
    seen = list(dict.fromkeys(phases))
    assert seen.index("sampling, scoring and perceptual distances") < seen.index("training the flow"), seen
    progress = [e.job.progress for e in flow_job]
    assert progress == sorted(progress) and progress[-1] == 1.0
    final = flow_job[-1].job
    assert final.artifact.kind == trainer_pb2.ARTIFACT_KIND_FLOW and final.artifact.ref.name == "unit-wstar"
    for key in ("loss_attributes", "loss_distance", "classifier_accuracy_original", "classifier_accuracy_proxy",
                "fresh_accuracy_original", "fresh_accuracy_proxy", "perceptual_scale", "distance_gap_std_proxy"):
        assert key in final.metrics and np.isfinite(final.metrics[key]), key
    assert final.metrics["perceptual_scale"] > 0
    (listed,) = [e for e in stubs[1].ListEdits(editor_pb2.ListEditsRequest(), timeout=10).edits if e.artifact.ref.name == "unit-wstar"]
    assert listed.method == "wstar" and listed.job_id == final.id
    assert [(a.head, a.output) for a in listed.attributes] == [("pose", "yaw")]
    repo = ModelRepository(suite_in_process[0].repository)
    manifest = repo.resolve("unit-wstar", kind="flow").manifest
    assert manifest["architecture"]["couplings"] == 2 and manifest["perceptual"]["scale"] == pytest.approx(
        final.metrics["perceptual_scale"])
    assert "EmotionNet" in manifest["perceptual"]["definition"]


def _edit(editor, start=None, **fields):
    wstar = editor_pb2.WStarEdit(**{"flow": "unit-wstar", "attribute": YAW, "start_distance": -4, "end_distance": 4, **fields})
    where = dict(latents=start) if start is not None else dict(seed=editor_pb2.SeedStart(seed=5, count=8))
    return editor_pb2.EditRequest(wstar=wstar, num_frames=3, score_heads=["pose"], omit_images=True, **where)


def test_edit_moves_the_attribute_and_maps_back_exactly(stubs, flow_job, suite_in_process):
    from latentedit.world import LocalWorld

    editor = stubs[1]
    world = LocalWorld(ModelRepository(suite_in_process[0].repository))
    generator = world.generator()
    start = world.sample(generator, 12, 21)
    frames = list(editor.Edit(_edit(editor, wire.latents_to_proto(start)), timeout=300))
    assert [f.stop_reason for f in frames] == [0, 0, editor_pb2.STOP_REASON_COMPLETED]
    assert [f.metrics["distance"] for f in frames] == [-4, 0, 4]
    # Distance 0 is T^-1(T(z)): the start itself, to float precision.
    middle = wire.latents_from_proto(frames[1].latents, generator.spec)
    np.testing.assert_allclose(middle.values, start.values, atol=1e-4)
    assert frames[2].metrics["proxy_distance"] == pytest.approx(4.0, rel=1e-4)
    assert frames[2].metrics["latent_distance"] > 0.5
    yaw = np.stack([wire.scores_from_proto(f.scores)["pose"]["yaw"] for f in frames])
    monotone = ((yaw[1] > yaw[0]) & (yaw[2] > yaw[1])).mean()
    assert monotone >= 0.75, yaw
    assert frames[0].metrics["classifier_logit"] < frames[2].metrics["classifier_logit"]
    # The proxy-space InterFaceGAN boundary is another direction there, and it edits yaw too.
    svm = list(editor.Edit(_edit(editor, wire.latents_to_proto(start), proxy_boundary=True), timeout=300))
    moved = wire.latents_from_proto(svm[2].latents, generator.spec).values
    assert np.abs(moved - wire.latents_from_proto(frames[2].latents, generator.spec).values).max() > 1e-2
    assert svm[2].metrics["proxy_distance"] == pytest.approx(4.0, rel=1e-4)
    yaw = np.stack([wire.scores_from_proto(f.scores)["pose"]["yaw"] for f in svm])
    assert (yaw[2] > yaw[0]).mean() >= 0.75, yaw


def _expect(call, request, code, text):
    with pytest.raises(grpc.RpcError) as info:
        result = call(request, timeout=60)
        if hasattr(result, "__iter__"):
            list(result)
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details(), info.value.details()


def _copy_flow(repo: ModelRepository, name: str, **changes) -> None:
    source = repo.resolve("unit-wstar", kind="flow")
    manifest = {**json.loads((source.path / "manifest.json").read_text()), **changes}
    repo.write(name, manifest, lambda folder: shutil.copy(source.path / "flow.safetensors", folder / "flow.safetensors"))


def test_bad_edits_get_precise_codes(stubs, flow_job, suite_in_process):
    editor = stubs[1]
    repo = ModelRepository(suite_in_process[0].repository)
    Code = grpc.StatusCode
    _expect(editor.Edit, _edit(editor, flow="nope"), Code.NOT_FOUND, "no W* flow named 'nope'")
    _expect(editor.Edit, _edit(editor, attribute=HAPPY), Code.NOT_FOUND, "was not trained on it; its attributes: pose.yaw")
    _expect(editor.Edit, _edit(editor, attribute=types_pb2.AttributeRef()), Code.INVALID_ARGUMENT, "attribute: name the attribute")
    _expect(editor.Edit, _edit(editor, condition_attributes=[YAW]), Code.INVALID_ARGUMENT, "cannot also be a condition")
    _expect(editor.Edit, _edit(editor, end_distance=float("nan")), Code.INVALID_ARGUMENT, "end_distance must be a finite")
    _expect(editor.Edit, _edit(editor, rows=types_pb2.RowRange(start=0, end=1)), Code.INVALID_ARGUMENT, "rows")
    _copy_flow(repo, "unit-wstar-other-generator", generator={"name": "stylegan2-ffhq", "version": 1})
    _expect(editor.Edit, _edit(editor, flow="unit-wstar-other-generator"), Code.FAILED_PRECONDITION,
            "was trained for generator 'stylegan2-ffhq', not 'dcgan-faces'")
    _copy_flow(repo, "unit-wstar-w-space", space="w")
    _expect(editor.Edit, _edit(editor, flow="unit-wstar-w-space"), Code.FAILED_PRECONDITION, "lives in latent space 'w'")
    wrong = wire.latents_to_proto(Latents(_space(50), np.zeros((2, 50), np.float32)))
    _expect(editor.Edit, _edit(editor, wrong), Code.INVALID_ARGUMENT, "latents.values")
    nan = wire.latents_to_proto(Latents(_space(100), np.zeros((2, 100), np.float32)))
    nan.values.CopyFrom(wire.to_tensor(np.full((2, 100), np.nan, np.float32)))
    _expect(editor.Edit, _edit(editor, nan), Code.INVALID_ARGUMENT, "finite")
    # Still serving after all of that.
    assert len(list(editor.Edit(_edit(editor), timeout=120))) == 3


def _space(dim):
    from latentedit.latents import LatentSpaceSpec

    return LatentSpaceSpec("z", dim, prior="normal")


def test_bad_flow_jobs_get_precise_codes(stubs):
    trainer = stubs[0]
    Code = grpc.StatusCode
    job = lambda **f: trainer_pb2.StartJobRequest(flow=_spec("unit-wstar-bad", **f))  # noqa: E731
    _expect(trainer.StartJob, job(attributes=[]), Code.INVALID_ARGUMENT, "attributes: name at least one attribute")
    _expect(trainer.StartJob, job(attributes=[types_pb2.AttributeRef(head="nohead", output="x")]), Code.NOT_FOUND,
            "attributes[0].head 'nohead' is unknown")
    _expect(trainer.StartJob, job(attributes=[YAW, YAW]), Code.INVALID_ARGUMENT, "named twice")
    _expect(trainer.StartJob, job(distance_weight=-1), Code.INVALID_ARGUMENT, "distance_weight -1 must be >= 0")
    _expect(trainer.StartJob, job(identity_weight=float("nan")), Code.INVALID_ARGUMENT, "identity_weight must be a finite")
    _expect(trainer.StartJob, job(num_samples=10), Code.INVALID_ARGUMENT, "num_samples 10 must be in")
    _expect(trainer.StartJob, job(num_coupling_layers=65), Code.INVALID_ARGUMENT, "num_coupling_layers 65 must be in 1..64")
    _expect(trainer.StartJob, job(space=types_pb2.LATENT_SPACE_W), Code.INVALID_ARGUMENT, "no latent space 'w'")


def test_a_cancelled_flow_job_ends_cancelled_and_writes_nothing(stubs):
    """Cancelled while T trains (no downstream call in flight then: only the method's own
    progress checks can stop it)."""
    trainer, editor = stubs
    spec = _spec("unit-wstar-cancelled", steps=100_000)
    job = trainer.StartJob(trainer_pb2.StartJobRequest(idempotency_key="unit-wstar-cancelled", flow=spec), timeout=60)
    for event in trainer.WatchJob(trainer_pb2.WatchJobRequest(id=job.id), timeout=600):
        if event.job.phase == "training the flow":
            trainer.CancelJob(trainer_pb2.CancelJobRequest(id=job.id), timeout=30)
            break
    final = list(trainer.WatchJob(trainer_pb2.WatchJobRequest(id=job.id), timeout=60))[-1].job
    assert final.state == trainer_pb2.JOB_STATE_CANCELLED and not final.artifact.ref.name
    assert final.progress < 0.5
    _expect(editor.Edit, _edit(editor, flow="unit-wstar-cancelled"), grpc.StatusCode.NOT_FOUND,
            "no W* flow named 'unit-wstar-cancelled'")

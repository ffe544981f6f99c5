"""DP-LaSE through the trainer and the editor (real stubs, in-process services, the default world)."""

import grpc
import numpy as np
import pytest

from latentedit import wire
from latentedit.api.v1 import editor_pb2, editor_pb2_grpc, trainer_pb2, trainer_pb2_grpc, types_pb2


@pytest.fixture(scope="module")
def stubs(suite_in_process):
    channels = suite_in_process[2]
    return trainer_pb2_grpc.TrainerServiceStub(channels["trainer"]), editor_pb2_grpc.EditorServiceStub(channels["editor"])


def _train(trainer, name, **fields):
    spec = trainer_pb2.DirectionJobSpec(num_directions=3, layer="block3", num_samples=4, **fields,
                                        options=trainer_pb2.TrainingOptions(artifact_name=name, steps=20, batch_size=8))
    job = trainer.StartJob(trainer_pb2.StartJobRequest(idempotency_key=name, directions=spec), timeout=60)
    events = list(trainer.WatchJob(trainer_pb2.WatchJobRequest(id=job.id), timeout=600))
    assert events[-1].job.state == trainer_pb2.JOB_STATE_SUCCEEDED, events[-1].job.error
    return events


@pytest.fixture(scope="module")
def directions(stubs):
    return _train(stubs[0], "unit-dplase", num_channel_subspaces=4)


def _edit(editor, density_preserving, subspace_refinement, name="unit-dplase", index=0):
    request = editor_pb2.EditRequest(
        seed=editor_pb2.SeedStart(seed=11, count=3), num_frames=3, score_heads=["pose"],
        dplase=editor_pb2.DPLaSEEdit(directions=name, direction_index=index, start_stride=-8, end_stride=8,
                                     density_preserving=density_preserving, subspace_refinement=subspace_refinement))
    return list(editor.Edit(request, timeout=120))


def test_direction_job_reports_progress_and_names_its_directions(stubs, directions):
    phases = [e.job.phase for e in directions]
    for phase in ("learning directions", "refining channel subspaces", "naming directions with the scorer"):
        assert phase in phases
    progress = [e.job.progress for e in directions]
    assert progress == sorted(progress) and progress[-1] == 1.0
    final = directions[-1].job
    assert final.artifact.kind == trainer_pb2.ARTIFACT_KIND_DIRECTIONS
    assert final.metrics["orthogonality_error"] < 1e-5 and final.metrics["num_directions"] == 3
    (listed,) = [e for e in stubs[1].ListEdits(editor_pb2.ListEditsRequest(), timeout=10).edits
                 if e.artifact.ref.name == "unit-dplase"]
    assert listed.method == "dplase" and listed.num_directions == 3 and listed.job_id == final.id
    named = {n.direction_index for n in listed.direction_names}
    assert named == {0, 1, 2}
    for name in listed.direction_names:
        assert -1 <= name.correlation <= 1 and name.attribute.head
        assert name.summary.endswith(f"{name.correlation:+.2f}")


def test_walks_with_and_without_density_preservation(stubs, directions):
    _, editor = stubs
    plain = _edit(editor, False, False)
    kept = _edit(editor, True, False)
    assert [f.stop_reason for f in kept] == [0, 0, editor_pb2.STOP_REASON_COMPLETED]
    assert [f.metrics["stride"] for f in kept] == [-8, 0, 8]
    norms = lambda frames: np.stack([np.linalg.norm(wire.from_tensor(f.latents.values, field="z"), axis=1)  # noqa: E731
                                     for f in frames])
    # Eq. 2 on the Gaussian prior: every frame keeps the start's norm; the plain walk does not.
    np.testing.assert_allclose(norms(kept), np.broadcast_to(norms(kept)[1], (3, 3)), rtol=1e-5)
    assert (norms(plain)[[0, 2]] > norms(plain)[1] + 1).all()
    # The plain walk advances exactly stride * gamma: recover gamma from the frames.
    z = [wire.from_tensor(f.latents.values, field="z") for f in plain]
    step = (z[2] - z[0]) / 16
    np.testing.assert_allclose(np.linalg.norm(step, axis=1), 1.0, atol=1e-4)
    assert kept[0].scores[0].head == "pose"


def test_subspace_refinement_changes_only_the_masked_channels(stubs, directions, suite_in_process):
    """The refined frames are G2(mixed features): compute them independently from the artifact's mask."""
    from latentedit.artifacts import DIRECTIONS_KIND
    from latentedit.methods.dplase import load_directions, mix_features
    from latentedit.repository import ModelRepository
    from latentedit.world import LocalWorld

    config = suite_in_process[0]
    repo = ModelRepository(config.repository)
    artifact = load_directions(repo.resolve("unit-dplase", kind=DIRECTIONS_KIND))
    assert artifact.masks is not None and artifact.masks.shape == (3, 256 if artifact.layer == "block2" else 128)
    refined = _edit(stubs[1], True, True, index=1)
    world = LocalWorld(repo)
    generator = world.generator()
    start = wire.latents_from_proto(refined[1].latents, generator.spec)
    last = wire.latents_from_proto(refined[2].latents, generator.spec)
    features = world.features(generator, start, [artifact.layer])[artifact.layer]
    walked = world.features(generator, last, [artifact.layer])[artifact.layer]
    expected = world.synthesize_from(generator, artifact.layer, mix_features(features, walked, artifact.masks[1]))
    got = wire.decode_images(refined[2].images)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    unrefined = wire.decode_images(_edit(stubs[1], True, False, index=1)[2].images)
    assert np.abs(unrefined.astype(int) - got.astype(int)).mean() > 1, "refinement must change the frames"


def _expect(call, request, code, text):
    with pytest.raises(grpc.RpcError) as info:
        result = call(request, timeout=60)
        if hasattr(result, "__iter__"):
            list(result)
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details(), info.value.details()


def test_bad_dplase_requests(stubs, directions):
    trainer, editor = stubs
    base = dict(seed=editor_pb2.SeedStart(seed=0, count=1), num_frames=2)
    edit = lambda **f: editor_pb2.EditRequest(dplase=editor_pb2.DPLaSEEdit(**{"directions": "unit-dplase", **f}), **base)  # noqa: E731
    _expect(editor.Edit, edit(directions="nope"), grpc.StatusCode.NOT_FOUND, "no DP-LaSE directions named 'nope'")
    _expect(editor.Edit, edit(direction_index=3), grpc.StatusCode.INVALID_ARGUMENT, "has 3 directions (0..2)")
    _expect(editor.Edit, edit(end_stride=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "end_stride must be a finite")
    _expect(editor.Edit, edit(rows=types_pb2.RowRange(start=0, end=1)), grpc.StatusCode.INVALID_ARGUMENT, "rows")
    job = lambda **f: trainer_pb2.StartJobRequest(directions=trainer_pb2.DirectionJobSpec(**f))  # noqa: E731
    _expect(trainer.StartJob, job(layer="block9"), grpc.StatusCode.NOT_FOUND, "unknown layer 'block9'")
    _expect(trainer.StartJob, job(layer="image"), grpc.StatusCode.INVALID_ARGUMENT, "intermediate layer")
    _expect(trainer.StartJob, job(max_stride=float("inf")), grpc.StatusCode.INVALID_ARGUMENT, "max_stride must be a finite")
    _expect(trainer.StartJob, job(num_directions=101), grpc.StatusCode.INVALID_ARGUMENT, "num_directions 101 must be in 1..100")
    _expect(trainer.StartJob, job(similarity_weight=-1), grpc.StatusCode.INVALID_ARGUMENT, "similarity_weight -1.0 must be >= 0")
    # Still serving after all of that.
    assert len(_edit(editor, False, False)) == 3


def test_refinement_and_learned_walks_need_what_the_artifact_lacks(stubs, suite_in_process):
    """An artifact without channel masks cannot refine; one for an unknown prior without F and C
    cannot walk density-preserving: FAILED_PRECONDITION naming what to retrain with."""
    from latentedit.artifacts import DIRECTIONS_KIND, tensors_writer
    from latentedit.repository import ModelRepository

    trainer, editor = stubs
    _train(trainer, "unit-dplase-plain", num_channel_subspaces=0)
    _expect(editor.Edit, editor_pb2.EditRequest(seed=editor_pb2.SeedStart(count=1), num_frames=2, dplase=editor_pb2.DPLaSEEdit(
        directions="unit-dplase-plain", subspace_refinement=True)), grpc.StatusCode.FAILED_PRECONDITION, "num_channel_subspaces")
    repo = ModelRepository(suite_in_process[0].repository)
    gamma = np.eye(100, dtype=np.float32)[:2]
    repo.write("unit-dplase-unknown-prior", {"kind": DIRECTIONS_KIND, "space": "z", "layer": "block2", "gaussian_prior": False,
                                             "generator": {"name": "dcgan-faces", "version": 1},
                                             "files": {"directions": "directions.safetensors"}},
               tensors_writer("directions.safetensors", {"directions": gamma}))
    _expect(editor.Edit, editor_pb2.EditRequest(seed=editor_pb2.SeedStart(count=1), num_frames=2, dplase=editor_pb2.DPLaSEEdit(
        directions="unit-dplase-unknown-prior", density_preserving=True)), grpc.StatusCode.FAILED_PRECONDITION, "learn_density")

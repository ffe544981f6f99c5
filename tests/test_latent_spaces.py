"""Z, W and W+ through every method and service, on a random-mapping W+ generator (real stubs).

The generator is the default DCGAN body behind a random mapping network (z -> w) and a W+
input whose rows each reach the body through their own linear map (`models.mapped`).
"""

import grpc
import numpy as np
import pytest

from latentedit import wire
from latentedit.api.v1 import (
    editor_pb2,
    editor_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
    types_pb2,
)
from latentedit.errors import InvalidArgument
from latentedit.latents import Latents, LatentSpaceSpec, RowRange, move
from tests.conftest import private_copy, start_services

MAPPED = "mapped-faces"
YAW = types_pb2.AttributeRef(head="pose", output="yaw")
W, W_PLUS = wire.space_code("w"), wire.space_code("w+")


# ---- latents as data (known answers) -------------------------------------------------------


def test_latents_check_their_space_and_finiteness_after_the_cast():
    space = LatentSpaceSpec("w+", 3, 2)
    with pytest.raises(InvalidArgument, match="does not match space w\\+"):
        Latents(space, np.zeros((1, 3), np.float32))
    with pytest.raises(InvalidArgument, match="finite"):
        Latents(LatentSpaceSpec("z", 2), np.array([[1e300, 0.0]]))  # finite in float64, Inf in float32


def test_a_w_direction_moves_only_the_chosen_w_plus_rows():
    start = Latents(LatentSpaceSpec("w+", 3, 4), np.zeros((2, 4, 3), np.float32))
    moved = move(start, np.array([1.0, 0.0, 0.0]), np.array([2.0, -1.0]), RowRange(1, 3))
    np.testing.assert_array_equal(moved.values[:, [0, 3]], 0.0)
    np.testing.assert_array_equal(moved.values[0, 1:3, 0], 2.0)
    np.testing.assert_array_equal(moved.values[1, 1:3, 0], -1.0)
    with pytest.raises(InvalidArgument, match="rows"):
        move(start, np.ones(3), 1.0, RowRange(2, 9))
    with pytest.raises(InvalidArgument, match="does not fit"):
        move(start, np.ones(5), 1.0)


# ---- through the services --------------------------------------------------------------------


@pytest.fixture(scope="module")
def suite(installed_repo, tmp_path_factory):
    from latentedit.models.mapped import install_random_mapped_dcgan

    repo = private_copy(installed_repo, tmp_path_factory.mktemp("spaces") / "repo")
    install_random_mapped_dcgan(repo, MAPPED, repo.resolve("dcgan-faces"), num_ws=4, seed=3)
    config, hosts = start_services(repo)
    channels = {name: grpc.insecure_channel(f"localhost:{host.port}") for name, host in hosts.items()}
    yield repo, channels
    for channel in channels.values():
        channel.close()
    for host in reversed(list(hosts.values())):
        host.stop(0)


@pytest.fixture(scope="module")
def stubs(suite):
    _, channels = suite
    return (generator_pb2_grpc.GeneratorServiceStub(channels["generator"]), trainer_pb2_grpc.TrainerServiceStub(channels["trainer"]),
            editor_pb2_grpc.EditorServiceStub(channels["editor"]))


def _train(trainer, request):
    job = trainer.StartJob(request, timeout=60)
    final = list(trainer.WatchJob(trainer_pb2.WatchJobRequest(id=job.id), timeout=600))[-1].job
    assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED, final.error
    return final


def test_the_generator_serves_z_w_and_w_plus(stubs):
    generator, _, _ = stubs
    info = next(m for m in generator.ListModels(generator_pb2.ListModelsRequest(), timeout=30).models if m.ref.name == MAPPED)
    assert [(s.space, s.dim, s.num_ws) for s in info.latent_spaces] == [(wire.space_code("z"), 100, 1), (W, 100, 1), (W_PLUS, 100, 4)]
    ref = types_pb2.ModelRef(name=MAPPED)
    w = generator.Sample(generator_pb2.SampleRequest(model=ref, count=3, seed=5, space=W), timeout=30).latents
    w_plus = generator.Sample(generator_pb2.SampleRequest(model=ref, count=3, seed=5, space=W_PLUS), timeout=30).latents
    assert list(w.values.shape) == [3, 100] and list(w_plus.values.shape) == [3, 4, 100]
    # W+ from Sample is W broadcast over the rows, so both give the same images.
    np.testing.assert_allclose(wire.from_tensor(w_plus.values, field="w+"),
                               np.repeat(wire.from_tensor(w.values, field="w")[:, None], 4, axis=1))

    def images(latents):
        response = generator.Synthesize(generator_pb2.SynthesizeRequest(model=ref, latents=latents), timeout=30)
        return wire.decode_images(response.images).astype(int)

    assert np.abs(images(w) - images(w_plus)).max() <= 1
    with pytest.raises(grpc.RpcError) as info:
        bad = types_pb2.Latents(space=W_PLUS, values=wire.to_tensor(np.zeros((1, 3, 100), np.float32)))
        generator.Synthesize(generator_pb2.SynthesizeRequest(model=ref, latents=bad), timeout=30)
    details = info.value.details()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "num_ws = 4 rows of 100" in details and "3 rows" in details, details


@pytest.fixture(scope="module")
def w_boundary(stubs):
    _, trainer, _ = stubs
    return _train(trainer, trainer_pb2.StartJobRequest(boundary=trainer_pb2.BoundaryJobSpec(
        generator=types_pb2.ModelRef(name=MAPPED), space=W, attribute=YAW, num_samples=600, keep_fraction=0.2,
        options=trainer_pb2.TrainingOptions(artifact_name="w-yaw", batch_size=200))))


def test_a_boundary_job_in_w_learns_the_attribute(w_boundary, suite):
    from latentedit.methods.interfacegan import load_boundary

    assert w_boundary.metrics["validation_accuracy"] > 0.8
    boundary, entry = load_boundary(suite[0], "w-yaw")
    assert entry.manifest["space"] == "w" and boundary.normal.shape == (100,)


def _yaw(frame):
    return [wire.from_tensor(o.tensor, field="yaw") for h in frame.scores for o in h.outputs if o.name == "yaw"][0]


def test_an_interfacegan_edit_in_w_moves_yaw(stubs, w_boundary):
    _, _, editor = stubs
    frames = list(editor.Edit(editor_pb2.EditRequest(
        generator=types_pb2.ModelRef(name=MAPPED), seed=editor_pb2.SeedStart(seed=1, count=6),
        interfacegan=editor_pb2.InterFaceGANEdit(boundary="w-yaw", start_distance=-3, end_distance=3),
        num_frames=5, score_heads=["pose"]), timeout=120))
    assert all(f.latents.space == W and list(f.latents.values.shape) == [6, 100] for f in frames)
    yaw = np.stack([_yaw(f) for f in frames])
    assert (yaw[-1] - yaw[0]).mean() > 20  # degrees over 6 units along the W normal


def test_a_per_layer_edit_moves_only_the_chosen_w_plus_rows(stubs, w_boundary, suite):
    from latentedit.methods.interfacegan import load_boundary

    _, _, editor = stubs
    normal = load_boundary(suite[0], "w-yaw")[0].normal
    frames = list(editor.Edit(editor_pb2.EditRequest(
        generator=types_pb2.ModelRef(name=MAPPED), seed=editor_pb2.SeedStart(seed=2, count=3),
        interfacegan=editor_pb2.InterFaceGANEdit(boundary="w-yaw", start_distance=0, end_distance=2,
                                                 rows=types_pb2.RowRange(start=0, end=2)),
        num_frames=3, score_heads=["pose"]), timeout=120))
    first, last = (wire.from_tensor(f.latents.values, field="w+") for f in (frames[0], frames[-1]))
    assert frames[-1].latents.space == W_PLUS and first.shape == (3, 4, 100)
    np.testing.assert_allclose(last[:, 2:], first[:, 2:], atol=1e-6)  # rows 2, 3 untouched
    np.testing.assert_allclose(last[:, :2] - first[:, :2], np.broadcast_to(2 * normal, (3, 2, 100)), atol=1e-5)
    assert not np.array_equal(_yaw(frames[0]), _yaw(frames[-1]))  # the image changed


def test_an_sgf_edit_in_w_streams_w_latents_toward_the_target(stubs):
    _, trainer, editor = stubs
    _train(trainer, trainer_pb2.StartJobRequest(mapping=trainer_pb2.MappingJobSpec(
        generator=types_pb2.ModelRef(name=MAPPED), space=W, condition=trainer_pb2.CONDITION_KIND_ATTRIBUTES, attributes=[YAW],
        num_pairs=400, depth=3, hidden_dim=64, options=trainer_pb2.TrainingOptions(artifact_name="w-sgf", steps=400, batch_size=200))))
    target = editor_pb2.AttributeTarget(values=[editor_pb2.AttributeValue(attribute=YAW, value=25.0)])
    frames = list(editor.Edit(editor_pb2.EditRequest(
        generator=types_pb2.ModelRef(name=MAPPED), seed=editor_pb2.SeedStart(seed=4, count=4),
        sgf=editor_pb2.SGFEdit(mapping="w-sgf", attributes=target, max_steps=8), score_heads=["pose"]), timeout=300))
    assert all(f.latents.space == W and list(f.latents.values.shape) == [4, 100] for f in frames)
    assert frames[-1].stop_reason in (editor_pb2.STOP_REASON_TARGET_REACHED, editor_pb2.STOP_REASON_STEP_LIMIT)
    assert frames[-1].metrics["distance_to_target"] < frames[0].metrics["distance_to_target"]


def test_latents_of_the_wrong_space_are_refused(stubs, w_boundary):
    _, _, editor = stubs
    z = types_pb2.Latents(space=wire.space_code("z"), values=wire.to_tensor(np.zeros((1, 100), np.float32)))
    with pytest.raises(grpc.RpcError) as info:
        list(editor.Edit(editor_pb2.EditRequest(generator=types_pb2.ModelRef(name=MAPPED), latents=z,
                                                interfacegan=editor_pb2.InterFaceGANEdit(boundary="w-yaw")), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "works on w latents; these are z" in info.value.details()
    # The DCGAN has no W: a W boundary job on it is refused up front.
    _, trainer, _ = stubs
    with pytest.raises(grpc.RpcError) as info:
        trainer.StartJob(trainer_pb2.StartJobRequest(boundary=trainer_pb2.BoundaryJobSpec(space=W, attribute=YAW)), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no latent space 'w'" in info.value.details()


def test_ganspace_is_served_as_an_edit(stubs, suite):
    """GANSpace came in as one method module plus one registry line: trained as a job, listed, edited."""
    from latentedit.artifacts import load_tensors
    from latentedit.methods.ganspace import GANSpace

    _, trainer, editor = stubs
    _train(trainer, trainer_pb2.StartJobRequest(pca=trainer_pb2.PCAJobSpec(
        num_samples=300, num_components=5, options=trainer_pb2.TrainingOptions(artifact_name="pca", batch_size=150))))
    listed = {e.artifact.ref.name: e for e in editor.ListEdits(editor_pb2.ListEditsRequest(), timeout=30).edits}
    assert listed["pca"].method == "ganspace" and listed["pca"].num_directions == 5
    assert listed["pca"].artifact.kind == trainer_pb2.ARTIFACT_KIND_PCA_DIRECTIONS
    frames = list(editor.Edit(editor_pb2.EditRequest(
        seed=editor_pb2.SeedStart(seed=0, count=2), ganspace=editor_pb2.GANSpaceEdit(directions="pca", component=1,
                                                                                    start_distance=-2, end_distance=2),
        num_frames=3, omit_images=True), timeout=60))
    direction = load_tensors(suite[0].resolve("pca", kind=GANSpace.artifact_kind), "directions")["directions"].numpy()[1]
    z0, z2 = (wire.from_tensor(frames[i].latents.values, field="z") for i in (0, 2))
    np.testing.assert_allclose(z2 - z0, np.broadcast_to(4 * direction, z0.shape), atol=1e-5)
    assert [f.stop_reason for f in frames][-1] == editor_pb2.STOP_REASON_COMPLETED
    with pytest.raises(grpc.RpcError) as info:
        list(editor.Edit(editor_pb2.EditRequest(seed=editor_pb2.SeedStart(count=1),
                                                ganspace=editor_pb2.GANSpaceEdit(directions="pca", component=9)), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "out of range" in info.value.details()

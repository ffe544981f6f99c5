"""SGF through the public API: mapping jobs and closed-loop edits toward attribute, keypoint and caption targets."""

import grpc
import numpy as np
import pytest

from latentedit import wire
from latentedit.api.v1 import editor_pb2, editor_pb2_grpc, trainer_pb2, trainer_pb2_grpc, types_pb2

YAW = types_pb2.AttributeRef(head="pose", output="yaw")
MOUTH = types_pb2.AttributeRef(head="pose", output="mouth_openness")
HAPPY = types_pb2.AttributeRef(head="expression", output="probabilities", label="happy")


@pytest.fixture(scope="module")
def stubs(suite_in_process):
    channels = suite_in_process[2]
    return trainer_pb2_grpc.TrainerServiceStub(channels["trainer"]), editor_pb2_grpc.EditorServiceStub(channels["editor"])


def _train(trainer, name, condition, pairs=1000, **fields):
    spec = trainer_pb2.MappingJobSpec(condition=condition, num_pairs=pairs, depth=6, hidden_dim=128,
                                      options=trainer_pb2.TrainingOptions(artifact_name=name, steps=1500), **fields)
    job = trainer.StartJob(trainer_pb2.StartJobRequest(idempotency_key=name, mapping=spec), timeout=120)
    final = list(trainer.WatchJob(trainer_pb2.WatchJobRequest(id=job.id), timeout=900))[-1].job
    assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED, final.error
    return final


@pytest.fixture(scope="module")
def attribute_mapping(stubs):
    return _train(stubs[0], "sgf-attributes", trainer_pb2.CONDITION_KIND_ATTRIBUTES, attributes=[YAW, MOUTH, HAPPY])


@pytest.fixture(scope="module")
def keypoint_mapping(stubs):
    return _train(stubs[0], "sgf-keypoints", trainer_pb2.CONDITION_KIND_KEYPOINTS, keypoints_head="keypoints5")


@pytest.fixture(scope="module")
def caption_mapping(stubs):
    return _train(stubs[0], "sgf-caption", trainer_pb2.CONDITION_KIND_CAPTION, pairs=600)


def _edit(editor, mapping, target, heads, seed=3, count=8, steps=20, tolerance=0.1):
    request = editor_pb2.EditRequest(seed=editor_pb2.SeedStart(seed=seed, count=count), score_heads=heads, omit_images=True,
                                     sgf=editor_pb2.SGFEdit(mapping=mapping, max_steps=steps, tolerance=tolerance, **target))
    return list(editor.Edit(request, timeout=600))


def _output(frame, head, name):
    return [wire.from_tensor(o.tensor, field=name) for h in frame.scores if h.head == head for o in h.outputs if o.name == name][0]


def test_every_layer_of_the_trained_mapping_is_a_contraction(attribute_mapping, suite_in_process):
    from latentedit.methods.sgf import load_mapping
    from latentedit.repository import ModelRepository

    assert attribute_mapping.metrics["max_spectral_norm"] < 1.0
    prepared = load_mapping(ModelRepository(suite_in_process[0].repository), "sgf-attributes")
    mapping, condition = prepared.mapping, prepared.condition
    assert max(mapping.layer_spectral_norms()) < 1.0
    assert condition.kind == "attributes" and [a.output for a in condition.attributes] == ["yaw", "mouth_openness", "probabilities"]
    assert "reconstruction_error" in attribute_mapping.metrics


def test_attribute_target_is_reached_for_most_samples(stubs, attribute_mapping):
    _, editor = stubs
    target = {"attributes": editor_pb2.AttributeTarget(values=[editor_pb2.AttributeValue(attribute=YAW, value=25.0)])}
    frames = _edit(editor, "sgf-attributes", target, ["pose"])
    yaw = np.stack([_output(f, "pose", "yaw") for f in frames])
    assert frames[-1].stop_reason in (editor_pb2.STOP_REASON_TARGET_REACHED, editor_pb2.STOP_REASON_STEP_LIMIT)
    assert all(f.stop_reason == editor_pb2.STOP_REASON_UNSPECIFIED for f in frames[:-1])  # one frame per step, streamed
    assert frames[-1].metrics["reached"] > 0.5, frames[-1].metrics["reached"]  # most samples
    assert np.abs(yaw[-1] - 25).mean() < np.abs(yaw[0] - 25).mean() / 2


def test_keypoint_targets_from_other_samples_pull_the_points_closer(stubs, keypoint_mapping):
    _, editor = stubs
    # Targets: the keypoints of other samples (seed 4), scored through the same service.
    donors = _edit(editor, "sgf-keypoints", {"keypoints": editor_pb2.KeypointTarget(
        points=wire.to_tensor(np.full((5, 2), 32.0, np.float32)))}, ["keypoints5"], seed=4, steps=1)
    target_points = _output(donors[0], "keypoints5", "points")
    frames = _edit(editor, "sgf-keypoints", {"keypoints": editor_pb2.KeypointTarget(points=wire.to_tensor(target_points))},
                   ["keypoints5"], steps=15)
    distance = [np.linalg.norm(_output(f, "keypoints5", "points") - target_points, axis=-1).mean() for f in frames]
    assert distance[-1] < distance[0] * 0.8, distance


def test_caption_target_raises_the_caption_similarity(stubs, caption_mapping, suite_in_process):
    from latentedit.rpc.client import ScorerClient

    _, editor = stubs
    text = "a smiling young woman facing the camera, mouth open"
    target = ScorerClient(suite_in_process[2]["scorer"]).embed_text([text])[0]
    frames = _edit(editor, "sgf-caption", {"caption": editor_pb2.CaptionTarget(text=text)}, ["caption"], steps=10, tolerance=0.5)
    cosine = [float((_output(f, "caption", "embedding") @ target).mean()) for f in frames]
    assert max(cosine[1:]) > cosine[0] + 0.02, cosine


def _expect(editor, request, code, text):
    with pytest.raises(grpc.RpcError) as info:
        list(editor.Edit(request, timeout=120))
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details(), info.value.details()


def test_bad_sgf_targets(stubs, attribute_mapping):
    _, editor = stubs
    seed = editor_pb2.SeedStart(seed=0, count=2)
    attr = lambda ref, v=1.0: editor_pb2.AttributeTarget(values=[editor_pb2.AttributeValue(attribute=ref, value=v)])  # noqa: E731
    _expect(editor, editor_pb2.EditRequest(seed=seed, sgf=editor_pb2.SGFEdit(mapping="sgf-attributes", attributes=attr(
        types_pb2.AttributeRef(head="age_gender", output="age")))), grpc.StatusCode.NOT_FOUND, "not one the mapping was trained on")
    _expect(editor, editor_pb2.EditRequest(seed=seed, sgf=editor_pb2.SGFEdit(mapping="never-trained", attributes=attr(YAW))),
            grpc.StatusCode.FAILED_PRECONDITION, "no trained SGF mapping named 'never-trained'")
    _expect(editor, editor_pb2.EditRequest(seed=seed, sgf=editor_pb2.SGFEdit(mapping="sgf-attributes", caption=editor_pb2.CaptionTarget(text="x"))),
            grpc.StatusCode.FAILED_PRECONDITION, "trained on attributes conditions")
    _expect(editor, editor_pb2.EditRequest(seed=seed, sgf=editor_pb2.SGFEdit(mapping="sgf-attributes")),
            grpc.StatusCode.INVALID_ARGUMENT, "give attribute values, keypoints or a caption")


def test_bad_keypoint_and_caption_targets(stubs, keypoint_mapping, caption_mapping):
    _, editor = stubs
    seed = editor_pb2.SeedStart(seed=0, count=2)
    wrong = editor_pb2.KeypointTarget(points=wire.to_tensor(np.zeros((68, 2), np.float32)))
    _expect(editor, editor_pb2.EditRequest(seed=seed, sgf=editor_pb2.SGFEdit(mapping="sgf-keypoints", keypoints=wrong)),
            grpc.StatusCode.INVALID_ARGUMENT, "this mapping needs [5, 2]")
    _expect(editor, editor_pb2.EditRequest(seed=seed, sgf=editor_pb2.SGFEdit(mapping="sgf-caption", caption=editor_pb2.CaptionTarget(text="  "))),
            grpc.StatusCode.INVALID_ARGUMENT, "sgf.caption.text is empty")

"""SGF through the public API: mapping jobs and closed-loop edits toward attribute, keypoint and caption targets.

What the editor reports per frame (scores, `reached`) is checked against the test's own
measurement: the frames' latents re-synthesized and re-scored through the generator and scorer
stubs, and the trained mapping loaded from the repository.
"""

import grpc
import numpy as np
import pytest

from latentedit import wire
from latentedit.api.v1 import editor_pb2, editor_pb2_grpc, trainer_pb2, trainer_pb2_grpc, types_pb2

YAW = types_pb2.AttributeRef(head="pose", output="yaw")
MOUTH = types_pb2.AttributeRef(head="pose", output="mouth_openness")
HAPPY = types_pb2.AttributeRef(head="expression", output="probabilities", label="happy")


@pytest.fixture(scope="module")
def clients(suite_in_process):
    from latentedit.rpc.client import GeneratorClient, ScorerClient

    return GeneratorClient(suite_in_process[2]["generator"]), ScorerClient(suite_in_process[2]["scorer"])


def _rescore(clients, frame, heads):
    """The frame's latents drawn and scored here, not by the editor."""
    generator, scorer = clients
    return scorer.score(generator.synthesize(wire.from_tensor(frame.latents.values, field="latents")), heads)


def _mapping(suite_in_process, name):
    from latentedit.methods.sgf import load_mapping
    from latentedit.repository import ModelRepository

    return load_mapping(ModelRepository(suite_in_process[0].repository), name)


@pytest.fixture(scope="module")
def stubs(suite_in_process):
    channels = suite_in_process[2]
    return trainer_pb2_grpc.TrainerServiceStub(channels["trainer"]), editor_pb2_grpc.EditorServiceStub(channels["editor"])


def _train(trainer, name, condition, pairs=1000, **fields):
    # F = a z + R(z, c) (format 2) fits in a few hundred steps; format 1 needed 1500 here and still ended at 0.95.
    spec = trainer_pb2.MappingJobSpec(condition=condition, num_pairs=pairs, depth=6, hidden_dim=128,
                                      options=trainer_pb2.TrainingOptions(artifact_name=name, steps=400), **fields)
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


def test_every_layer_of_the_trained_mapping_is_a_contraction(attribute_mapping, suite_in_process, clients):
    import torch

    assert attribute_mapping.metrics["max_spectral_norm"] < 1.0 and attribute_mapping.metrics["lipschitz_bound"] < 1.0
    prepared = _mapping(suite_in_process, "sgf-attributes")
    mapping, condition = prepared.mapping, prepared.condition
    assert max(mapping.layer_spectral_norms()) < 1.0 and mapping.skip == 0.5 and mapping.lipschitz_bound() < 1.0
    assert condition.kind == "attributes" and [a.output for a in condition.attributes] == ["yaw", "mouth_openness", "probabilities"]

    # Measured here on fresh pairs (z, C(G(z))) drawn and scored through the stubs.
    generator, scorer = clients
    z = generator.sample(200, seed=424242)
    c = condition.standardise(condition.raw(scorer.score(generator.synthesize(z), condition.heads)))
    z_t, c_t = torch.from_numpy(z), torch.from_numpy(c)
    # F is a contraction in z as a whole, not only layer by layer: its Jacobian's spectral norm is below 1.
    for i in range(3):
        jacobian = torch.autograd.functional.jacobian(lambda zz: mapping(zz[None], c_t[i : i + 1])[0], z_t[i])
        assert torch.linalg.matrix_norm(jacobian, ord=2) < 1.0
    with torch.no_grad():
        error = float((mapping(z_t, c_t) - z_t).pow(2).sum(1).mean() / z_t.pow(2).sum(1).mean())
    # Relative squared error: predicting 0 (the prior's mean) scores 1. A contraction cannot pass z
    # through exactly; F = 0.5 z + R(z, c) gets near (1 - 0.5)^2 and below. Format 1 (F = R(z, c))
    # measured 0.95 held out and 0.96 here with 1500 steps; format 2 reaches ~0.25 in 400 (the shipped
    # default-sgf-attributes, same layout on 1080 pairs: 0.246 held out, defaults/recipe.json).
    reported = attribute_mapping.metrics["reconstruction_error"]
    assert error < 0.4 and reported < 0.4, (error, reported)
    assert abs(error - reported) < 0.05, (error, reported)  # the job's held-out figure holds on fresh samples


def test_attribute_target_is_reached_for_most_samples(stubs, attribute_mapping, clients, suite_in_process):
    _, editor = stubs
    target = {"attributes": editor_pb2.AttributeTarget(values=[editor_pb2.AttributeValue(attribute=YAW, value=25.0)])}
    frames = _edit(editor, "sgf-attributes", target, ["pose"])
    assert frames[-1].stop_reason in (editor_pb2.STOP_REASON_TARGET_REACHED, editor_pb2.STOP_REASON_STEP_LIMIT)
    assert all(f.stop_reason == editor_pb2.STOP_REASON_UNSPECIFIED for f in frames[:-1])  # one frame per step, streamed

    # The condition (yaw, mouth openness, happy) of the first and last latents, measured here and
    # standardised as the mapping was trained (the tolerance, 0.1, is in those units).
    condition = _mapping(suite_in_process, "sgf-attributes").condition
    first, last = (condition.standardise(condition.raw(_rescore(clients, f, condition.heads))) for f in (frames[0], frames[-1]))
    goal = condition.standardise(np.array([[25.0, 0.0, 0.0]], np.float32))[0, 0]
    reached = np.abs(last[:, 0] - goal) <= 0.1
    assert reached.mean() > 0.5, (np.abs(last[:, 0] - goal), frames[-1].metrics["reached"])  # most samples
    # The editor's own figure agrees, but for samples within float noise of the tolerance.
    at_edge = int((np.abs(np.abs(last[:, 0] - goal) - 0.1) < 1e-3).sum())
    assert abs(frames[-1].metrics["reached"] - reached.mean()) <= at_edge / len(reached), (frames[-1].metrics["reached"], reached)
    # The other attributes are held: each moves less than half as much as yaw does (standardised
    # units; measured: yaw 1.9, mouth openness 0.55, happy 0.39).
    target_change = np.abs(last[:, 0] - first[:, 0]).mean()
    held_change = np.abs(last[:, 1:] - first[:, 1:]).mean(axis=0)
    assert target_change > 0.5 and (held_change < 0.5 * target_change).all(), (target_change, held_change)


def test_keypoint_targets_from_other_samples_pull_the_points_closer(stubs, keypoint_mapping, clients):
    _, editor = stubs
    # Targets: the keypoints of other samples (seed 4), scored here.
    generator, scorer = clients
    target_points = scorer.score(generator.synthesize(generator.sample(8, seed=4)), ["keypoints5"])["keypoints5"]["points"]
    frames = _edit(editor, "sgf-keypoints", {"keypoints": editor_pb2.KeypointTarget(points=wire.to_tensor(target_points))},
                   ["keypoints5"], steps=15)
    distance = [np.linalg.norm(_rescore(clients, f, ["keypoints5"])["keypoints5"]["points"] - target_points, axis=-1).mean(axis=1)
                for f in (frames[0], frames[-1])]
    assert distance[1].mean() < distance[0].mean() * 0.8, distance  # measured: 6.9 -> 2.8 pixels


def test_caption_target_raises_the_caption_similarity(stubs, caption_mapping, clients):
    _, editor = stubs
    text = "a smiling young woman facing the camera, mouth open"
    target = clients[1].embed_text([text])[0]
    frames = _edit(editor, "sgf-caption", {"caption": editor_pb2.CaptionTarget(text=text)}, [], steps=10, tolerance=0.5)

    def similarity(frame):
        embedding = _rescore(clients, frame, ["caption"])["caption"]["embedding"]
        return embedding @ target / (np.linalg.norm(embedding, axis=1) * np.linalg.norm(target))

    first, last = similarity(frames[0]), similarity(frames[-1])
    # Most samples, clearly (measured: all 8, by 0.26 on average).
    assert (last > first).mean() >= 0.75 and (last - first).mean() > 0.1, (first, last)


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
            grpc.StatusCode.NOT_FOUND, "no trained SGF mapping named 'never-trained'")
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

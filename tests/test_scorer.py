"""ScorerService on the real default models, through real stubs."""

from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from latentedit import wire
from latentedit.api.v1 import scorer_pb2, scorer_pb2_grpc, types_pb2
from latentedit.rpc.serving import channel_options

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def stub(scorer_server):
    channel = grpc.insecure_channel(scorer_server[0], options=channel_options())
    yield scorer_pb2_grpc.ScorerServiceStub(channel)
    channel.close()


def score(stub, images, heads=(), encoding=types_pb2.IMAGE_ENCODING_RAW_UINT8):
    request = scorer_pb2.ScoreRequest(images=wire.encode_images(images, encoding), heads=list(heads))
    response = stub.Score(request, timeout=300)
    return {
        h.head: ({o.name: wire.from_tensor(o.tensor, field=o.name) for o in h.outputs}, list(h.captions))
        for h in response.heads
    }


def embed(stub, texts):
    return wire.from_tensor(stub.EmbedText(scorer_pb2.EmbedTextRequest(texts=texts), timeout=60).embeddings, field="e")


def test_health_and_schemas(stub, scorer_server):
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(scorer_server[0]))
    assert health.Check(health_pb2.HealthCheckRequest(service="latentedit.v1.ScorerService"), timeout=5).status == 1
    listed = stub.ListHeads(scorer_pb2.ListHeadsRequest(), timeout=10)
    heads = {h.name: h for h in listed.heads}
    assert set(heads) >= {"pose", "expression", "age_gender", "quality", "keypoints5", "keypoints68", "identity", "caption"}
    assert listed.text_embedding_dim == 384
    assert [o.name for o in heads["pose"].outputs] == ["yaw", "pitch", "roll", "mouth_width", "mouth_openness"]
    assert list(heads["expression"].outputs[0].labels) == ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    assert heads["expression"].differentiable and heads["expression"].kind == scorer_pb2.HEAD_KIND_ATTRIBUTE
    assert list(heads["keypoints68"].outputs[0].shape) == [68, 2]


def test_every_head_on_256_faces_has_declared_shapes_and_finite_values(stub, face_latents_and_images):
    _, images, _ = face_latents_and_images
    schemas = {h.name: h for h in stub.ListHeads(scorer_pb2.ListHeadsRequest(), timeout=10).heads}
    results = score(stub, images)
    assert set(results) == set(schemas)
    for name, (outputs, _captions) in results.items():
        for spec in schemas[name].outputs:
            value = outputs[spec.name]
            assert value.shape == (256, *spec.shape), (name, spec.name, value.shape)
            assert np.isfinite(value).all(), (name, spec.name)
            if spec.min != spec.max:
                assert value.min() >= spec.min - 1e-4 and value.max() <= spec.max + 1e-4, (name, spec.name)
    assert len(results["caption"][1]) == 256 and all(c.startswith("a") for c in results["caption"][1])
    quality = results["quality"][0]["face_probability"]
    assert (quality > 0.9).mean() > 0.85  # most DCGAN samples are clean faces


def test_mirroring_negates_yaw_and_mirrors_keypoints(stub, face_latents_and_images):
    _, images, _ = face_latents_and_images
    images = images[:96]
    mirrored = np.ascontiguousarray(images[:, :, ::-1])
    a = score(stub, images, ["pose", "keypoints5", "keypoints68"])
    b = score(stub, mirrored, ["pose", "keypoints5", "keypoints68"])
    assert np.corrcoef(a["pose"][0]["yaw"], b["pose"][0]["yaw"])[0, 1] < -0.9
    width = images.shape[2]
    # 5 points: left/right eyes and mouth corners swap places, the nose stays.
    detected = (a["keypoints5"][0]["detected"] > 0) & (b["keypoints5"][0]["detected"] > 0)
    p, q = a["keypoints5"][0]["points"][detected], b["keypoints5"][0]["points"][detected]
    reflected = p[:, [1, 0, 2, 4, 3]] * [-1, 1] + [width, 0]
    assert np.median(np.abs(reflected - q)) < 1.5
    # 68 points: every mirrored point lies near some reflected original point.
    p, q = a["keypoints68"][0]["points"], b["keypoints68"][0]["points"]
    reflected = p * [-1, 1] + [width, 0]
    nearest = np.linalg.norm(q[:, :, None, :] - reflected[:, None, :, :], axis=-1).min(axis=2)
    assert np.median(nearest) < 1.5


def test_identity_distance_is_zero_to_itself_and_grows_with_perturbation(stub, face_latents_and_images):
    z, _, generator = face_latents_and_images
    rng = np.random.default_rng(0)
    base = z[:24]
    noise = rng.standard_normal(base.shape).astype(np.float32)
    distances = []
    reference = None
    for strength in (0.0, 0.3, 0.6, 1.2):
        with torch.no_grad():
            images = wire.float_to_uint8_images(generator(torch.from_numpy(base + strength * noise)).numpy())
        embedding = score(stub, images, ["identity"])["identity"][0]["embedding"]
        if reference is None:
            reference = embedding
        distances.append(float(np.linalg.norm(embedding - reference, axis=1).mean()))
    assert distances[0] == 0.0
    assert distances[1] < distances[2] < distances[3], distances


def test_smiling_captions_are_closer_to_a_smiling_face(stub, face_latents_and_images):
    _, images, _ = face_latents_and_images
    results = score(stub, images, ["caption", "expression"])
    happy = results["expression"][0]["probabilities"][:, 3]
    captions = results["caption"][0]["embedding"]
    target = embed(stub, ["a smiling face"])[0]
    smiling, neutral = happy > 0.5, happy < 0.1
    assert smiling.sum() >= 5 and neutral.sum() >= 5
    assert (captions[smiling] @ target).mean() > (captions[neutral] @ target).mean() + 0.05


def test_embed_text_gives_unit_vectors_that_rank_meaning(stub):
    vectors = embed(stub, ["a smiling woman", "a woman who smiles", "a red sports car"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2


def test_expression_port_matches_the_original_keras_network(installed_repo):
    from latentedit.scoring.heads import _load_fer

    reference = np.load(FIXTURES / "fer_reference.npz")
    net = _load_fer(installed_repo.resolve("fer-emotion"))
    x = (reference["inputs"].astype(np.float32) / 255.0 - 0.5) * 2.0
    with torch.no_grad():
        ours = net(torch.from_numpy(x[:, None])).numpy()
    np.testing.assert_allclose(ours, reference["probabilities"], atol=1e-5)


def test_expression_head_is_differentiable(installed_repo):
    from latentedit.models.expression import rgb_to_model_input
    from latentedit.scoring.heads import _load_fer

    net = _load_fer(installed_repo.resolve("fer-emotion"))
    images = torch.full((2, 3, 64, 64), 128.0, requires_grad=True)
    net(rgb_to_model_input(images))[:, 3].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_png_and_other_sizes_are_accepted(stub, face_latents_and_images):
    _, images, _ = face_latents_and_images
    raw = score(stub, images[:4], ["expression"])["expression"][0]["probabilities"]
    png = score(stub, images[:4], ["expression"], types_pb2.IMAGE_ENCODING_PNG)["expression"][0]["probabilities"]
    np.testing.assert_allclose(raw, png, atol=1e-6)
    big = np.repeat(np.repeat(images[:4], 2, axis=1), 2, axis=2)  # 128 px: resized for each head
    points = score(stub, big, ["keypoints68"])["keypoints68"][0]["points"]
    small = score(stub, images[:4], ["keypoints68"])["keypoints68"][0]["points"]
    assert np.median(np.abs(points / 2 - small)) < 1.0  # reported in the caller's pixels


# ---- bad input -----------------------------------------------------------------------------------


def _expect(stub, call, request, code, text):
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, call)(request, timeout=30)
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details(), info.value.details()
    # the service still answers
    good = np.full((1, 64, 64, 3), 120, np.uint8)
    assert score(stub, good, ["expression"])["expression"][0]["probabilities"].shape == (1, 7)


def test_bad_images(stub):
    raw = lambda a: scorer_pb2.ScoreRequest(images=wire.encode_images(a, types_pb2.IMAGE_ENCODING_RAW_UINT8))  # noqa: E731
    INVALID = grpc.StatusCode.INVALID_ARGUMENT
    _expect(stub, "Score", raw(np.zeros((2, 64, 64, 4), np.uint8)), INVALID, "4 channels, expected 3")
    _expect(stub, "Score", raw(np.zeros((2, 16, 16, 3), np.uint8)), INVALID, "outside 32..1024 px")
    _expect(stub, "Score", raw(np.zeros((0, 64, 64, 3), np.uint8)), INVALID, "the batch is empty")
    grey_png = wire.encode_png(np.zeros((64, 64, 1), np.uint8))
    _expect(stub, "Score", scorer_pb2.ScoreRequest(images=types_pb2.ImageBatch(encoding=2, png=[grey_png])), INVALID, "expected 3")
    corrupt = types_pb2.ImageBatch(encoding=2, png=[b"\x89PNG\r\n\x1a\ngarbage"])
    _expect(stub, "Score", scorer_pb2.ScoreRequest(images=corrupt), INVALID, "corrupt or unreadable PNG")
    _expect(stub, "Score", scorer_pb2.ScoreRequest(images=types_pb2.ImageBatch(encoding=2)), INVALID, "no images given")
    request = raw(np.zeros((1, 64, 64, 3), np.uint8))
    request.heads.append("beauty")
    _expect(stub, "Score", request, grpc.StatusCode.NOT_FOUND, "unknown head(s) ['beauty']")


def test_bad_texts(stub):
    INVALID = grpc.StatusCode.INVALID_ARGUMENT
    _expect(stub, "EmbedText", scorer_pb2.EmbedTextRequest(texts=[]), INVALID, "texts: empty")
    _expect(stub, "EmbedText", scorer_pb2.EmbedTextRequest(texts=["ok", "  "]), INVALID, "texts[1]: empty text")
    _expect(stub, "EmbedText", scorer_pb2.EmbedTextRequest(texts=["word " * 300]), INVALID, "tokens, more than")
    _expect(stub, "EmbedText", scorer_pb2.EmbedTextRequest(texts=["x" * 3000]), INVALID, "characters, more than")
    _expect(stub, "EmbedText", scorer_pb2.EmbedTextRequest(texts=["a"] * 300), grpc.StatusCode.RESOURCE_EXHAUSTED, "limit")

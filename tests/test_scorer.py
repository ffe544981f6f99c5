"""ScorerService on the real default models, through real stubs."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from latentedit import wire
from latentedit.api.v1 import scorer_pb2, scorer_pb2_grpc, types_pb2
from latentedit.rpc.serving import ServiceHost, channel_options
from tests.conftest import make_config

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


# Absolute identity-distance limits, from dlib descriptors of these 64 px DCGAN faces (fixture
# seed 7, faces 0..31, noise seed 0), measured once: z + 0.05 N(0, I) moved a face by at most
# 0.31 (median 0.12), z + 1.5 N(0, I) by 0.48..0.79, and faces 128..159 lay 0.55..0.84 from
# faces 0..31 (median 0.68). dlib's documented same-person threshold is 0.6.
SMALL_EDIT_MAX_DISTANCE = 0.35
UNRELATED_MIN_DISTANCE = 0.45
SAME_PERSON_THRESHOLD = 0.6


def test_identity_distance_is_small_for_small_edits_and_large_for_other_faces(stub, face_latents_and_images):
    z, images, generator = face_latents_and_images
    base, faces = z[:32], images[:32]
    noise = np.random.default_rng(0).standard_normal(base.shape).astype(np.float32)
    with torch.no_grad():
        small_edit, large_edit = (
            wire.float_to_uint8_images(generator(torch.from_numpy(base + strength * noise)).numpy()) for strength in (0.05, 1.5)
        )
    unrelated = images[128:160]
    raw = score(stub, np.concatenate([faces, small_edit, large_edit, unrelated]), ["identity"])["identity"][0]["embedding"]
    png = score(stub, faces, ["identity"], types_pb2.IMAGE_ENCODING_PNG)["identity"][0]["embedding"]
    original, small, large, other = np.split(raw, 4)

    def distance(a):
        return np.linalg.norm(a - original, axis=1)

    # PNG is lossless: the same pixels sent either way must give the same identity.
    assert distance(png).max() < 1e-4, distance(png)
    assert distance(small).max() < SMALL_EDIT_MAX_DISTANCE, distance(small)
    assert distance(other).min() > UNRELATED_MIN_DISTANCE, distance(other)
    assert np.median(distance(other)) > SAME_PERSON_THRESHOLD, distance(other)
    assert (distance(small) < distance(large)).all(), (distance(small), distance(large))


def test_identity_head_is_dlibs_descriptor(stub, installed_repo, face_latents_and_images):
    """The served (torch, batched) identity head gives dlib's own descriptors for the landmarks it uses."""
    import dlib

    from latentedit.scoring.base import FACE_BOX, FACE_SIZE, Batch

    # 80 faces: the head runs its network 64 rows at a time; the 16 checked straddle the chunks.
    images = face_latents_and_images[1][:80]
    results = score(stub, images, ["identity", "keypoints68"])
    checked = slice(56, 72)
    images = images[checked]
    served = results["identity"][0]["embedding"][checked]
    points = results["keypoints68"][0]["points"][checked] * FACE_SIZE / images.shape[1]
    recognizer = dlib.face_recognition_model_v1(str(installed_repo.resolve("dlib-face-descriptor").file("weights")))
    rect = dlib.rectangle(*FACE_BOX)
    reference = np.array([
        np.array(recognizer.compute_face_descriptor(
            np.ascontiguousarray(face), dlib.full_object_detection(rect, [dlib.point(int(round(x)), int(round(y))) for x, y in p])))
        for face, p in zip(Batch(images).resized(FACE_SIZE), points)
    ])
    cosine = (served * reference).sum(1) / np.linalg.norm(served, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() > 0.999, cosine
    assert np.linalg.norm(served - reference, axis=1).max() < 0.02


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


def _shift_face_centre(images, amount):
    """Move the face's centre sideways by `amount` (a fraction of the half-width; > 0: toward the
    image's right) while the image borders stay put. This is what a head turn toward that side
    does to a frontal face: the nose, furthest forward, moves most; the far half is foreshortened."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    n, _, h, w = pixels.shape
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    source_x = xs - amount * torch.cos(torch.pi * xs / 2)
    grid = torch.stack([source_x, ys], dim=-1)[None].expand(n, h, w, 2)
    warped = torch.nn.functional.grid_sample(pixels, grid, mode="bilinear", align_corners=True, padding_mode="border")
    return warped.round().clamp(0, 255).byte().permute(0, 2, 3, 1).contiguous().numpy()


def test_positive_yaw_means_the_face_turns_toward_the_image_right(stub, face_latents_and_images):
    """The README's convention, checked against two measures that do not use the pose fit."""
    _, images, _ = face_latents_and_images
    images = images[:128]
    results = score(stub, images, ["pose", "keypoints5"])
    yaw = results["pose"][0]["yaw"]
    # 1. MTCNN's nose tip (a different network from the pose head's dlib landmarks) lies right of
    # the eyes' midpoint exactly when the face points toward the image's right: the nose sticks
    # out furthest. Measured: 26 faces right, 33 left of 0.15 eye distances; 88% and 100% agree.
    points = results["keypoints5"][0]["points"]
    eyes_middle = (points[:, 0, 0] + points[:, 1, 0]) / 2
    nose_offset = (points[:, 2, 0] - eyes_middle) / np.linalg.norm(points[:, 1] - points[:, 0], axis=1)
    nose_right, nose_left = nose_offset > 0.15, nose_offset < -0.15
    assert nose_right.sum() >= 10 and nose_left.sum() >= 10, (nose_right.sum(), nose_left.sum())
    assert (yaw[nose_right] > 0).mean() >= 0.75, yaw[nose_right]
    assert (yaw[nose_left] < 0).mean() >= 0.75, yaw[nose_left]
    # 2. Frontal faces turned by a known warp. Measured: median yaw change +6.3 / -7.4 degrees for
    # a 0.15 shift right / left (single faces are noisy at 64 px, hence medians).
    frontal = images[np.argsort(np.abs(yaw))[:24]]
    turned = score(stub, np.concatenate([frontal, _shift_face_centre(frontal, 0.15), _shift_face_centre(frontal, -0.15)]), ["pose"])
    before, right, left = np.split(turned["pose"][0]["yaw"], 3)
    assert np.median(right - before) > 3.0, right - before
    assert np.median(left - before) < -3.0, left - before


def _documented_resize(images, width, height):
    """The README's resize (bilinear, antialiased, stretched; uint8), written out independently."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    pixels = torch.nn.functional.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return pixels.round().clamp(0, 255).byte().permute(0, 2, 3, 1).contiguous().numpy()


SQUARE_HEADS = {"pose": 160, "keypoints68": 160, "keypoints5": 160, "quality": 160, "identity": 160, "age_gender": 160, "expression": 64}


@pytest.mark.parametrize("width, height", [(80, 64), (64, 96)])
def test_non_square_images_score_like_their_documented_resize(stub, face_latents_and_images, width, height):
    _, images, _ = face_latents_and_images
    faces = _documented_resize(images[:12], width, height)  # any non-square faces will do
    got = score(stub, faces, list(SQUARE_HEADS))
    for head, size in SQUARE_HEADS.items():
        expected = score(stub, _documented_resize(faces, size, size), [head])[head][0]
        for name, value in got[head][0].items():
            want = expected[name]
            if name == "points":  # measured on the square copy, reported in the caller's pixels
                want = want * np.array([width / size, height / size], np.float32)
            np.testing.assert_allclose(value, want, atol=1e-3, err_msg=f"{head}.{name} at {width}x{height}")


def _serve_scorer(scorer, repo, **settings):
    """Another ScorerService over the already loaded `scorer`, with its own settings."""
    from scorer_svc.server import SERVICE_NAME
    from scorer_svc.service import ScorerServicer

    config = make_config(repo)
    for key, value in settings.items():
        setattr(config.scorer, key, value)
    host = ServiceHost(config.services["scorer"])
    servicer = ScorerServicer(scorer, config.scorer)
    host.add(scorer_pb2_grpc.add_ScorerServiceServicer_to_server, servicer, SERVICE_NAME)
    host.on_shutdown(servicer.close)
    host.start()
    host.set_serving(True)
    channel = grpc.insecure_channel(f"localhost:{host.port}", options=channel_options())
    return host, channel, scorer_pb2_grpc.ScorerServiceStub(channel), servicer


def test_concurrent_score_calls_from_several_callers_share_one_batch(scorer_server, installed_repo, face_latents_and_images):
    _, images, _ = face_latents_and_images
    callers, rows_each = 4, 3
    # The batch runs when it holds every caller's rows: the long queue delay only bounds the wait,
    # so sharing does not depend on the callers arriving within some short window.
    host, channel, tuned, servicer = _serve_scorer(
        scorer_server[1], installed_repo, max_batch_size=callers * rows_each, max_queue_delay_ms=120_000
    )
    try:
        own_images = [images[i * rows_each : (i + 1) * rows_each] for i in range(callers)]
        before = servicer.batcher_stats()
        with ThreadPoolExecutor(callers) as pool:
            answers = list(pool.map(lambda rows: score(tuned, rows, ["expression"]), own_images))
        after = servicer.batcher_stats()
    finally:
        channel.close()
        host.stop(0)
    assert after.batches - before.batches == 1, (before, after)
    assert after.rows - before.rows == callers * rows_each, (before, after)
    for rows, answer in zip(own_images, answers):  # and each caller got its own rows back
        alone = scorer_server[1].score(rows, ["expression"])["expression"].outputs["probabilities"]
        np.testing.assert_allclose(answer["expression"][0]["probabilities"], alone, atol=1e-5)


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


@pytest.mark.parametrize("encoding", [types_pb2.IMAGE_ENCODING_RAW_UINT8, types_pb2.IMAGE_ENCODING_PNG])
def test_a_batch_over_the_limit_is_refused_naming_the_limit(scorer_server, installed_repo, encoding):
    host, channel, tuned, _ = _serve_scorer(scorer_server[1], installed_repo, max_request_batch=8)
    try:
        faces = np.full((9, 64, 64, 3), 120, np.uint8)
        over = scorer_pb2.ScoreRequest(images=wire.encode_images(faces, encoding), heads=["expression"])
        _expect(tuned, "Score", over, grpc.StatusCode.RESOURCE_EXHAUSTED, "batch of 9 is larger than the limit 8")
        assert score(tuned, faces[:8], ["expression"], encoding)["expression"][0]["probabilities"].shape == (8, 7)
    finally:
        channel.close()
        host.stop(0)


def test_the_default_request_limit_is_enforced(stub):
    faces = np.zeros((1025, 32, 32, 3), np.uint8)  # the default max_request_batch is 1024
    request = scorer_pb2.ScoreRequest(images=wire.encode_images(faces, types_pb2.IMAGE_ENCODING_RAW_UINT8))
    _expect(stub, "Score", request, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than the limit 1024")


def test_bad_texts(stub):
    INVALID = grpc.StatusCode.INVALID_ARGUMENT
    _expect(stub, "EmbedText", scorer_pb2.EmbedTextRequest(texts=[]), INVALID, "texts: empty")
    _expect(stub, "EmbedText", scorer_pb2.EmbedTextRequest(texts=["ok", "  "]), INVALID, "texts[1]: empty text")
    _expect(stub, "EmbedText", scorer_pb2.EmbedTextRequest(texts=["word " * 300]), INVALID, "tokens, more than")
    _expect(stub, "EmbedText", scorer_pb2.EmbedTextRequest(texts=["x" * 3000]), INVALID, "characters, more than")
    _expect(stub, "EmbedText", scorer_pb2.EmbedTextRequest(texts=["a"] * 300), grpc.StatusCode.RESOURCE_EXHAUSTED, "limit")


# ---- bounded memory: the (heads, image size) batchers are an LRU ------------------------------


def _score_threads() -> set:
    import threading

    return {t for t in threading.enumerate() if t.name.startswith("score-")}


def test_many_image_sizes_keep_the_batchers_and_their_threads_bounded(scorer_server, installed_repo):
    host, channel, tuned, servicer = _serve_scorer(scorer_server[1], installed_repo, max_batchers=4)
    before = _score_threads()
    try:
        sizes = [(32 + i % 15, 32 + i // 15) for i in range(150)]  # 150 distinct image sizes
        for height, width in sizes:
            image = np.full((1, height, width, 3), 120, np.uint8)
            assert score(tuned, image, ["expression"])["expression"][0]["probabilities"].shape == (1, 7)
            assert servicer.batcher_count() <= 4
        new_threads = _score_threads() - before
        stats = servicer.batcher_stats()
    finally:
        channel.close()
        host.stop(0)
    assert len(new_threads) <= 4, f"{len(new_threads)} batcher threads alive after 150 image sizes (bound 4)"
    assert stats.rows == 150 and stats.batches == 150, stats  # unloaded batchers' work is still counted


class HeldScorer:
    """The real scorer behind a gate: each scoring batch waits until the test releases it."""

    def __init__(self, inner) -> None:
        import threading

        self.inner = inner
        self.released = threading.Event()
        self._changed = threading.Condition()
        self.batches = 0  # batches that have reached the gate

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score(self, images, names=()):
        with self._changed:
            self.batches += 1
            self._changed.notify_all()
        if not self.released.wait(60):  # reaches the callers as an error, never hangs the worker
            raise TimeoutError("the test never released the scorer")
        return self.inner.score(images, names)

    def wait_for_batches(self, count: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self.batches >= count, 30), f"{count} batches never reached the scorer"


def test_unloading_a_batcher_answers_the_calls_it_holds(scorer_server, installed_repo, face_latents_and_images):
    """max_batchers=1: a call of another image size unloads the batcher that is computing one
    call and holds another queued; both are still answered, with their own rows."""
    from tests.test_generator_service import wait_until

    _, faces, _ = face_latents_and_images
    real = scorer_server[1]
    held = HeldScorer(real)
    host, channel, tuned, servicer = _serve_scorer(held, installed_repo, max_batchers=1)
    small = np.ascontiguousarray(faces[:2, 8:56, 8:56])  # another image size: another batcher
    try:
        with ThreadPoolExecutor(3) as pool:
            running = pool.submit(score, tuned, faces[:1], ["expression"])
            held.wait_for_batches(1)
            queued = pool.submit(score, tuned, faces[1:3], ["expression"])
            wait_until(lambda: servicer.queued_rows() == 2, lambda: f"2 rows should be queued; {servicer.queued_rows()} are")
            evicting = pool.submit(score, tuned, small, ["expression"])  # unloads the 64x64 batcher
            held.wait_for_batches(2)  # the new batcher's batch reached the scorer
            assert servicer.batcher_count() == 1 and servicer.queued_rows() == 0
            held.released.set()
            answers = [f.result(60)["expression"][0]["probabilities"] for f in (running, queued, evicting)]
    finally:
        held.released.set()
        channel.close()
        host.stop(0)
    for images, answer in zip((faces[:1], faces[1:3], small), answers):
        alone = real.score(images, ["expression"])["expression"].outputs["probabilities"]
        np.testing.assert_allclose(answer, alone, atol=1e-5)

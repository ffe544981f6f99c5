"""A user-supplied ONNX head dropped into the repository is served like the built-in ones."""

import grpc
import numpy as np
import pytest
import torch

from latentedit import wire
from latentedit.api.v1 import scorer_pb2, scorer_pb2_grpc, types_pb2
from latentedit.rpc.serving import channel_options
from tests.conftest import make_config

# Long enough for a loaded 2-core machine; the poller looks every 0.5 s.
HEAD_LOAD_TIMEOUT_S = 60.0


class _Brightness(torch.nn.Module):
    """A known answer: mean brightness (a regressor) and a two-class red-vs-blue classifier."""

    def forward(self, x):
        brightness = x.mean(dim=(1, 2, 3))
        red_minus_blue = (x[:, 0] - x[:, 2]).mean(dim=(1, 2))
        logits = torch.stack([red_minus_blue, -red_minus_blue], dim=1) * 10
        return brightness, torch.softmax(logits, dim=1)


class _FaceFeatures(torch.nn.Module):
    """NHWC in, 4 smooth features out: a seeded conv net that tells channels and positions apart,
    so a wrong layout, channel order, mean or std changes its answer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=4, stride=2, padding=1)
        self.linear = torch.nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        h = torch.tanh(self.conv(x.permute(0, 3, 1, 2)))
        h = torch.nn.functional.adaptive_avg_pool2d(h, 4).flatten(1)
        return torch.tanh(self.linear(h))


FACE_SIZE = 64
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _export(module, example, path, outputs):
    torch.onnx.export(
        module, (example,), str(path), input_names=["pixels"], output_names=outputs,
        dynamic_axes={"pixels": {0: "n"}, **{name: {0: "n"} for name in outputs}}, dynamo=False,
    )


@pytest.fixture
def scorer_service(fresh_repo):
    """A scorer service on a private repository that tests drop heads into: (stub, scorer)."""
    from scorer_svc.server import build

    config = make_config(fresh_repo)
    config.scorer.poll_interval_s = 0.5
    host, scorer = build(config)
    channel = grpc.insecure_channel(f"localhost:{host.port}", options=channel_options())
    yield scorer_pb2_grpc.ScorerServiceStub(channel), scorer
    channel.close()
    host.stop(0)


def _listed_heads(stub):
    return {h.name: h for h in stub.ListHeads(scorer_pb2.ListHeadsRequest(), timeout=10).heads}


def test_dropped_in_onnx_head_is_listed_and_scores(scorer_service, fresh_repo):
    stub, scorer = scorer_service
    manifest = {
        "kind": "head", "implementation": "onnx", "head_kind": "attribute", "input_size": 32,
        "files": {"model": "model.onnx"}, "layout": "NCHW",
        "normalization": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        "description": "test head: brightness and red-vs-blue",
        "outputs": [
            {"name": "brightness", "shape": [], "min": 0, "max": 1},
            {"name": "colour", "shape": [2], "min": 0, "max": 1, "labels": ["red", "blue"]},
        ],
    }
    fresh_repo.write("brightness", manifest, lambda folder: _export(
        _Brightness(), torch.zeros(2, 3, 32, 32), folder / "model.onnx", ["brightness", "colour"]))
    # The service's poller loads it without a restart; the scorer signals each load.
    assert scorer.wait_for_head("brightness", timeout_s=HEAD_LOAD_TIMEOUT_S), f"not loaded within {HEAD_LOAD_TIMEOUT_S} s"
    heads = _listed_heads(stub)
    assert list(heads["brightness"].outputs[1].labels) == ["red", "blue"]

    images = np.zeros((3, 64, 64, 3), np.uint8)
    images[0, ..., 0] = 255  # red
    images[1, ..., 2] = 255  # blue
    images[2] = 51  # grey, brightness 0.2
    response = stub.Score(scorer_pb2.ScoreRequest(images=wire.encode_images(images, types_pb2.IMAGE_ENCODING_PNG),
                                                  heads=["brightness", "quality"]), timeout=60)
    outputs = {o.name: wire.from_tensor(o.tensor, field=o.name) for o in response.heads[0].outputs}
    np.testing.assert_allclose(outputs["brightness"], [1 / 3, 1 / 3, 0.2], atol=1e-3)
    assert outputs["colour"][0, 0] > 0.99 and outputs["colour"][1, 1] > 0.99
    assert response.heads[1].head == "quality"


def _served_features(stub, images):
    request = scorer_pb2.ScoreRequest(images=wire.encode_images(images, types_pb2.IMAGE_ENCODING_RAW_UINT8), heads=["face-features"])
    (head,) = stub.Score(request, timeout=120).heads
    return wire.from_tensor(head.outputs[0].tensor, field="features")


def _normalised(images):
    """The README's recipe written out by hand: pixels to [0, 1], then (x - mean) / std, NHWC."""
    return torch.from_numpy((images.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD)


def test_onnx_head_with_mean_std_and_nhwc_matches_its_torch_module_on_faces(scorer_service, fresh_repo, face_latents_and_images):
    stub, scorer = scorer_service
    _, images, _ = face_latents_and_images
    module = _FaceFeatures().eval()
    manifest = {
        "kind": "head", "implementation": "onnx", "head_kind": "attribute", "input_size": FACE_SIZE,
        "files": {"model": "model.onnx"}, "layout": "NHWC",
        "normalization": {"mean": IMAGENET_MEAN.tolist(), "std": IMAGENET_STD.tolist()},
        "differentiable": True,  # claimed, but ONNX Runtime passes no gradients
        "outputs": [{"name": "features", "shape": [4], "min": -1, "max": 1}],
    }
    fresh_repo.write("face-features", manifest, lambda folder: _export(
        module, torch.zeros(2, FACE_SIZE, FACE_SIZE, 3), folder / "model.onnx", ["features"]))
    assert scorer.wait_for_head("face-features", timeout_s=HEAD_LOAD_TIMEOUT_S), f"not loaded within {HEAD_LOAD_TIMEOUT_S} s"
    assert not _listed_heads(stub)["face-features"].differentiable

    faces = images[:32]
    served = _served_features(stub, faces)
    with torch.no_grad():
        expected = module(_normalised(faces)).numpy()
        # What the usual mistakes would give, to show the comparison tells them apart.
        unnormalised = module(torch.from_numpy(faces.astype(np.float32) / 255.0)).numpy()
        bgr = module(_normalised(faces[..., ::-1].copy())).numpy()
    tolerance = 1e-4
    assert min(np.abs(expected - unnormalised).max(), np.abs(expected - bgr).max()) > 100 * tolerance
    np.testing.assert_allclose(served, expected, atol=tolerance)

    # The served head is the module's function of the pixels, not only at these faces: its
    # central difference along a pixel direction matches the module's autograd derivative
    # (the chain through the normalisation: d x / d pixel = 1 / (255 std)).
    base = np.clip(faces[:8], 8, 247)
    pixels = _normalised(base).requires_grad_(True)
    module(pixels).sum().backward()
    direction = 2 * np.sign(pixels.grad.numpy()).astype(np.int64)  # 2 levels, the way the features respond
    plus, minus = (base + direction).astype(np.uint8), (base - direction).astype(np.uint8)
    finite_difference = (_served_features(stub, plus) - _served_features(stub, minus)) / 2
    tangent = torch.from_numpy(direction.astype(np.float32) / 255.0 / IMAGENET_STD)
    derivative = torch.autograd.functional.jvp(module, _normalised(base), tangent)[1].numpy()
    assert np.abs(derivative).max() > 0.05, derivative  # the features do respond along it
    np.testing.assert_allclose(finite_difference, derivative, atol=0.05 * np.abs(derivative).max())


@pytest.mark.parametrize("layout, colour_shape, reason", [
    ("NCWH", [2], "layout 'NCWH' is not one of NCHW, NHWC"),
    # the graph takes [N, 3, 32, 32]: NHWC would feed [N, 32, 32, 3] and fail on every request
    ("NHWC", [2], "has shape ['n', 3, 32, 32], but input_size 32 and layout NHWC feed [N, 32, 32, 3]"),
    # loads, but its first (warm-up) batch finds the graph's output unlike the manifest's
    ("NCHW", [3], "warm-up failed: head misfit: output colour has shape [2, 2], the manifest declares [2, 3]"),
])
def test_a_misfit_onnx_head_is_not_served_and_the_others_keep_serving(scorer_service, fresh_repo, layout, colour_shape, reason):
    stub, scorer = scorer_service
    manifest = {
        "kind": "head", "implementation": "onnx", "head_kind": "attribute", "input_size": 32,
        "files": {"model": "model.onnx"}, "layout": layout,
        "outputs": [{"name": "brightness", "shape": []}, {"name": "colour", "shape": colour_shape}],
    }
    fresh_repo.write("misfit", manifest, lambda folder: _export(
        _Brightness(), torch.zeros(2, 3, 32, 32), folder / "model.onnx", ["brightness", "colour"]))
    # The poller's verdict (a warm-up failure unloads a head that had loaded).
    assert scorer.wait_for_failure("misfit", timeout_s=HEAD_LOAD_TIMEOUT_S), f"no verdict within {HEAD_LOAD_TIMEOUT_S} s"
    assert reason in scorer.load_failure("misfit")
    assert "misfit" not in _listed_heads(stub)
    grey = wire.encode_images(np.full((1, 64, 64, 3), 90, np.uint8), types_pb2.IMAGE_ENCODING_RAW_UINT8)
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(scorer_pb2.ScoreRequest(images=grey, heads=["misfit"]), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
    assert stub.Score(scorer_pb2.ScoreRequest(images=grey, heads=["quality"]), timeout=30).heads[0].head == "quality"

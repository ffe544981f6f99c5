"""A user-supplied ONNX head dropped into the repository is served like the built-in ones."""

import time

import grpc
import numpy as np
import torch

from latentedit import wire
from latentedit.api.v1 import scorer_pb2, scorer_pb2_grpc, types_pb2
from tests.conftest import make_config


class _Brightness(torch.nn.Module):
    """A known answer: mean brightness (a regressor) and a two-class red-vs-blue classifier."""

    def forward(self, x):
        brightness = x.mean(dim=(1, 2, 3))
        red_minus_blue = (x[:, 0] - x[:, 2]).mean(dim=(1, 2))
        logits = torch.stack([red_minus_blue, -red_minus_blue], dim=1) * 10
        return brightness, torch.softmax(logits, dim=1)


def _export(path):
    torch.onnx.export(
        _Brightness(), (torch.zeros(2, 3, 32, 32),), str(path), input_names=["pixels"],
        output_names=["brightness", "colour"], dynamic_axes={"pixels": {0: "n"}, "brightness": {0: "n"}, "colour": {0: "n"}},
        dynamo=False,
    )


def test_dropped_in_onnx_head_is_listed_and_scores(fresh_repo):
    from scorer_svc.server import build

    config = make_config(fresh_repo)
    config.scorer.poll_interval_s = 0.5
    host, _ = build(config)
    try:
        stub = scorer_pb2_grpc.ScorerServiceStub(grpc.insecure_channel(f"localhost:{host.port}"))
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
        fresh_repo.write("brightness", manifest, lambda folder: _export(folder / "model.onnx"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            heads = {h.name: h for h in stub.ListHeads(scorer_pb2.ListHeadsRequest(), timeout=10).heads}
            if "brightness" in heads:
                break
            time.sleep(0.2)
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
    finally:
        host.stop(0)

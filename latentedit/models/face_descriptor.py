"""dlib's ResNet face descriptor (dlib_face_recognition_resnet_model_v1) ported to torch.

Why: dlib's descriptor runs image by image on the CPU (about 16 img/s here) and passes no
gradients, so it can neither score large batches quickly nor serve as the differentiable
identity network of W*'s L_ID. This module reads the weights from dlib's own serialized
`.dat` file with a parser for dlib's DNN serialization format (written from the format's
description in dlib's public source: `dlib/serialize.h`, `dlib/float_details.h`,
`dlib/dnn/core.h`, `layers.h`, `loss.h`, `input.h`, `dlib/cuda/tensor.h`), converts them
once and caches them as safetensors in the model repository (see `load_network`).

The network (dlib's `anet_type` in `dnn_face_recognition_ex.cpp`) is a 29-convolution ResNet:
con 7x7/2 (32) -> affine -> relu -> max_pool 3x3/2 -> 3 residual blocks of 32 -> residual_down
+ 3 of 64 -> residual_down + 2 of 128 -> residual_down + 2 of 256 -> residual_down 256 ->
global average -> fc 128 without bias. `affine` is dlib's inference-time batch norm
(per-channel scale and shift). dlib's conventions that a naive port gets wrong:
 * a strided convolution or pooling has no padding (dlib pads k//2 only when the stride is 1);
 * `add_prev` adds tensors of different shapes by zero-padding both to the larger one
   (channels, rows and columns, anchored at the top-left): it happens twice here, when a
   residual_down doubles the channels and at 8x8 -> 3x3 (convolution) vs 4x4 (pooling);
 * the input is (pixel - per-channel mean) / 256 on 150 x 150 RGB chips.

Alignment reproduces `get_face_chip_details(shape, 150, 0.25)` + `extract_image_chips`
(what `compute_face_descriptor` does): a similarity transform fitted from the landmarks
(68-point: 32 of them, skipping the eyebrows and lower lip; or 5-point) to dlib's mean face,
turned into dlib's chip rectangle and angle, then bilinear sampling of each chip pixel with
samples whose 2x2 neighbourhood leaves the image set to 0. Here that sampling is an affine
`grid_sample` from the input image, so gradients flow from the descriptor to the pixels; the
landmarks themselves are found without gradient (dlib's 68-point predictor on the fixed face
box, as the scorer's keypoints68 head does). dlib's chips are uint8: the chip values are
truncated the way dlib truncates them, with a straight-through gradient.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from latentedit.errors import FailedPrecondition
from latentedit.repository import Entry, ModelRepository, atomic_write_bytes

log = logging.getLogger(__name__)

CHIP_SIZE = 150
CHIP_PADDING = 0.25  # dlib's compute_face_descriptor default
FACE_SIZE = 160  # the scorer's face frame: landmarks and chips come from this copy
FACE_BOX = (8, 8, 152, 152)
SAME_PERSON_DISTANCE = 0.6  # dlib's documented threshold (LFW); recalibrate for DCGAN faces
DESCRIPTOR_MODEL = "dlib-face-descriptor"
LANDMARKS_MODEL = "dlib-landmarks68"
# Bump when the parser or the cached tensors' layout changes: the cache key includes it.
CONVERTER_VERSION = 1
CACHE_FOLDER = "face-descriptor"

# ---- the architecture -----------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One dlib layer, innermost first. kind: con, affine, relu, max_pool, avg_pool, tag, skip,
    add_prev, avg_pool_everything, fc."""

    kind: str
    filters: int = 0  # con: output channels; fc: outputs
    size: int = 0  # con / pooling window
    stride: int = 1
    tag: int = 0  # tag / skip / add_prev: the tag id

    @property
    def padding(self) -> int:
        # dlib's default for con_, max_pool_, avg_pool_: k//2 when the stride is 1, else 0.
        return self.size // 2 if self.stride == 1 else 0


def _block(n: int, stride: int) -> list[Layer]:
    return [Layer("con", n, 3, stride), Layer("affine"), Layer("relu"), Layer("con", n, 3, 1), Layer("affine")]


def _residual(n: int) -> list[Layer]:
    return [Layer("tag", tag=1), *_block(n, 1), Layer("add_prev", tag=1), Layer("relu")]


def _residual_down(n: int) -> list[Layer]:
    return [
        Layer("tag", tag=1), *_block(n, 2), Layer("tag", tag=2), Layer("skip", tag=1),
        Layer("avg_pool", size=2, stride=2), Layer("add_prev", tag=2), Layer("relu"),
    ]


def dlib_resnet_layers() -> list[Layer]:
    """dlib_face_recognition_resnet_model_v1's layers from the input outward (loss excluded)."""
    layers = [Layer("con", 32, 7, 2), Layer("affine"), Layer("relu"), Layer("max_pool", size=3, stride=2)]
    layers += _residual(32) * 3
    layers += _residual_down(64) + _residual(64) * 3
    layers += _residual_down(128) + _residual(128) * 2
    layers += _residual_down(256) + _residual(256) * 2
    layers += _residual_down(256)
    layers += [Layer("avg_pool_everything"), Layer("fc", 128)]
    return layers


def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: the sum over the larger shape, each input zero-padded at the end."""
    if a.shape == b.shape:
        return a + b
    shape = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:])]

    def pad(t: torch.Tensor) -> torch.Tensor:
        c, h, w = t.shape[1:]
        return F.pad(t, (0, shape[2] - w, 0, shape[1] - h, 0, shape[0] - c))

    return pad(a) + pad(b)


class DlibResNet(nn.Module):
    """The descriptor network on 150 x 150 chips with values 0..255 (RGB, N x 3 x 150 x 150)."""

    input_mean: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.layers = dlib_resnet_layers()
        self.convs = nn.ModuleList()
        scales, in_channels = 0, 3
        for layer in self.layers:
            if layer.kind == "con":
                self.convs.append(nn.Conv2d(in_channels, layer.filters, layer.size, layer.stride, layer.padding))
                in_channels = layer.filters
            elif layer.kind == "affine":
                self.register_buffer(f"affine{scales}_scale", torch.ones(1, in_channels, 1, 1))
                self.register_buffer(f"affine{scales}_shift", torch.zeros(1, in_channels, 1, 1))
                scales += 1
            elif layer.kind == "add_prev":
                pass  # channels after an add_prev: the larger of the two, which is the block's
        self.fc = nn.Linear(256, 128, bias=False)
        self.register_buffer("input_mean", torch.zeros(1, 3, 1, 1))
        self.folded = False

    @torch.no_grad()
    def fold_affines(self) -> DlibResNet:
        """Fold each affine into the convolution before it (every affine here follows a con):
        w' = w * scale, b' = b * scale + shift. The same function, with about 20% less CPU time
        (two elementwise passes per convolution gone); the state dict is no longer dlib's."""
        if self.folded:
            return self
        conv = affine = 0
        previous = ""
        for layer in self.layers:
            if layer.kind == "affine":
                if previous != "con":
                    raise ValueError("fold_affines: an affine layer that does not follow a convolution")
                scale = getattr(self, f"affine{affine}_scale").reshape(-1)
                shift = getattr(self, f"affine{affine}_shift").reshape(-1)
                target: nn.Conv2d = self.convs[conv - 1]  # type: ignore[assignment]
                assert target.bias is not None
                target.weight.mul_(scale.reshape(-1, 1, 1, 1))
                target.bias.mul_(scale).add_(shift)
                affine += 1
            elif layer.kind == "con":
                conv += 1
            previous = layer.kind
        self.folded = True
        return self

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        # channels_last: oneDNN's convolutions and pooling are faster on it (about 20% here).
        x = ((chips - self.input_mean) / 256.0).contiguous(memory_format=torch.channels_last)
        tags: dict[int, torch.Tensor] = {}
        conv, affine = 0, 0
        for layer in self.layers:
            if layer.kind == "con":
                x = self.convs[conv](x)
                conv += 1
            elif layer.kind == "affine":
                if not self.folded:
                    x = x * getattr(self, f"affine{affine}_scale") + getattr(self, f"affine{affine}_shift")
                affine += 1
            elif layer.kind == "relu":
                x = F.relu(x)
            elif layer.kind == "max_pool":
                x = F.max_pool2d(x, layer.size, layer.stride, layer.padding)
            elif layer.kind == "avg_pool":
                x = F.avg_pool2d(x, layer.size, layer.stride, layer.padding)
            elif layer.kind == "tag":
                tags[layer.tag] = x
            elif layer.kind == "skip":
                x = tags[layer.tag]
            elif layer.kind == "add_prev":
                x = _add_padded(x, tags[layer.tag])
            elif layer.kind == "avg_pool_everything":
                x = x.mean(dim=(2, 3))
            elif layer.kind == "fc":
                x = self.fc(x)
        return x


# ---- dlib's serialization format -------------------------------------------------------------


class DlibFormatError(FailedPrecondition):
    """The .dat file is not the network this port expects (corrupt, truncated or another net)."""


class _Reader:
    """dlib's serialization primitives over a bytes buffer.

    Integers: one control byte (low nibble: number of value bytes, 1..8; bit 7: negative),
    then the magnitude little-endian. Floats: a float_details, i.e. an int64 mantissa and an
    int16 exponent as two integers (value = mantissa * 2**exponent; exponents 32000..32002
    are +inf, -inf, NaN). Strings: an integer length, then the bytes. Bools: '0' or '1'.
    Tensors (version 2): version, 4 int64 dimensions, then raw little-endian float32 values.
    """

    def __init__(self, data: bytes, source: str) -> None:
        self.data, self.pos, self.source = data, 0, source
        self.context = "the start of the file"

    def fail(self, what: str) -> DlibFormatError:
        return DlibFormatError(
            f"{self.source}: not a readable dlib face descriptor network: {what} at byte {self.pos} of "
            f"{len(self.data)} (while reading {self.context}); the file is corrupt, truncated or another "
            "network: reinstall the dlib-face-descriptor model"
        )

    def _take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail(f"the file ends inside {what} (needs {n} more bytes, {len(self.data) - self.pos} left)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def read_int(self, what: str = "an integer") -> int:
        control = self._take(1, what)[0]
        size = control & 0x0F
        if size == 0 or size > 8 or control & 0x70:
            self.pos -= 1
            raise self.fail(f"invalid integer control byte 0x{control:02x} for {what}")
        value = int.from_bytes(self._take(size, what), "little")
        return -value if control & 0x80 else value

    def expect_int(self, allowed: tuple[int, ...], what: str) -> int:
        start = self.pos
        value = self.read_int(what)
        if value not in allowed:
            self.pos = start
            raise self.fail(f"{what} is {value}, expected {' or '.join(map(str, allowed))}")
        return value

    def read_float(self, what: str = "a float") -> float:
        mantissa, exponent = self.read_int(what), self.read_int(what)
        if exponent >= 32000:
            return {32000: float("inf"), 32001: float("-inf")}.get(exponent, float("nan"))
        return float(np.ldexp(float(mantissa), exponent))

    def string(self, what: str, max_length: int = 64) -> str:
        start = self.pos
        length = self.read_int(what)
        if not 0 <= length <= max_length:
            self.pos = start
            raise self.fail(f"{what}: string length {length} is implausible")
        return self._take(length, what).decode("latin-1")

    def expect_string(self, allowed: tuple[str, ...], what: str) -> str:
        start = self.pos
        value = self.string(what)
        if value not in allowed:
            self.pos = start
            raise self.fail(f"{what}: found {value!r}, expected {' or '.join(map(repr, allowed))}")
        return value

    def read_bool(self, what: str) -> bool:
        byte = self._take(1, what)
        if byte not in (b"0", b"1"):
            self.pos -= 1
            raise self.fail(f"{what}: bool byte {byte!r} is neither '0' nor '1'")
        return byte == b"1"

    def tensor(self, what: str) -> np.ndarray:
        self.expect_int((2,), f"{what}: tensor version")
        dims = [self.read_int(f"{what}: tensor dimensions") for _ in range(4)]
        if any(d < 0 for d in dims) or int(np.prod(dims)) > len(self.data):
            raise self.fail(f"{what}: implausible tensor dimensions {dims}")
        count = int(np.prod(dims))
        raw = self._take(4 * count, f"{what} ({count} float32 values)")
        values = np.frombuffer(raw, dtype="<f4").reshape(dims)
        if not np.isfinite(values).all():
            raise self.fail(f"{what}: non-finite values")
        return values

    def alias(self, what: str) -> tuple[int, ...]:
        self.expect_int((1,), f"{what}: alias_tensor version")
        return tuple(self.read_int(f"{what}: alias dimensions") for _ in range(4))


def _split(params: np.ndarray, shapes: list[tuple[int, ...]], reader: _Reader, what: str) -> list[np.ndarray]:
    flat = params.reshape(-1)
    sizes = [int(np.prod(s)) for s in shapes]
    if sum(sizes) != flat.size:
        raise reader.fail(f"{what}: {flat.size} parameters, but its parts {shapes} need {sum(sizes)}")
    out, start = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(flat[start : start + size].reshape(shape))
        start += size
    return out


def parse_dlib_resnet(data: bytes, source: str = "the .dat file") -> dict[str, torch.Tensor]:
    """The state dict of `DlibResNet` from a dlib_face_recognition_resnet_model_v1 `.dat` file.

    dlib serializes `add_layer<DETAILS, SUBNET>` as: version, SUBNET, DETAILS, three bools,
    x_grad, cached_output, params_grad (version 2). Because the subnetwork comes before the
    layer's own fields, the file holds the loss layer's fields, then one version number per
    layer from the outside in, then the input layer, then each layer's fields from the inside
    out. tag/skip layers have no fields of their own. The layer order is checked against
    `dlib_resnet_layers()`; any difference is an error naming the byte offset.
    """
    r = _Reader(data, source)
    layers = dlib_resnet_layers()
    r.context = "the loss layer"
    r.expect_int((1,), "add_loss_layer version")
    if r.expect_string(("loss_metric_", "loss_metric_2"), "the loss layer") == "loss_metric_2":
        r.read_float("loss margin")
        r.read_float("loss distance threshold")
    versions: list[int] = [0] * len(layers)
    for index in reversed(range(len(layers))):
        layer = layers[index]
        r.context = f"layer {index} ({layer.kind}) version"
        if layer.kind in ("tag", "skip"):
            versions[index] = r.expect_int((1,), f"{layer.kind} layer version")
        elif index == 0:
            versions[index] = r.expect_int((2, 3), "input add_layer version")
        else:
            versions[index] = r.expect_int((1, 2), "add_layer version")
    r.context = "the input layer"
    r.expect_string(("input_rgb_image_sized",), "the input layer")
    mean = [r.read_float(f"input mean {c}") for c in "rgb"]
    rows, cols = r.read_int("input rows"), r.read_int("input columns")
    if (rows, cols) != (CHIP_SIZE, CHIP_SIZE):
        raise r.fail(f"input size {rows}x{cols}, expected {CHIP_SIZE}x{CHIP_SIZE}")

    state: dict[str, torch.Tensor] = {"input_mean": torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1)}
    conv = affine = 0
    in_channels = 3
    for index, layer in enumerate(layers):
        if layer.kind in ("tag", "skip"):
            continue
        r.context = f"layer {index} ({layer.kind})"
        if layer.kind == "con":
            version = r.expect_string(("con_4", "con_5", "con_6"), "a con_ layer")
            params = r.tensor("con params")
            filters = r.read_int("num_filters")
            geometry = [r.read_int("con geometry") for _ in range(6)]  # nr, nc, stride y, x, padding y, x
            expected = [layer.size, layer.size, layer.stride, layer.stride, layer.padding, layer.padding]
            if filters != layer.filters or geometry != expected:
                raise r.fail(f"con_ with {filters} filters and (nr, nc, strides, paddings) {geometry}, "
                             f"expected {layer.filters} and {expected}")
            filter_shape, bias_shape = r.alias("con filters"), r.alias("con biases")
            for _ in range(4):
                r.read_float("con learning-rate / weight-decay multiplier")
            use_bias = True
            if version in ("con_5", "con_6"):
                use_bias = r.read_bool("con use_bias")
            if version == "con_6":
                r.read_bool("con use_relu")
            shapes = [filter_shape, bias_shape] if use_bias else [filter_shape]
            if filter_shape != (layer.filters, in_channels, layer.size, layer.size):
                raise r.fail(f"con_ filters {filter_shape}, expected {(layer.filters, in_channels, layer.size, layer.size)}")
            parts = _split(params, shapes, r, "con_")
            state[f"convs.{conv}.weight"] = torch.from_numpy(parts[0].copy())
            state[f"convs.{conv}.bias"] = (
                torch.from_numpy(parts[1].reshape(-1).copy()) if use_bias else torch.zeros(layer.filters)
            )
            conv += 1
            in_channels = layer.filters
        elif layer.kind == "affine":
            version = r.expect_string(("affine_", "affine_2"), "an affine_ layer")
            params = r.tensor("affine params")
            gamma_shape, beta_shape = r.alias("affine gamma"), r.alias("affine beta")
            r.read_int("affine mode")
            if version == "affine_2":
                r.read_bool("affine disabled")
            gamma, beta = _split(params, [gamma_shape, beta_shape], r, "affine_")
            if gamma.size != in_channels:
                raise r.fail(f"affine_ over {gamma.size} channels, expected {in_channels}")
            state[f"affine{affine}_scale"] = torch.from_numpy(gamma.reshape(1, -1, 1, 1).copy())
            state[f"affine{affine}_shift"] = torch.from_numpy(beta.reshape(1, -1, 1, 1).copy())
            affine += 1
        elif layer.kind == "relu":
            if r.expect_string(("relu_", "relu_2"), "a relu_ layer") == "relu_2":
                if r.read_bool("relu disabled"):
                    raise r.fail("a disabled relu_ layer")
        elif layer.kind in ("max_pool", "avg_pool", "avg_pool_everything"):
            name = "max_pool_2" if layer.kind == "max_pool" else "avg_pool_2"
            r.expect_string((name,), f"a {name[:-1]} layer")
            geometry = [r.read_int("pooling geometry") for _ in range(6)]
            expected = ([0, 0, 1, 1, 0, 0] if layer.kind == "avg_pool_everything"
                        else [layer.size, layer.size, layer.stride, layer.stride, layer.padding, layer.padding])
            if geometry != expected:
                raise r.fail(f"{name[:-2]} (nr, nc, strides, paddings) {geometry}, expected {expected}")
        elif layer.kind == "add_prev":
            r.expect_string(("add_prev_",), "an add_prev_ layer")
        elif layer.kind == "fc":
            version = r.expect_string(("fc_2", "fc_3"), "the fc layer")
            outputs, inputs = r.read_int("fc outputs"), r.read_int("fc inputs")
            params = r.tensor("fc params")
            weight_shape, _bias_shape = r.alias("fc weights"), r.alias("fc biases")
            bias_mode = r.read_int("fc bias mode")
            for _ in range(4):
                r.read_float("fc learning-rate / weight-decay multiplier")
            if version == "fc_3":
                r.read_bool("fc use_bias")
            if (outputs, inputs, bias_mode) != (layer.filters, in_channels, 1):
                raise r.fail(f"fc with {outputs} outputs, {inputs} inputs, bias mode {bias_mode}; "
                             f"expected {layer.filters}, {in_channels}, 1 (no bias)")
            (weights,) = _split(params, [weight_shape], r, "fc_")
            # dlib computes x @ W with W: inputs x outputs; torch's Linear holds W^T.
            state["fc.weight"] = torch.from_numpy(weights.reshape(inputs, outputs).T.copy())
        # add_layer's own state: three bools and the tensors of the training state.
        for flag in ("this_layer_setup_called", "gradient_input_is_stale", "get_output_and_gradient_input_disabled"):
            r.read_bool(flag)
        r.tensor("x_grad")
        r.tensor("cached_output")
        if index == 0:
            r.tensor("grad_final")
            if versions[0] == 3:
                r.read_int("sample_expansion_factor")
        elif versions[index] == 2:
            r.tensor("params_grad")
    r.context = "the end of the file"
    if r.pos != len(data):
        raise r.fail(f"{len(data) - r.pos} unexpected bytes after the network")
    return state


# ---- conversion cache --------------------------------------------------------------------------

_cache_lock = threading.Lock()


def cache_key(dat: Path) -> str:
    """sha256 of the .dat file (first 32 hex digits) + the converter version."""
    digest = hashlib.sha256(dat.read_bytes()).hexdigest()[:32]
    return f"{digest}-v{CONVERTER_VERSION}"


def load_network(dat: Path, cache_dir: Path | None = None) -> DlibResNet:
    """The network from dlib's `.dat`, converted once and cached as safetensors.

    Cache: `<cache_dir>/<sha256 of the .dat>-v<CONVERTER_VERSION>.safetensors` (the model
    repository's `.cache/face-descriptor/`). Invalidation is by key: a different `.dat` (new
    model version, a changed file) or a new converter version gives a new key and a fresh
    conversion; a cached file that fails to load is converted again and replaced. Old keys
    are left behind (a few tens of MB each) and may be deleted at any time.
    """
    from safetensors.torch import load_file, save

    net = DlibResNet()
    path = cache_dir / f"{cache_key(dat)}.safetensors" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            net.load_state_dict(load_file(str(path)))
            net.converted_from_dat = False  # type: ignore[assignment]
            return _ready(net)
        except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, never fatal
            log.warning("face descriptor cache %s unreadable (%s); converting %s again", path, exc, dat)
    state = parse_dlib_resnet(dat.read_bytes(), str(dat))
    net.load_state_dict(state)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _cache_lock:
            atomic_write_bytes(path, save({k: v.contiguous() for k, v in state.items()}))
    net.converted_from_dat = True  # type: ignore[assignment]
    return _ready(net)


def _ready(net: DlibResNet) -> DlibResNet:
    net.fold_affines()
    return net.to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]


def network_for_entry(entry: Entry) -> DlibResNet:
    """The network of a repository entry of format dlib-face-recognition, cached in its repository.

    Entries live at <root>/<name>/<version>, so the repository root is two levels up."""
    return load_network(entry.file("weights"), ModelRepository(entry.path.parent.parent).cache_dir / CACHE_FOLDER)


# ---- alignment ---------------------------------------------------------------------------------

# dlib's mean face shape for landmarks 17..67 (x, y in the unit square), from
# get_face_chip_details in dlib/image_transforms/interpolation.h (Boost licence).
_MEAN_FACE_X = (
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124,
    0.904991, 0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036,
    0.490127, 0.554217, 0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918,
    0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149,
    0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
    0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874,
    0.553364, 0.490127, 0.42689,
)
_MEAN_FACE_Y = (
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891,
    0.0187482, 0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326,
    0.609345, 0.628106, 0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733,
    0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099,
    0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
    0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746,
    0.784792, 0.824182, 0.831803, 0.824182,
)
# 5-point predictor order: right eye outer, right eye inner, left eye outer, left eye inner, nose.
_MEAN_FACE_5 = (
    (0.8595674595992, 0.2134981538014), (0.6460604764104, 0.2289674387677), (0.1205750620789, 0.2137274526848),
    (0.3340850613712, 0.2290642403242), (0.4901123135679, 0.6277975316475),
)
# The 68 landmarks dlib aligns with: 27..67 except the lower lip (55..59, 65..67).
_USED_68 = [i for i in range(27, 68) if not (55 <= i <= 59 or 65 <= i <= 67)]


def _template(count: int, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> tuple[np.ndarray, list[int]]:
    if count == 68:
        unit = np.array([[_MEAN_FACE_X[i - 17], _MEAN_FACE_Y[i - 17]] for i in _USED_68])
        used = _USED_68
    elif count == 5:
        unit, used = np.array(_MEAN_FACE_5), list(range(5))
    else:
        raise FailedPrecondition(f"face alignment needs 68 or 5 landmarks per face, got {count}")
    return (padding + unit) / (2 * padding + 1) * size, used


def _similarity(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity dst ~ M src + t (Umeyama), M = scale * rotation (no reflection)."""
    mean_s, mean_d = src.mean(0), dst.mean(0)
    s, d = src - mean_s, dst - mean_d
    var_s = (s**2).sum() / len(src)
    cov = d.T @ s / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(cov) < 0:
        sign[1, 1] = -1
    rotation = u @ sign @ vt
    scale = (sigma * np.diag(sign)).sum() / var_s if var_s > 0 else 1.0
    m = scale * rotation
    return m, mean_d - m @ mean_s


def chip_transforms(points: np.ndarray, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> np.ndarray:
    """[N, 2, 3] affine maps from chip pixel (col, row, 1) to image pixel (x, y), as dlib builds them.

    get_face_chip_details fits a similarity from the template to the landmarks, keeps its
    angle and scale s, and makes the chip rectangle centred on the image of the chip centre
    with side size*s (dlib's centered_drect subtracts one: corners at +-(size*s - 1)/2).
    extract_image_chips maps chip corners (0, 0), (size-1, 0), (0, size-1) to the rectangle's
    corners rotated about its centre.
    """
    points = np.asarray(points, np.float64)
    template, used = _template(points.shape[1], size, padding)
    out = np.zeros((len(points), 2, 3), np.float64)
    for i, face in enumerate(points):
        m, t = _similarity(template, face[used])
        angle = np.arctan2(m[1, 0], m[0, 0])
        scale = np.hypot(m[0, 0], m[1, 0])
        centre = m @ np.array([size / 2.0, size / 2.0]) + t
        half = (size * scale - 1) / 2.0
        step = 2 * half / (size - 1)  # image pixels per chip pixel along the rectangle
        c, s = np.cos(angle), np.sin(angle)
        rotation = np.array([[c, -s], [s, c]])
        linear = rotation * step
        offset = centre - rotation @ np.array([half, half])
        out[i, :, :2], out[i, :, 2] = linear, offset
    return out


def extract_chips(images: torch.Tensor, transforms: torch.Tensor | np.ndarray, size: int = CHIP_SIZE,
                  quantize: bool = True) -> torch.Tensor:
    """Bilinear chips [N, C, size, size] from images [N, C, H, W] (values 0..255), differentiably.

    Like dlib's interpolate_bilinear, a chip pixel whose 2x2 source neighbourhood is not
    entirely inside the image is 0. `quantize` rounds to integers as dlib's uint8 chips do
    (forward only; the gradient passes straight through)."""
    n, _, h, w = images.shape
    tf = torch.as_tensor(transforms, dtype=torch.float64)
    rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij")
    grid = torch.stack([cols, rows, torch.ones_like(cols)], -1).reshape(1, -1, 3)
    xy = grid @ tf.transpose(1, 2)  # [N, size*size, 2] image pixels
    x, y = xy[..., 0], xy[..., 1]
    inside = (x >= 0) & (y >= 0) & (torch.floor(x) + 1 < w) & (torch.floor(y) + 1 < h)
    norm = torch.stack([2 * x / (w - 1) - 1, 2 * y / (h - 1) - 1], -1).reshape(n, size, size, 2)
    chips = F.grid_sample(images, norm.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)
    chips = chips * inside.reshape(n, 1, size, size).to(images.dtype)
    if quantize:
        # dlib converts the interpolated double to uint8 by truncation (measured: 99.8% of
        # chip values equal floor(), 60-70% equal round()).
        chips = chips + (torch.floor(chips) - chips).detach()
    return chips


class FaceDescriptor(nn.Module):
    """Images -> dlib-compatible 128-d face descriptors, differentiable w.r.t. the images.

    forward(images [N, 3, H, W] float RGB in [0, 1], points=None) -> [N, 128]. Images are
    resized (bilinear, antialiased: the scorer's resize) to the 160 px face frame; without
    `points`, dlib's 68-point predictor finds landmarks on the fixed face box of that copy
    (no gradient). `points` [N, 68 or 5, 2] are in the 160 px frame's pixels. Euclidean
    distances are on dlib's scale (same person below about 0.6 on photographs).
    """

    def __init__(self, network: DlibResNet, predictor: Any, quantize: bool = True) -> None:
        super().__init__()
        self.network = network
        self.predictor = predictor
        self.quantize = quantize
        self._lock = threading.Lock()

    def face_frame(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> [N, 3, 160, 160] in 0..255."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise FailedPrecondition(f"face descriptor: images of shape {list(images.shape)}, expected [N, 3, H, W]")
        x = images * 255.0
        if tuple(x.shape[2:]) != (FACE_SIZE, FACE_SIZE):
            x = F.interpolate(x, size=(FACE_SIZE, FACE_SIZE), mode="bilinear", align_corners=False, antialias=True)
        if self.quantize:
            # The scorer's copy is uint8 (rounded): same forward values, straight-through gradient.
            x = x + (x.round().clamp(0, 255) - x).detach()
        return x

    @torch.no_grad()
    def landmarks(self, frame: torch.Tensor) -> np.ndarray:
        """[N, 68, 2] landmarks (160 px frame) of face-frame images (0..255), by dlib's predictor."""
        import dlib

        faces = frame.detach().round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        rect = dlib.rectangle(*FACE_BOX)
        with self._lock:
            shapes = [self.predictor(np.ascontiguousarray(face), rect) for face in faces]
        return np.array([[(p.x, p.y) for p in shape.parts()] for shape in shapes], np.float64).reshape(len(faces), -1, 2)

    def from_frame(self, frame: torch.Tensor, points: np.ndarray) -> torch.Tensor:
        """Descriptors of face-frame images (0..255, 160 px) with landmarks in that frame."""
        chips = extract_chips(frame, chip_transforms(points), quantize=self.quantize)
        return self.network(chips)

    def forward(self, images: torch.Tensor, points: np.ndarray | None = None) -> torch.Tensor:
        frame = self.face_frame(images)
        if points is None:
            points = self.landmarks(frame)
        return self.from_frame(frame, np.asarray(points))


def load_face_descriptor(repo: ModelRepository, quantize: bool = True) -> FaceDescriptor:
    """The torch face descriptor from the repository's dlib-face-descriptor and dlib-landmarks68 entries."""
    import dlib

    descriptor = repo.resolve(DESCRIPTOR_MODEL)
    landmarks = repo.resolve(LANDMARKS_MODEL)
    network = load_network(descriptor.file("weights"), repo.cache_dir / CACHE_FOLDER)
    predictor = dlib.shape_predictor(str(landmarks.file("weights")))
    return FaceDescriptor(network, predictor, quantize=quantize).eval()

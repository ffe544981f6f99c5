"""StyleGAN2 (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN") as a
StagedGenerator.

Mapping: z -> pixel norm -> `mapping_layers` equalised-lr linear layers (lr multiplier 0.01,
leaky ReLU x sqrt 2) -> w, with `w_avg` tracked during training (truncation's centre).
Synthesis ("skip" architecture): a learned 4x4 constant; per resolution block a modulated /
demodulated 3x3 conv (the first of each block >= 8 upsamples: transposed conv + [1,3,3,1]
blur), per-layer noise (fixed buffers drawn from `noise_seed`, or zero), bias + leaky ReLU x
sqrt 2; a non-demodulated 1x1 toRGB per block added to the upsampled RGB of the block before.

Latent spaces: Z (N(0, I), z_dim), W (one w, broadcast to every layer) and W+ (num_ws rows,
row i drives the i-th style input: block 4 uses rows 0-1, block r uses rows 2k-1 .. 2k+1 for
r = 2^(k+2)). num_ws = 2 log2(resolution) - 2.

Modulated convolutions use the non-fused form (modulate the input activations, one shared
weight for the whole batch, scale the output by the demodulation coefficients): equal to the
grouped-conv form up to float rounding, and it exports to ONNX with a dynamic batch axis.

Named layers: `input` (the W+ tensor [num_ws, w_dim]), `b4`, `b8`, ... one per resolution
block below the last, and `image`. A staged split must lose nothing (G2(G1(w)) == G(w)), and
the later blocks need the RGB skip and their style rows, so a block layer's features are one
[C + 3 + P, r, r] tensor: channels [0, C) the block's feature maps, [C, C + 3) the RGB skip
so far, and the last P channels the W+ rows the later blocks use (flattened, zero padded to
P x r x r). Edits of feature maps touch the first C channels (`feature_channels`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from latentedit.errors import InvalidArgument
from latentedit.latents import LatentSpaceSpec
from latentedit.models.generator import IMAGE_LAYER, INPUT_LAYER, GeneratorSpec, LayerSpec, WPlusInputGenerator

ARCHITECTURE = "stylegan2"
RESOLUTIONS = (64, 128, 256, 512, 1024)
SQRT2 = math.sqrt(2.0)
NOISE_MODES = ("const", "zero")


def default_channels(resolution: int, channel_multiplier: float = 2.0, max_channels: int = 512) -> list[int]:
    """Channels per block 4..resolution, the reference table (512 up to 32 px, then 256 x
    multiplier halving per doubling), capped at `max_channels` (small models)."""
    out = []
    for res in block_resolutions(resolution):
        base = 512 if res <= 32 else int(256 * channel_multiplier * 64 // res)
        out.append(max(1, min(base, max_channels)))
    return out


def block_resolutions(resolution: int) -> list[int]:
    if resolution < 8 or resolution & (resolution - 1):
        raise InvalidArgument(f"StyleGAN2 resolution {resolution} must be a power of two >= 8")
    return [2**k for k in range(2, int(math.log2(resolution)) + 1)]


def _blur_kernel() -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k = torch.outer(k, k)
    return k / k.sum()


def upfirdn(x: torch.Tensor, kernel: torch.Tensor, channels: int, up: int, pad0: int, pad1: int,
            gain: float) -> torch.Tensor:
    """Upsample by zero insertion, pad, and filter each of `channels` with the (symmetric) FIR
    kernel (the channel count is passed, not read from x, so the ONNX graph has a static kernel)."""
    n, _, h, w = x.shape
    c = channels
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(n, c, h * up, w * up)
    x = F.pad(x, (pad0, pad1, pad0, pad1))
    weight = (kernel * gain).to(x.dtype)[None, None].expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, groups=c)


class EqualLinear(nn.Module):
    """y = x (W * lr_mul / sqrt(in))^T + b * lr_mul; stored weights are N(0, 1) / lr_mul at init."""

    def __init__(self, in_dim: int, out_dim: int, lr_mul: float = 1.0, bias_init: float = 0.0, activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.lr_mul = lr_mul
        self.gain = lr_mul / math.sqrt(in_dim)
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight * self.gain, self.bias * self.lr_mul)
        return F.leaky_relu(y, 0.2) * SQRT2 if self.activate else y


class MappingNetwork(nn.Module):
    w_avg: torch.Tensor

    def __init__(self, z_dim: int, w_dim: int, num_layers: int, lr_mul: float = 0.01, w_avg_beta: float = 0.995):
        super().__init__()
        dims = [z_dim] + [w_dim] * num_layers
        self.layers = nn.ModuleList(
            [EqualLinear(dims[i], dims[i + 1], lr_mul=lr_mul, activate=True) for i in range(num_layers)])
        self.register_buffer("w_avg", torch.zeros(w_dim))
        self.w_avg_beta = w_avg_beta

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)
        for layer in self.layers:
            x = layer(x)
        if self.training:  # track the centre of W for truncation
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(0).lerp(self.w_avg, self.w_avg_beta))
        return x


class ModulatedConv(nn.Module):
    """A style-modulated conv (+ demodulation, noise, bias and activation for synthesis layers)."""

    noise: torch.Tensor
    kernel: torch.Tensor

    def __init__(self, in_ch: int, out_ch: int, kernel: int, w_dim: int, resolution: int, *, up: bool = False,
                 demodulate: bool = True, noise: bool = True, activate: bool = True) -> None:
        super().__init__()
        self.affine = EqualLinear(w_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.gain = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.up, self.demodulate, self.activate = up, demodulate, activate
        self.padding = kernel // 2
        self.has_noise = noise
        if noise:
            self.noise_strength = nn.Parameter(torch.zeros(()))
            self.register_buffer("noise", torch.zeros(1, 1, resolution, resolution))
        self.register_buffer("kernel", _blur_kernel(), persistent=False)
        self.noise_mode = "const"
        self.conv_clamp: float | None = None

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w)  # [N, in]
        weight = self.weight * self.gain
        x = x * styles[:, :, None, None]
        if self.up:
            x = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)
            x = upfirdn(x, self.kernel, self.weight.shape[0], 1, 1, 1, gain=4.0)
        else:
            x = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            # sum over in, kh, kw of (weight * style)^2, per sample and output channel
            dcoefs = torch.rsqrt(styles.square() @ weight.square().sum(dim=(2, 3)).t() + 1e-8)
            x = x * dcoefs[:, :, None, None]
        if self.has_noise and self.noise_mode == "const":
            x = x + self.noise * self.noise_strength
        x = x + self.bias[None, :, None, None]
        if self.activate:
            x = F.leaky_relu(x, 0.2) * SQRT2
        if self.conv_clamp is not None:
            x = x.clamp(-self.conv_clamp, self.conv_clamp)
        return x


class SynthesisBlock(nn.Module):
    """One resolution: (up-conv0,) conv1, toRGB; adds its RGB to the upsampled skip."""

    kernel: torch.Tensor

    def __init__(self, in_ch: int, out_ch: int, w_dim: int, resolution: int, img_channels: int) -> None:
        super().__init__()
        self.resolution, self.img_channels = resolution, img_channels
        self.first = resolution == 4
        if self.first:
            self.const = nn.Parameter(torch.randn(out_ch, 4, 4))
        else:
            self.conv0 = ModulatedConv(in_ch, out_ch, 3, w_dim, resolution, up=True)
        self.conv1 = ModulatedConv(out_ch, out_ch, 3, w_dim, resolution)
        self.torgb = ModulatedConv(out_ch, img_channels, 1, w_dim, resolution, demodulate=False, noise=False,
                                   activate=False)
        self.register_buffer("kernel", _blur_kernel(), persistent=False)
        self.num_ws_used = 2 if self.first else 3  # rows read: conv(s) then toRGB

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor):
        """ws: the block's rows [N, num_ws_used, w_dim]."""
        if self.first:
            x = self.const[None].expand(ws.shape[0], -1, -1, -1)
            x = self.conv1(x, ws[:, 0])
            y = self.torgb(x, ws[:, 1])
            return x, y
        assert x is not None and img is not None
        x = self.conv0(x, ws[:, 0])
        x = self.conv1(x, ws[:, 1])
        y = self.torgb(x, ws[:, 2])
        return x, y + upfirdn(img, self.kernel, self.img_channels, 2, 2, 1, gain=4.0)


def _packed_channels(rows: int, w_dim: int, res: int) -> int:
    return -(-rows * w_dim // (res * res))


class _Stage(nn.Module):
    """Block `index` of the synthesis network as one stage: unpack, run, pack (see module doc)."""

    block: SynthesisBlock

    def __init__(self, owner: StyleGAN2Generator, index: int) -> None:
        super().__init__()
        # A plain reference, not a submodule: the weights are the owner's `blocks.*` only.
        object.__setattr__(self, "block", owner.blocks[index])
        self.index, self.count = index, len(owner.blocks)
        self.w_dim, self.num_ws = owner.w_dim, owner.num_ws
        self.channels = owner.block_channels
        self.img_channels = owner.img_channels
        self.resolutions = owner.resolutions

    def _rows_after(self, index: int) -> int:
        """W+ rows the blocks after block `index` read (they start at row 2 * index + 1)."""
        return self.num_ws - (2 * index + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.index == 0:
            ws, feats, img = x, None, None
        else:
            prev_c = self.channels[self.index - 1]
            feats = x[:, :prev_c]
            img = x[:, prev_c : prev_c + self.img_channels]
            rows = self._rows_after(self.index - 1)
            flat = x[:, prev_c + self.img_channels :].reshape(n, -1)[:, : rows * self.w_dim]
            ws = flat.reshape(n, rows, self.w_dim)
            ws = torch.cat([x.new_zeros(n, 2 * self.index - 1, self.w_dim), ws], dim=1)  # align row numbers
        start = max(0, 2 * self.index - 1)
        feats, img = self.block(feats, img, ws[:, start : start + self.block.num_ws_used])
        if self.index == self.count - 1:
            return img
        res = self.resolutions[self.index]
        rest = ws[:, 2 * self.index + 1 :].reshape(n, -1)
        packed = _packed_channels(self._rows_after(self.index), self.w_dim, res)
        rest = F.pad(rest, (0, packed * res * res - rest.shape[1])).reshape(n, packed, res, res)
        return torch.cat([feats, img, rest], dim=1)


class StyleGAN2Generator(WPlusInputGenerator):
    def __init__(self, resolution: int = 64, z_dim: int = 512, w_dim: int = 512, mapping_layers: int = 8,
                 channels: Sequence[int] | None = None, channel_multiplier: float = 2.0, max_channels: int = 512,
                 img_channels: int = 3, mapping_lr_mul: float = 0.01, noise_seed: int = 0, noise_mode: str = "const",
                 has_w_avg: bool = True, truncation_cutoff: int = 0, conv_clamp: float | None = None) -> None:
        super().__init__()
        self.resolutions = block_resolutions(resolution)
        chans = list(channels) if channels is not None else default_channels(resolution, channel_multiplier, max_channels)
        if len(chans) != len(self.resolutions):
            raise InvalidArgument(f"channels: {len(chans)} values for {len(self.resolutions)} blocks (4..{resolution})")
        self.resolution, self.z_dim, self.w_dim = resolution, z_dim, w_dim
        self.block_channels, self.img_channels = chans, img_channels
        self.num_ws = 2 * len(self.resolutions)
        self.mapping_lr_mul, self.noise_seed, self.has_w_avg = mapping_lr_mul, noise_seed, has_w_avg
        self.truncation_cutoff = truncation_cutoff  # rows < cutoff are truncated in W+ (0: all)
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers, mapping_lr_mul)
        self.blocks = nn.ModuleList(
            SynthesisBlock(chans[max(i - 1, 0)], chans[i], w_dim, res, img_channels)
            for i, res in enumerate(self.resolutions))
        self.reset_noise(noise_seed)
        self.set_noise_mode(noise_mode)
        self.set_conv_clamp(conv_clamp)
        self.stages = nn.ModuleList(_Stage(self, i) for i in range(len(self.blocks)))
        layers = [LayerSpec(INPUT_LAYER, (self.num_ws, w_dim), f"W+ latents: {self.num_ws} rows of w")]
        for i, res in enumerate(self.resolutions[:-1]):
            rows = self.num_ws - (2 * i + 1)
            packed = _packed_channels(rows, w_dim, res)
            layers.append(LayerSpec(
                f"b{res}", (chans[i] + img_channels + packed, res, res),
                f"{res}x{res} block: channels 0-{chans[i] - 1} features, then {img_channels} RGB skip, then "
                f"{packed} channels holding the {rows} W+ rows later blocks use"))
        layers.append(LayerSpec(IMAGE_LAYER, (img_channels, resolution, resolution), "RGB image in [-1, 1]"))
        self.spec = GeneratorSpec(
            architecture=ARCHITECTURE,
            latent_spaces=(LatentSpaceSpec("z", z_dim, 1, "normal"), LatentSpaceSpec("w", w_dim),
                           LatentSpaceSpec("w+", w_dim, self.num_ws)),
            resolution=resolution,
            channels=img_channels,
            layers=tuple(layers),
            supports_truncation=has_w_avg,
            extra={"num_ws": self.num_ws, "feature_channels": {f"b{r}": c for r, c in zip(self.resolutions, chans)},
                   "noise_mode": noise_mode, "truncation_cutoff": truncation_cutoff},
        )

    # ---- configuration ----------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """What `load_stylegan2` needs to rebuild this architecture (the manifest's config)."""
        return {"resolution": self.resolution, "z_dim": self.z_dim, "w_dim": self.w_dim,
                "mapping_layers": len(self.mapping.layers), "channels": list(self.block_channels),
                "img_channels": self.img_channels, "mapping_lr_mul": self.mapping_lr_mul,
                "noise_seed": self.noise_seed, "noise_mode": self.noise_mode, "has_w_avg": self.has_w_avg,
                "truncation_cutoff": self.truncation_cutoff, "conv_clamp": self.conv_clamp}

    def noise_layers(self) -> list[ModulatedConv]:
        return [m for m in self.modules() if isinstance(m, ModulatedConv) and m.has_noise]

    def reset_noise(self, seed: int) -> None:
        """Fixed noise inputs drawn from `seed` (the same seed, the same noise)."""
        generator = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for layer in self.noise_layers():
                layer.noise.copy_(torch.randn(layer.noise.shape, generator=generator))
        self.noise_seed = int(seed)

    def set_noise_mode(self, mode: str) -> None:
        """"const": the fixed noise buffers; "zero": no noise."""
        if mode not in NOISE_MODES:
            raise InvalidArgument(f"noise_mode {mode!r} is unknown; allowed: {', '.join(NOISE_MODES)}")
        self.noise_mode = mode
        for layer in self.noise_layers():
            layer.noise_mode = mode

    def set_conv_clamp(self, clamp: float | None) -> None:
        self.conv_clamp = None if clamp is None else float(clamp)
        for m in self.modules():
            if isinstance(m, ModulatedConv):
                m.conv_clamp = self.conv_clamp

    @torch.no_grad()
    def estimate_w_avg(self, count: int = 4096, seed: int = 0) -> torch.Tensor:
        """Set w_avg to the mean of `count` mapped prior draws (for freshly built models)."""
        z = torch.randn(count, self.z_dim, generator=torch.Generator().manual_seed(seed))
        was_training = self.mapping.training
        self.mapping.eval()
        self.mapping.w_avg.copy_(self.mapping(z).mean(0))
        self.mapping.train(was_training)
        self.has_w_avg = True
        self.spec = _with_truncation(self.spec, True)
        return self.mapping.w_avg

    # ---- latent spaces --------------------------------------------------------------------

    def map_latents(self, z: torch.Tensor, space: str) -> torch.Tensor:
        if space == "z":
            return z
        w = self.mapping(z)
        if space == "w":
            return w
        if space == "w+":
            return w[:, None, :].expand(-1, self.num_ws, -1).contiguous()
        raise InvalidArgument(f"{ARCHITECTURE} has no latent space {space!r}")

    def truncate(self, latents: torch.Tensor, space: str, psi: float, cutoff: int | None = None) -> torch.Tensor:
        """w_avg + psi (w - w_avg): W, or W+ rows below `cutoff` (None: the model's; 0: all rows)."""
        if not self.has_w_avg:
            raise InvalidArgument(f"truncation needs the model's w_avg (the mean of W), and this {ARCHITECTURE} "
                                  "checkpoint has none; sample with truncation_psi 1 (or 0: none)")
        if space not in ("w", "w+"):
            raise InvalidArgument(f"truncation acts in W or W+, not {space!r}; sample W or W+ latents")
        avg = self.mapping.w_avg.to(latents.dtype)
        truncated = avg + psi * (latents - avg)
        if space == "w":
            return truncated
        cutoff = self.truncation_cutoff if cutoff is None else cutoff
        if not cutoff:
            return truncated
        rows = (torch.arange(self.num_ws) < cutoff).to(latents.dtype)[None, :, None]
        return rows * truncated + (1 - rows) * latents


def _with_truncation(spec: GeneratorSpec, supported: bool) -> GeneratorSpec:
    from dataclasses import replace

    return replace(spec, supports_truncation=supported)


def load_stylegan2(folder: Path, config: dict, weights_file: str) -> StyleGAN2Generator:
    model = build_stylegan2(config)
    state = load_file(str(folder / weights_file), device="cpu")
    check_state(model, state)
    model.load_state_dict(state, strict=True)
    return model.eval()


def build_stylegan2(config: dict) -> StyleGAN2Generator:
    known = {"resolution", "z_dim", "w_dim", "mapping_layers", "channels", "img_channels", "mapping_lr_mul",
             "noise_seed", "noise_mode", "has_w_avg", "truncation_cutoff", "conv_clamp", "channel_multiplier",
             "max_channels"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise InvalidArgument(f"{ARCHITECTURE} config: unknown keys {unknown}; known: {sorted(known)}")
    model = StyleGAN2Generator(**config)
    return model


def check_state(model: StyleGAN2Generator, state: dict[str, torch.Tensor]) -> None:
    """Every tensor present with the architecture's shape; names the first that is not."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise InvalidArgument(f"{ARCHITECTURE} weights: tensor {key} {list(tensor.shape)} is missing")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise InvalidArgument(f"{ARCHITECTURE} weights: tensor {key} has shape {list(state[key].shape)}; "
                                  f"the architecture needs {list(tensor.shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise InvalidArgument(f"{ARCHITECTURE} weights: unexpected tensor {extra[0]} ({len(extra)} unexpected)")


def weights(model: StyleGAN2Generator) -> dict[str, torch.Tensor]:
    """The tensors to store (stages alias the blocks, so only mapping.* and blocks.*)."""
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def install_stylegan2(repo, name: str, model: StyleGAN2Generator, provenance: dict[str, str]):
    """Write `model` as a new version of generator `name` (weights.safetensors + manifest)."""
    from safetensors.torch import save_file

    def populate(folder: Path) -> None:
        save_file(weights(model), str(folder / "weights.safetensors"))

    return repo.write(name, {"kind": "generator", "architecture": ARCHITECTURE, "config": model.config(),
                             "files": {"weights": "weights.safetensors"}, "provenance": dict(provenance)}, populate)


def random_stylegan2(seed: int = 0, **config: Any) -> StyleGAN2Generator:
    """A randomly initialised model (non-zero noise strengths, w_avg estimated): for tests."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = StyleGAN2Generator(**config)
    with torch.no_grad():
        for layer in model.noise_layers():
            layer.noise_strength.fill_(0.2)
    if model.has_w_avg:
        model.estimate_w_avg(1024, seed)
    return model.eval()

"""DCGAN generator (PyTorch tutorial layout), the embedded default face model.

The layer layout matches the `gan-face-generate` checkpoint (`main.<i>.*` keys), so its state
dict loads as is. Each transposed-conv block is one stage; its ReLU output is the named layer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from latentedit.models.generator import (
    IMAGE_LAYER,
    INPUT_LAYER,
    GeneratorSpec,
    LatentSpaceSpec,
    LayerSpec,
    StagedGenerator,
)


class _Reshape(nn.Module):
    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


class DCGANGenerator(StagedGenerator):
    def __init__(self, latent_dim: int = 100, feature_maps: int = 64, channels: int = 3) -> None:
        super().__init__()
        nz, ngf, nc = latent_dim, feature_maps, channels
        widths = [ngf * 8, ngf * 4, ngf * 2, ngf]
        # Same module indices as the tutorial's nn.Sequential so checkpoints load unchanged.
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, widths[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(True),
            nn.ConvTranspose2d(widths[0], widths[1], 4, 2, 1, bias=False),
            nn.BatchNorm2d(widths[1]),
            nn.ReLU(True),
            nn.ConvTranspose2d(widths[1], widths[2], 4, 2, 1, bias=False),
            nn.BatchNorm2d(widths[2]),
            nn.ReLU(True),
            nn.ConvTranspose2d(widths[2], widths[3], 4, 2, 1, bias=False),
            nn.BatchNorm2d(widths[3]),
            nn.ReLU(True),
            nn.ConvTranspose2d(widths[3], nc, 4, 2, 1, bias=False),
            nn.Tanh(),
        )
        m = self.main
        # Stages share the modules above (no copies): input -> block1 -> ... -> image.
        self.stages = nn.ModuleList(
            [
                nn.Sequential(_Reshape(nz, 1, 1), m[0], m[1], m[2]),
                nn.Sequential(m[3], m[4], m[5]),
                nn.Sequential(m[6], m[7], m[8]),
                nn.Sequential(m[9], m[10], m[11]),
                nn.Sequential(m[12], m[13]),
            ]
        )
        self.spec = GeneratorSpec(
            architecture="dcgan",
            latent_spaces=(LatentSpaceSpec("z", nz, 1, "normal"),),
            resolution=64,
            channels=nc,
            layers=(
                LayerSpec(INPUT_LAYER, (nz,), "latent code z"),
                LayerSpec("block1", (widths[0], 4, 4), "after the first transposed conv + BN + ReLU"),
                LayerSpec("block2", (widths[1], 8, 8), "after the second block"),
                LayerSpec("block3", (widths[2], 16, 16), "after the third block"),
                LayerSpec("block4", (widths[3], 32, 32), "after the fourth block"),
                LayerSpec(IMAGE_LAYER, (nc, 64, 64), "RGB image in [-1, 1]"),
            ),
        )

    def state_dict_for_export(self) -> dict[str, torch.Tensor]:
        """The checkpoint keys (main.*) only; stages alias the same tensors."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if k.startswith("main.")}


def load_dcgan(folder: Path, config: dict, weights_file: str) -> DCGANGenerator:
    model = DCGANGenerator(
        latent_dim=int(config.get("latent_dim", 100)),
        feature_maps=int(config.get("feature_maps", 64)),
        channels=int(config.get("channels", 3)),
    )
    state = load_file(str(folder / weights_file), device="cpu")
    # Stage keys alias main.* keys, so only main.* is stored; strict on those.
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith("main.")]
    if missing or unexpected:
        raise ValueError(f"DCGAN weights do not match the architecture: missing {missing}, unexpected {unexpected}")
    return model.eval()

"""A DCGAN body behind a style-like mapping network: the smallest generator with Z, W and W+.

z -> w is a mapping MLP (residual, so W stays close to Z but has no known density); W+ holds
one w per "layer", and each row reaches the body's input through its own linear map, so
editing a row range changes the image differently from editing all rows. The body is the
default DCGAN's, so the images stay faces whatever the (random) mapping weights.

It exists to run every method and service on W and W+ latents until the StyleGAN2 issue
brings a real style generator; its layers are `input` (the W+ tensor), `block1`..`block4`
and `image`, like the DCGAN's.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from latentedit.errors import InvalidArgument
from latentedit.latents import LatentSpaceSpec
from latentedit.models.dcgan import DCGANGenerator
from latentedit.models.generator import INPUT_LAYER, GeneratorSpec, LayerSpec, WPlusInputGenerator
from latentedit.repository import Entry, ModelRepository

ARCHITECTURE = "mapped-dcgan"


class _MixRows(nn.Module):
    """[N, num_ws, w_dim] -> [N, latent_dim]: the mean over rows of each row's own linear map."""

    def __init__(self, num_ws: int, w_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_ws, w_dim, latent_dim))

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nrd,rde->ne", ws, self.weight) / self.weight.shape[0]


class MappedDCGAN(WPlusInputGenerator):
    def __init__(self, latent_dim: int = 100, num_ws: int = 4, mapping_layers: int = 2, feature_maps: int = 64,
                 channels: int = 3) -> None:
        super().__init__()
        self.latent_dim, self.num_ws = latent_dim, num_ws
        self.body = DCGANGenerator(latent_dim, feature_maps, channels)
        layers: list[nn.Module] = []
        for _ in range(mapping_layers):
            layers += [nn.Linear(latent_dim, latent_dim), nn.LeakyReLU(0.2)]
        self.mapping = nn.Sequential(*layers)
        self.mix = _MixRows(num_ws, latent_dim, latent_dim)
        self.stages = nn.ModuleList([nn.Sequential(self.mix, self.body.stages[0]), *self.body.stages[1:]])
        body = self.body.spec
        self.spec = GeneratorSpec(
            architecture=ARCHITECTURE,
            latent_spaces=(LatentSpaceSpec("z", latent_dim, 1, "normal"), LatentSpaceSpec("w", latent_dim),
                           LatentSpaceSpec("w+", latent_dim, num_ws)),
            resolution=body.resolution,
            channels=body.channels,
            layers=(LayerSpec(INPUT_LAYER, (num_ws, latent_dim), "W+ latents, one w per row"), *body.layers[1:]),
        )

    def map_latents(self, z: torch.Tensor, space: str) -> torch.Tensor:
        h = z + 0.5 * self.mapping(z)
        w = h * math.sqrt(self.latent_dim) / h.norm(dim=1, keepdim=True).clamp(min=1e-8)  # back onto z's shell
        if space == "w":
            return w
        if space == "w+":
            return w[:, None, :].expand(-1, self.num_ws, -1).contiguous()
        if space == "z":
            return z
        raise InvalidArgument(f"{ARCHITECTURE} has no latent space {space!r}")

    def config(self) -> dict:
        return {"latent_dim": self.latent_dim, "num_ws": self.num_ws, "mapping_layers": len(self.mapping) // 2,
                "feature_maps": self.body.spec.layers[-2].shape[0], "channels": self.body.spec.channels}

    def weights(self) -> dict[str, torch.Tensor]:
        """The tensors to store: the body's checkpoint keys, the mapping and the row maps (no aliases)."""
        keep = ("body.main.", "mapping.", "mix.")
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if k.startswith(keep)}


def random_mapped_dcgan(body_weights: dict[str, torch.Tensor], num_ws: int = 4, seed: int = 0) -> MappedDCGAN:
    """Random mapping and row maps (each row near one shared rotation, so W+ = broadcast W keeps
    the body's input on its prior shell) in front of the given DCGAN body weights."""
    generator = torch.Generator().manual_seed(seed)
    model = MappedDCGAN(num_ws=num_ws)
    model.body.load_state_dict(body_weights, strict=False)
    dim = model.latent_dim
    with torch.no_grad():
        for layer in model.mapping:
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(torch.randn(dim, dim, generator=generator) / math.sqrt(dim))
                layer.bias.zero_()
        rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        for row in range(num_ws):
            noisy = rotation + 0.3 * torch.randn(dim, dim, generator=generator) / math.sqrt(dim)
            model.mix.weight[row].copy_(noisy)
    return model.eval()


def install_random_mapped_dcgan(repo: ModelRepository, name: str, body: Entry, num_ws: int = 4, seed: int = 0) -> Entry:
    """Write a random-mapping W+ generator on `body`'s DCGAN weights into the repository."""
    state = load_file(str(body.file("weights")))
    model = random_mapped_dcgan(state, num_ws, seed)

    def populate(folder: Path) -> None:
        save_file(model.weights(), str(folder / "weights.safetensors"))

    return repo.write(name, {"kind": "generator", "architecture": ARCHITECTURE, "config": model.config(),
                             "files": {"weights": "weights.safetensors"},
                             "provenance": {"body": f"{body.name} v{body.version}", "mapping": f"random, seed {seed}",
                                            "note": "test generator with Z, W and W+ spaces"}}, populate)


def load_mapped_dcgan(folder: Path, config: dict, weights_file: str) -> MappedDCGAN:
    model = MappedDCGAN(**{k: int(v) for k, v in config.items()})
    state = load_file(str(folder / weights_file), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith(("body.main.", "mapping.", "mix."))]
    if missing or unexpected:
        raise ValueError(f"{ARCHITECTURE} weights do not match the architecture: missing {missing}, unexpected {unexpected}")
    return model.eval()


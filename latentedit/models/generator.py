"""The generator abstraction every backend and method works with.

A generator is an ordered list of stages. The input layer is the latent code; each stage
maps the previous layer's features to the next named layer; the last layer is the image
(NCHW in [-1, 1]). `run(x, from_layer, to_layers)` runs the stages between two layers, which
gives features at any layer (GANSpace's partial forward, DP-LaSE's G1) and images from
features at any layer (G2, for feature-space edits) with one code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from latentedit.errors import InvalidArgument, NotFound
from latentedit.latents import LatentSpaceSpec

INPUT_LAYER = "input"
IMAGE_LAYER = "image"


@dataclass(frozen=True)
class LayerSpec:
    name: str
    shape: tuple[int, ...]  # per sample
    description: str = ""


@dataclass(frozen=True)
class GeneratorSpec:
    architecture: str
    latent_spaces: tuple[LatentSpaceSpec, ...]
    resolution: int
    channels: int
    layers: tuple[LayerSpec, ...]  # input first, image last
    supports_truncation: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    def space(self, name: str | None = None) -> LatentSpaceSpec:
        """The named latent space (None or "": the first, the generator's prior)."""
        if not name:
            return self.latent_spaces[0]
        for space in self.latent_spaces:
            if space.space == name:
                return space
        raise InvalidArgument(f"{self.architecture} generators have no latent space {name!r}; spaces: "
                              f"{', '.join(s.space for s in self.latent_spaces)}")

    def layer_index(self, name: str) -> int:
        for i, layer in enumerate(self.layers):
            if layer.name == name:
                return i
        raise NotFound(f"unknown layer {name!r}; layers: {', '.join(l.name for l in self.layers)}")


class StagedGenerator(nn.Module):
    """Base class: subclasses set `spec` and `stages` (len(layers) - 1 modules)."""

    spec: GeneratorSpec
    stages: nn.ModuleList

    def run(self, x: torch.Tensor, from_layer: str, to_layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Run from the features at `from_layer` and return the features at each of `to_layers`."""
        start = self.spec.layer_index(from_layer)
        targets = {name: self.spec.layer_index(name) for name in to_layers}
        if not targets:
            raise InvalidArgument("no output layers requested")
        for name, index in targets.items():
            if index <= start:
                raise InvalidArgument(f"layer {name!r} does not come after the input layer {from_layer!r}")
        last = max(targets.values())
        outputs: dict[str, torch.Tensor] = {}
        for index in range(start + 1, last + 1):
            x = self.stages[index - 1](x)
            name = self.spec.layers[index].name
            if name in targets:
                outputs[name] = x
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Input-layer features -> images; the form ONNX export uses (see `latents_to_input`)."""
        return self.run(x, INPUT_LAYER, [IMAGE_LAYER])[IMAGE_LAYER]

    def latents_to_input(self, x: torch.Tensor, space: str) -> torch.Tensor:
        """Latents of `space` -> features of the input layer. Generators with one space take its
        latents as they are; style generators map Z and broadcast W (override)."""
        if space != self.spec.latent_spaces[0].space:
            raise InvalidArgument(f"{self.spec.architecture} has no latent space {space!r}")
        return x

    def map_latents(self, z: torch.Tensor, space: str) -> torch.Tensor:
        """Prior samples z -> latents of `space` (W via the mapping network). Override for W spaces."""
        if space != self.spec.latent_spaces[0].space:
            raise InvalidArgument(f"{self.spec.architecture} cannot map z to {space!r}")
        return z

    def synthesize(self, x: torch.Tensor, space: str) -> torch.Tensor:
        """Latents of any of the generator's spaces -> images in [-1, 1] (differentiable)."""
        return self(self.latents_to_input(x, space))

    def truncate(self, latents: torch.Tensor, space: str, psi: float, cutoff: int | None = None) -> torch.Tensor:
        """StyleGAN truncation towards the mean of W (override where the model tracks it)."""
        raise InvalidArgument(f"{self.spec.architecture} generators do not support truncation (no mapping network "
                              "and no w_avg); leave truncation_psi at 0 or 1")

    def sample(self, space: LatentSpaceSpec, count: int, seed: int, truncation_psi: float = 1.0,
               truncation_cutoff: int | None = None) -> np.ndarray:
        """Seeded latents of `space`: prior draws, mapped when the space has no known prior;
        truncated towards w_avg when `truncation_psi` != 1 (W and W+ only)."""
        truncated = truncation_psi != 1.0
        if space.prior == "normal" and not truncated:
            return sample_latents(space, count, seed)
        if truncated:
            self.truncate(torch.zeros(0, *space.shape), space.space, truncation_psi, truncation_cutoff)  # checks
        prior = next((s for s in self.spec.latent_spaces if s.prior == "normal"), None)
        if prior is None:
            raise InvalidArgument(f"{self.spec.architecture} has no space with a known prior to sample from")
        with torch.no_grad():
            z = torch.from_numpy(sample_latents(prior, count, seed))
            mapped = self.map_latents(z, space.space)
            if truncated:
                mapped = self.truncate(mapped, space.space, truncation_psi, truncation_cutoff)
            return mapped.numpy().astype(np.float32)


def sample_latents(space: LatentSpaceSpec, count: int, seed: int) -> np.ndarray:
    """Seeded draws from the space's N(0, I) prior: the same seed always gives the same latents."""
    if space.prior != "normal":
        raise InvalidArgument(f"space {space.space} has no known prior to sample from; sample Z and map it")
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.standard_normal((count, *space.shape), dtype=np.float32)


class WPlusInputGenerator(StagedGenerator):
    """A style generator whose input layer is W+ (`num_ws` rows): W+ latents go in as they are,
    W is broadcast over the rows and Z goes through the mapping network (`map_latents`)."""

    num_ws: int

    def latents_to_input(self, x: torch.Tensor, space: str) -> torch.Tensor:
        if space == "w+":
            return x
        if space == "w":
            return x[:, None, :].expand(-1, self.num_ws, -1)
        if space == "z":
            return self.map_latents(x, "w+")
        raise InvalidArgument(f"{self.spec.architecture} has no latent space {space!r}")

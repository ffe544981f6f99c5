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

INPUT_LAYER = "input"
IMAGE_LAYER = "image"


@dataclass(frozen=True)
class LatentSpaceSpec:
    space: str  # "z", "w" or "w+"
    dim: int
    num_ws: int = 1
    prior: str = ""  # "normal" for N(0, I); empty when unknown


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

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images; the form ONNX export and plain callers use."""
        return self.run(z, INPUT_LAYER, [IMAGE_LAYER])[IMAGE_LAYER]


def sample_latents(space: LatentSpaceSpec, count: int, seed: int) -> np.ndarray:
    """Seeded draws from the space's N(0, I) prior: the same seed always gives the same latents."""
    if space.prior != "normal":
        raise InvalidArgument(f"space {space.space} has no known prior to sample from; sample Z and map it")
    rng = np.random.Generator(np.random.PCG64(seed))
    shape = (count, space.dim) if space.num_ws == 1 else (count, space.num_ws, space.dim)
    return rng.standard_normal(shape, dtype=np.float32)

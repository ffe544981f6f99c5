"""Scorer heads' building blocks: named measurements of face images, each declared by a repository manifest.

A head entry (kind "head") names its implementation, its output schema and the repository
entries of the models it runs (kind "scorer-model"); a model shared by several heads (the
dlib 68-point predictor, MTCNN) is loaded once. Heads may depend on other heads' outputs
(the caption is built from pose, expression and age/gender), and every request computes each
head at most once. Images arrive as uint8 RGB [N, H, W, 3] of any size: each head resizes to
the size its networks were built for, and keypoints are reported in the caller's pixels.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from latentedit.errors import FailedPrecondition, InvalidArgument
from latentedit.repository import Entry

log = logging.getLogger(__name__)

HEAD_KIND = "head"
MODEL_KIND = "scorer-model"
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 32, 1024
# dlib and MTCNN were tuned on faces of this size; the DCGAN's 64 px faces are upscaled to it.
FACE_SIZE = 160
FACE_BOX = (8, 8, 152, 152)  # the faces are already cropped: a fixed box beats dlib's detectors


@dataclass(frozen=True)
class OutputSpec:
    name: str
    shape: tuple[int, ...]  # per image
    min: float = 0.0
    max: float = 0.0
    labels: tuple[str, ...] = ()
    description: str = ""

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> OutputSpec:
        return cls(
            name=data["name"],
            shape=tuple(int(d) for d in data.get("shape", [])),
            min=float(data.get("min", 0.0)),
            max=float(data.get("max", 0.0)),
            labels=tuple(data.get("labels", [])),
            description=data.get("description", ""),
        )


class Batch:
    """One request's images plus resized copies, made once and shared by every head."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images
        self._resized: dict[int, np.ndarray] = {}
        self._resized_mirrored: dict[int, np.ndarray] = {}
        self._cache: dict[Any, Any] = {}

    def cached(self, key: Any, compute: Callable[[], Any]) -> Any:
        """Work shared by several heads of one request (e.g. one face detection pass)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    @property
    def height(self) -> int:
        return self.images.shape[1]

    @property
    def width(self) -> int:
        return self.images.shape[2]

    def resized(self, size: int) -> np.ndarray:
        if size not in self._resized:
            if self.images.shape[1:3] == (size, size):
                self._resized[size] = self.images
            else:
                t = torch.from_numpy(self.images).permute(0, 3, 1, 2).float()
                t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
                self._resized[size] = t.round().clamp(0, 255).byte().permute(0, 2, 3, 1).contiguous().numpy()
        return self._resized[size]

    def resized_mirrored(self, size: int) -> np.ndarray:
        """The mirror of `resized(size)`: exactly the mirror of what a head sees. Resizing the
        mirrored original instead rounds differently at some pixels, and dlib-based heads
        amplify a one-level difference into years of age."""
        if size not in self._resized_mirrored:
            self._resized_mirrored[size] = np.ascontiguousarray(self.resized(size)[:, :, ::-1])
        return self._resized_mirrored[size]

    def to_square(self, points: np.ndarray) -> np.ndarray:
        """Points in the caller's pixels -> the unit square the heads' resized copies span.

        Geometry measured on the caller's points would change when a non-square image is
        stretched to a head's square input; in this frame it is what the head saw."""
        return points / np.array([self.width, self.height], np.float32)

    def to_caller_pixels(self, points: np.ndarray, size: int) -> np.ndarray:
        """Points measured on the `size` x `size` copy -> the caller's image pixels."""
        return points * np.array([self.width / size, self.height / size], np.float32)


@dataclass
class HeadResult:
    outputs: dict[str, np.ndarray]
    captions: list[str] = field(default_factory=list)


class Head(ABC):
    """One named head. Subclasses implement `compute`; the schema comes from the manifest."""

    requires: tuple[str, ...] = ()

    def __init__(self, entry: Entry, models: dict[str, Any]) -> None:
        self.entry = entry
        self.name = entry.name
        manifest = entry.manifest
        self.kind = manifest.get("head_kind", "attribute")
        self.outputs = [OutputSpec.from_manifest(o) for o in manifest.get("outputs", [])]
        self.differentiable = bool(manifest.get("differentiable", False))
        self.input_size = int(manifest.get("input_size", 0))
        self.description = manifest.get("description", "")
        self.models = models

    @abstractmethod
    def compute(self, batch: Batch, inputs: dict[str, HeadResult]) -> HeadResult:
        """Outputs for every image; `inputs` holds the results of the heads in `requires`."""


def check_images(images: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InvalidArgument(f"images: shape {list(images.shape)} must be [N, H, W, 3] (RGB)")
    if len(images) == 0:
        raise InvalidArgument("images: the batch is empty")
    side_min, side_max = min(images.shape[1:3]), max(images.shape[1:3])
    if side_min < MIN_IMAGE_SIDE or side_max > MAX_IMAGE_SIDE:
        raise InvalidArgument(
            f"images: size {images.shape[2]}x{images.shape[1]} is outside {MIN_IMAGE_SIDE}..{MAX_IMAGE_SIDE} px per side; "
            "images within it are resized to each head's input size"
        )


def package_dir(package: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition(f"package {package!r} is not installed; run scripts/setup.sh")
    return Path(next(iter(spec.submodule_search_locations)))


def offline_hub() -> None:
    """Nothing here may download at run time: make Hugging Face libraries fail instead."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

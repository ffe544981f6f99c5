"""SGF conditions: how scorer outputs become the condition vector c that F(z, c) is trained on.

Shared by the trainer (building (z, c) pairs) and the editor (measuring c after every step),
so both compute c the same way. Conditions are standardised with the training set's mean and
standard deviation, so one step size and tolerance fit attributes, keypoints and captions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from latentedit.attributes import Attribute

KINDS = ("attributes", "keypoints", "caption")


@dataclass
class ConditionSpec:
    kind: str
    attributes: list[Attribute] = field(default_factory=list)
    keypoints_head: str = ""
    image_size: int = 64  # keypoints are divided by it
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    @property
    def heads(self) -> list[str]:
        if self.kind == "attributes":
            return sorted({a.head for a in self.attributes})
        return [self.keypoints_head] if self.kind == "keypoints" else ["caption"]

    def raw(self, outputs: dict[str, dict[str, np.ndarray]]) -> np.ndarray:
        """Scorer outputs -> [N, k] unstandardised condition vectors."""
        if self.kind == "attributes":
            return np.stack([a.extract(outputs) for a in self.attributes], axis=1).astype(np.float32)
        if self.kind == "keypoints":
            points = outputs[self.keypoints_head]["points"]
            return (points / self.image_size).reshape(len(points), -1).astype(np.float32)
        return outputs["caption"]["embedding"].astype(np.float32)

    def fit(self, raw: np.ndarray) -> None:
        self.mean = raw.mean(axis=0).astype(np.float32)
        self.std = np.maximum(raw.std(axis=0), 1e-6).astype(np.float32)

    def standardise(self, raw: np.ndarray) -> np.ndarray:
        return ((raw - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "attributes": [a.to_dict() for a in self.attributes],
            "keypoints_head": self.keypoints_head,
            "image_size": self.image_size,
            "mean": self.mean.tolist() if self.mean is not None else None,
            "std": self.std.tolist() if self.std is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ConditionSpec:
        spec = cls(data["kind"], [Attribute.from_dict(a) for a in data.get("attributes", [])],
                   data.get("keypoints_head", ""), int(data.get("image_size", 64)))
        if data.get("mean") is not None:
            spec.mean = np.asarray(data["mean"], np.float32)
            spec.std = np.asarray(data["std"], np.float32)
        return spec

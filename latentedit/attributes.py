"""Scalar attributes picked out of scorer head outputs (AttributeRef -> one number per image).

Used by every method that trains on or targets an attribute: InterFaceGAN labels, SGF
conditions, W* classifiers, the editor's per-frame metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from latentedit.api.v1 import types_pb2
from latentedit.errors import InvalidArgument, NotFound


@dataclass(frozen=True)
class Attribute:
    head: str
    output: str
    index: int | None  # None for a scalar output
    label: str = ""

    @property
    def name(self) -> str:
        suffix = f".{self.label}" if self.label else f"[{self.index}]" if self.index is not None else ""
        return f"{self.head}.{self.output}{suffix}"

    def to_ref(self) -> types_pb2.AttributeRef:
        return types_pb2.AttributeRef(head=self.head, output=self.output, label=self.label, index=self.index or 0)

    def to_dict(self) -> dict:
        return {"head": self.head, "output": self.output, "label": self.label, "index": self.index}

    @classmethod
    def from_dict(cls, data: dict) -> Attribute:
        return cls(data["head"], data["output"], data.get("index"), data.get("label", ""))

    def extract(self, outputs: dict[str, dict[str, np.ndarray]]) -> np.ndarray:
        """{head: {output: array}} -> [N] float64 values of this attribute."""
        value = outputs[self.head][self.output]
        return (value if self.index is None else value[:, self.index]).astype(np.float64)


def resolve(ref: types_pb2.AttributeRef, heads, field: str = "attribute") -> Attribute:
    """Check an AttributeRef against the scorer's head schemas (`world.HeadInfo`: name and outputs)."""
    by_name = {h.name: h for h in heads}
    if ref.head not in by_name:
        raise NotFound(f"{field}.head {ref.head!r} is unknown; heads: {', '.join(sorted(by_name))}")
    outputs = {o.name: o for o in by_name[ref.head].outputs}
    if ref.output not in outputs:
        raise NotFound(f"{field}.output {ref.output!r} is not an output of head {ref.head!r}; outputs: {', '.join(outputs)}")
    schema = outputs[ref.output]
    shape = list(schema.shape)
    if not shape:
        return Attribute(ref.head, ref.output, None)
    if len(shape) != 1:
        raise InvalidArgument(f"{field}: {ref.head}.{ref.output} has shape {shape}; attributes must be scalars or vector entries")
    if ref.label:
        if ref.label not in schema.labels:
            raise NotFound(f"{field}.label {ref.label!r} is not a label of {ref.head}.{ref.output}; labels: {', '.join(schema.labels)}")
        return Attribute(ref.head, ref.output, list(schema.labels).index(ref.label), ref.label)
    if not 0 <= ref.index < shape[0]:
        raise InvalidArgument(f"{field}.index {ref.index} is out of range for {ref.head}.{ref.output} with {shape[0]} entries")
    return Attribute(ref.head, ref.output, ref.index)

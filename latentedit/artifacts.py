"""Trained artifacts in the model repository: how methods store and find what they trained."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from latentedit.errors import FailedPrecondition, NotFound
from latentedit.repository import Entry, ModelRepository

BOUNDARY_KIND = "boundary"
MAPPING_KIND = "mapping"
CORRELATION_KIND = "correlation-report"
PCA_KIND = "pca-directions"
DIRECTIONS_KIND = "directions"


def tensors_writer(filename: str, tensors: dict[str, Any]) -> Callable[[Path], None]:
    """A `populate(folder)` that stores `tensors` (numpy or torch) as one safetensors file."""

    def populate(folder: Path) -> None:
        converted = {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.detach().contiguous())
                     for k, v in tensors.items()}
        save_file(converted, str(folder / filename))

    return populate


def json_writer(filename: str, data: dict[str, Any]) -> Callable[[Path], None]:
    def populate(folder: Path) -> None:
        (folder / filename).write_text(json.dumps(data, indent=2))

    return populate


def load_tensors(entry: Entry, role: str) -> dict[str, torch.Tensor]:
    return load_file(str(entry.file(role)))


def resolve_trained(repo: ModelRepository, kind: str, what: str, name: str, version: int = 0, generator: str | None = None,
                    missing: type[Exception] = NotFound, hint: str = "") -> Entry:
    """A trained artifact of `kind`, checked to belong to `generator`; `missing` is raised when absent."""
    try:
        entry = repo.resolve(name, version, kind=kind)
    except NotFound as exc:
        available = ", ".join(e.name for e in repo.entries(kind)) or "none trained yet"
        raise missing(f"no {what} named {name!r}; available: {available}{hint}") from exc
    trained_for = entry.manifest.get("generator", {}).get("name")
    if generator is not None and trained_for != generator:
        raise FailedPrecondition(f"{what} {name!r} was trained for generator {trained_for!r}, not {generator!r}")
    return entry

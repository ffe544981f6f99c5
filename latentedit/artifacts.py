"""Trained artifacts in the model repository: written by the trainer, read by the editor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from latentedit.errors import FailedPrecondition, NotFound
from latentedit.methods.interfacegan import Boundary
from latentedit.repository import Entry, ModelRepository

BOUNDARY_KIND = "boundary"
MAPPING_KIND = "mapping"
CORRELATION_KIND = "correlation-report"


def write_boundary(repo: ModelRepository, name: str, boundary: Boundary, manifest: dict[str, Any]) -> Entry:
    """manifest: generator {name, version}, space, attribute, metrics, job_id, spec."""

    def populate(folder: Path) -> None:
        save_file(
            {"normal": torch.from_numpy(boundary.normal.astype(np.float32)), "offset": torch.tensor([boundary.offset], dtype=torch.float32)},
            str(folder / "boundary.safetensors"),
        )

    return repo.write(name, {**manifest, "kind": BOUNDARY_KIND, "files": {"boundary": "boundary.safetensors"}}, populate)


def _resolve_trained(repo: ModelRepository, kind: str, what: str, name: str, version: int, generator: str | None,
                     missing: type[Exception], hint: str = "") -> Entry:
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


def load_boundary(repo: ModelRepository, name: str, version: int = 0, generator: str | None = None) -> tuple[Boundary, Entry]:
    entry = _resolve_trained(repo, BOUNDARY_KIND, "boundary", name, version, generator, NotFound)
    tensors = load_file(str(entry.file("boundary")))
    return Boundary(tensors["normal"].numpy(), float(tensors["offset"][0])), entry


def write_report(repo: ModelRepository, name: str, kind: str, report: dict[str, Any], manifest: dict[str, Any]) -> Entry:
    def populate(folder: Path) -> None:
        (folder / "report.json").write_text(json.dumps(report, indent=2))

    return repo.write(name, {**manifest, "kind": kind, "files": {"report": "report.json"}}, populate)


def write_mapping(repo: ModelRepository, name: str, mapping, condition, manifest: dict[str, Any]) -> Entry:
    """An SGF auxiliary mapping F: its weights, architecture and condition definition."""

    def populate(folder: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in mapping.state_dict().items()}, str(folder / "mapping.safetensors"))

    return repo.write(name, {**manifest, "kind": MAPPING_KIND, "config": mapping.config(), "coefficient": mapping.coefficient,
                             "condition": condition.to_dict(), "files": {"mapping": "mapping.safetensors"}}, populate)


def load_mapping(repo: ModelRepository, name: str, version: int = 0, generator: str | None = None):
    """(AuxiliaryMapping in eval mode, ConditionSpec, Entry)."""
    from latentedit.conditions import ConditionSpec
    from latentedit.methods.sgf import AuxiliaryMapping

    # A missing mapping is a precondition (train it first), not an unknown name in the request.
    entry = _resolve_trained(repo, MAPPING_KIND, "trained SGF mapping", name, version, generator, FailedPrecondition,
                             "; train one with a mapping job")
    mapping = AuxiliaryMapping(**entry.manifest["config"], coefficient=float(entry.manifest["coefficient"]))
    mapping.load_state_dict(load_file(str(entry.file("mapping"))))
    return mapping.eval(), ConditionSpec.from_dict(entry.manifest["condition"]), entry

"""Loads a generator from a repository entry by its manifest's `architecture`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from latentedit.errors import FailedPrecondition
from latentedit.models.dcgan import load_dcgan
from latentedit.models.generator import StagedGenerator
from latentedit.models.mapped import ARCHITECTURE as MAPPED_DCGAN
from latentedit.models.mapped import load_mapped_dcgan
from latentedit.models.stylegan2 import ARCHITECTURE as STYLEGAN2
from latentedit.models.stylegan2 import load_stylegan2
from latentedit.repository import Entry

GENERATOR_LOADERS: dict[str, Callable[[Path, dict, str], StagedGenerator]] = {
    "dcgan": load_dcgan,
    MAPPED_DCGAN: load_mapped_dcgan,
    STYLEGAN2: load_stylegan2,
}


def load_generator(entry: Entry) -> StagedGenerator:
    architecture = entry.manifest.get("architecture", "")
    loader = GENERATOR_LOADERS.get(architecture)
    if loader is None:
        raise FailedPrecondition(
            f"{entry.name} v{entry.version}: architecture {architecture!r} has no loader; known: {', '.join(GENERATOR_LOADERS)}"
        )
    weights = entry.manifest.get("files", {}).get("weights")
    if not weights or not weights.endswith(".safetensors"):
        raise FailedPrecondition(f"{entry.name} v{entry.version}: weights must be a .safetensors file (no pickles are loaded)")
    model = loader(entry.path, entry.manifest.get("config", {}), weights)
    for p in model.parameters():
        p.requires_grad_(False)
    return model

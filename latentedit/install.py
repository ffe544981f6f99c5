"""Puts the embedded default models (see MODELS.md) into the model repository.

Idempotent: an entry whose recorded source checksum matches the installed package is kept,
so a second run only reads a few manifests.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from latentedit.errors import FailedPrecondition
from latentedit.models.dcgan import DCGANGenerator
from latentedit.repository import Entry, ModelRepository, file_sha256

DEFAULT_GENERATOR = "dcgan-faces"


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition(f"package {package!r} is not installed; run the set-up script (scripts/setup.sh)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FailedPrecondition(f"{package} is installed but has no {relative}")
    return path


def install_dcgan_faces(repo: ModelRepository, log: Callable[[str], None] = print) -> Entry:
    source = _package_file("gan_face_generate", "weights.tar")
    source_sha = file_sha256(source)
    if repo.versions(DEFAULT_GENERATOR):
        current = repo.resolve(DEFAULT_GENERATOR)
        if current.manifest.get("provenance", {}).get("source_sha256") == source_sha:
            log(f"  {DEFAULT_GENERATOR} v{current.version}: up to date")
            return current
    # weights_only=True: the checkpoint is a plain state dict; never execute pickled code.
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    model = DCGANGenerator()
    model.main.load_state_dict(
        {k.removeprefix("main."): v for k, v in checkpoint["netG_state_dict"].items()}, strict=True
    )
    manifest = {
        "kind": "generator",
        "architecture": "dcgan",
        "config": {"latent_dim": 100, "feature_maps": 64, "channels": 3},
        "files": {"weights": "weights.safetensors"},
        "provenance": {
            "source": "PyPI package gan-face-generate 1.1.1, file gan_face_generate/weights.tar, key netG_state_dict",
            "source_sha256": source_sha,
            "training_data": "DigiFace-1M (synthetic faces; non-commercial research licence as far as known)",
            "licence_note": "package MIT; check the training data's terms before commercial use",
        },
    }

    def populate(folder: Path) -> None:
        save_file(model.state_dict_for_export(), str(folder / "weights.safetensors"))

    entry = repo.write(DEFAULT_GENERATOR, manifest, populate)
    log(f"  {DEFAULT_GENERATOR} v{entry.version}: installed from gan-face-generate")
    return entry


def install_defaults(repo: ModelRepository, log: Callable[[str], None] = print) -> list[Entry]:
    log(f"installing default models into {repo.root}")
    return [install_dcgan_faces(repo, log)]

"""The model repository: a directory of versioned models and trained artifacts.

Layout (a volume in Kubernetes)::

    <root>/<name>/<version>/manifest.json   what it is, how to load it, where it came from
    <root>/<name>/<version>/<files>         weights (safetensors), exports, reports
    <root>/.cache/                          derived files (ONNX exports, TensorRT engines)

Versions are positive integers; version 0 in a request means "the newest". A version is
written into a hidden temporary folder and renamed into place, so readers never see a half
written entry, and two writers never get the same version. Readers scan the directory on
every lookup (a handful of `listdir` calls), so new versions appear without restarts.
Weights are stored as safetensors: nothing here ever unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentedit.errors import AlreadyExists, InvalidArgument, NotFound, shown
from latentedit.limits import LIMITS

MANIFEST = "manifest.json"
# The one pattern for every name that reaches the file system (models, artifacts, job ids),
# for reads and writes alike: one path component, never '.', '..', '/', NUL or upper case,
# so each entry has exactly one spelling and no name leaves the repository.
_NAME = re.compile(rf"[a-z0-9][a-z0-9._-]{{0,{LIMITS.name_chars - 1}}}")


@dataclass(frozen=True)
class Entry:
    """One version of one model or artifact."""

    name: str
    version: int
    path: Path
    manifest: dict[str, Any] = field(compare=False)

    @property
    def kind(self) -> str:
        return str(self.manifest.get("kind", ""))

    def file(self, role: str) -> Path:
        """Path of the file the manifest lists under `files.<role>`."""
        try:
            return self.path / self.manifest["files"][role]
        except KeyError as exc:
            raise NotFound(f"{self.name} v{self.version}: manifest lists no '{role}' file") from exc


def validate_name(name: str, field: str = "name") -> str:
    """`name` if it is a valid repository name; INVALID_ARGUMENT naming `field` otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        if isinstance(name, str) and len(name) > LIMITS.name_chars:
            why = f"{len(name)} characters, over the limit of {LIMITS.name_chars}"
        elif isinstance(name, str) and not name:
            why = "it is empty"
        else:
            why = "it is not one path component of the allowed characters"
        raise InvalidArgument(
            f"{field} {shown(name)} is not valid ({why}): use 1-{LIMITS.name_chars} lowercase letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return name


class ModelRepository:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def cache_dir(self) -> Path:
        path = self.root / ".cache"
        path.mkdir(exist_ok=True)
        return path

    # ---- reading ----------------------------------------------------------------------------

    def names(self, kind: str | None = None) -> list[str]:
        """Names that have at least one complete version (optionally one of `kind`).

        Folders whose names are not valid repository names (made by hand) are ignored."""
        found = []
        for child in sorted(self.root.iterdir()):
            if not child.is_dir() or not _NAME.fullmatch(child.name):
                continue
            if self._newest(child.name, self._versions(child.name), kind) is not None:
                found.append(child.name)
        return found

    def versions(self, name: str) -> list[int]:
        return self._versions(validate_name(name))

    def _versions(self, name: str) -> list[int]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir()
                      if p.name.isascii() and p.name.isdigit() and (p / MANIFEST).is_file())

    def _newest(self, name: str, versions: list[int], kind: str | None) -> Entry | None:
        """The newest version of `name` (of `kind`, when given: another kind never shadows it)."""
        for version in reversed(versions):
            entry = self._read(name, version)
            if kind is None or entry.kind == kind:
                return entry
        return None

    def kinds(self, name: str) -> set[str]:
        """The kinds the versions of `name` hold (one, unless written before kinds were checked)."""
        return {self._read(name, v).kind for v in self.versions(name)}

    def resolve(self, name: str, version: int = 0, *, kind: str | None = None) -> Entry:
        """The entry for (name, version); version 0 is the newest (of `kind`, when given).

        INVALID_ARGUMENT for a name outside the one pattern (paths, '..', NUL, over-long);
        NOT_FOUND when there is no such entry."""
        if not name:
            raise InvalidArgument("model name is empty; call ListModels for the available names")
        validate_name(name, f"{kind or 'model'} name")
        if version < 0:
            raise InvalidArgument(f"version {version} is negative; use 0 for the newest or a version number")
        versions = self._versions(name)
        if not versions:
            available = ", ".join(self.names(kind)) or "none installed (run: latentedit models install)"
            raise NotFound(f"no {kind or 'model'} named {name!r}; available: {available}")
        if version == 0:
            entry = self._newest(name, versions, kind)
            if entry is None:
                raise NotFound(f"{name!r} is a {self._read(name, versions[-1]).kind or 'untyped entry'}, not a {kind}")
            return entry
        if version not in versions:
            raise NotFound(f"{name!r} has no version {version}; versions: {versions}")
        entry = self._read(name, version)
        if kind is not None and entry.kind != kind:
            raise NotFound(f"{name!r} v{version} is a {entry.kind or 'untyped entry'}, not a {kind}")
        return entry

    def entries(self, kind: str | None = None) -> list[Entry]:
        """The newest version of every name (optionally the newest of one kind)."""
        return [self.resolve(n, kind=kind) for n in self.names(kind)]

    def check_writable(self, name: str, kind: str) -> None:
        """ALREADY_EXISTS if `name` holds entries of another kind: kinds do not share names, so
        a new artifact can never shadow a generator, a scorer head or another kind's artifact."""
        validate_name(name)
        others = sorted(k or "untyped entry" for k in self.kinds(name) if k != kind)
        if others:
            raise AlreadyExists(f"name {name!r} already holds a {' and a '.join(others)}; a {kind or 'untyped entry'} "
                                "cannot be written under it (each name holds one kind): choose another name")

    def _read(self, name: str, version: int) -> Entry:
        path = self.root / name / str(version)
        with open(path / MANIFEST, encoding="utf-8") as f:
            return Entry(name=name, version=version, path=path, manifest=json.load(f))

    # ---- writing ----------------------------------------------------------------------------

    def write(self, name: str, manifest: dict[str, Any], populate: Callable[[Path], None]) -> Entry:
        """Add a new version of `name`: `populate(folder)` writes the files, then it appears at once.

        The manifest gets `name`, `version`, `created_at` and the sha256 of each listed file.
        """
        kind = str(manifest.get("kind", ""))
        self.check_writable(name, kind)
        (self.root / name).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.root))
        try:
            populate(staging)
            full = dict(manifest)
            full["name"] = name
            full["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            full["sha256"] = {role: file_sha256(staging / rel) for role, rel in full.get("files", {}).items()}
            while True:
                version = (self.versions(name) or [0])[-1] + 1
                full["version"] = version
                _write_json(staging / MANIFEST, full)
                self.check_writable(name, kind)  # again: another writer may have taken the name meanwhile
                try:
                    # rename fails if another writer took this version first; then try the next.
                    os.rename(staging, self.root / name / str(version))
                except OSError:
                    if (self.root / name / str(version)).exists():
                        continue
                    raise
                return self._read(name, version)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def cache_path(self, subdir: str, key: str, suffix: str) -> Path:
        validate_name(subdir, "cache folder")
        validate_name(key, "cache key")
        folder = self.cache_dir / subdir
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{key}{suffix}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old content or the new, never a part."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

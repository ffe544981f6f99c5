"""The method registry: one line per paper. The trainer, the editor, ListEdits, the evaluation
and the CLI find methods here by name."""

from __future__ import annotations

from latentedit.errors import InvalidArgument, Unimplemented
from latentedit.methods.base import Method
from latentedit.methods.dplase import DPLaSE
from latentedit.methods.ganspace import GANSpace
from latentedit.methods.interfacegan import InterFaceGAN
from latentedit.methods.sgf import SGF
from latentedit.methods.wstar import WStar

METHODS: dict[str, Method] = {m.name: m for m in (InterFaceGAN(), SGF(), GANSpace(), DPLaSE(), WStar())}

# Methods whose slots exist in the API (messages, job specs) but whose modules are not built yet.
PLANNED: dict[str, str] = {}
PLANNED_JOBS: dict[str, str] = {}


def method(name: str | None) -> Method:
    """The method of an EditRequest's `method` field."""
    if name in METHODS:
        return METHODS[name]
    available = ", ".join(METHODS)
    if name in PLANNED:
        raise Unimplemented(f"{PLANNED[name]} are not available yet; available: {available}")
    raise InvalidArgument(f"method: choose one of {available}")


def for_job(kind: str | None) -> Method:
    """The method that trains a StartJobRequest's `spec` field."""
    for candidate in METHODS.values():
        if kind in candidate.jobs:
            return candidate
    available = ", ".join(k for m in METHODS.values() for k in m.jobs)
    if kind in PLANNED_JOBS:
        raise Unimplemented(f"{kind} jobs ({PLANNED_JOBS[kind]}) are not available yet; available: {available}")
    raise InvalidArgument(f"spec: set one job spec ({available})")

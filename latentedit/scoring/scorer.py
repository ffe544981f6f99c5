"""The scorer: loads every head in the repository and scores batches with any subset of them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from latentedit.errors import FailedPrecondition, NotFound
from latentedit.repository import ModelRepository
from latentedit.scoring.base import HEAD_KIND, MODEL_KIND, Batch, Head, HeadResult, check_images
from latentedit.scoring.heads import HEAD_TYPES, MODEL_LOADERS

log = logging.getLogger(__name__)


class Scorer:
    """Loads every head in the repository and scores batches with any subset of them."""

    def __init__(self, repo: ModelRepository, text_embedder_model: str = "minilm") -> None:
        self.repo = repo
        self.text_embedder_model = text_embedder_model
        self._models: dict[tuple[str, int], Any] = {}
        self._heads: dict[str, Head] = {}
        self._lock = threading.Lock()

    # loading ----------------------------------------------------------------------------------

    def refresh(self) -> list[str]:
        """Load heads that are new (or have a new version) in the repository."""
        for entry in self.repo.entries(HEAD_KIND):
            current = self._heads.get(entry.name)
            if current is not None and current.entry.version == entry.version:
                continue
            implementation = entry.manifest.get("implementation", "")
            head_type = HEAD_TYPES.get(implementation)
            if head_type is None:
                log.error("head %s: unknown implementation %r; known: %s", entry.name, implementation, ", ".join(HEAD_TYPES))
                continue
            try:
                models = {role: self._model(name) for role, name in entry.manifest.get("models", {}).items()}
                head = head_type(entry, models)
            except Exception:  # noqa: BLE001 - one broken head must not take the others down
                log.exception("head %s v%d failed to load", entry.name, entry.version)
                continue
            with self._lock:
                self._heads[entry.name] = head
            log.info("head %s v%d loaded (%s)", entry.name, entry.version, implementation)
        return sorted(self._heads)

    def _model(self, name: str) -> Any:
        entry = self.repo.resolve(name, kind=MODEL_KIND)
        key = (entry.name, entry.version)
        if key not in self._models:
            loader = MODEL_LOADERS.get(entry.manifest.get("format", ""))
            if loader is None:
                raise FailedPrecondition(f"scorer model {name}: unknown format {entry.manifest.get('format')!r}")
            self._models[key] = loader(entry)
        return self._models[key]

    @property
    def heads(self) -> dict[str, Head]:
        return dict(self._heads)

    def text_embedder(self):
        return self._model(self.text_embedder_model)

    # scoring ----------------------------------------------------------------------------------

    def check_heads(self, names: Sequence[str]) -> list[str]:
        heads = self.heads
        chosen = list(dict.fromkeys(names)) if names else sorted(heads)
        unknown = [n for n in chosen if n not in heads]
        if unknown:
            raise NotFound(f"unknown head(s) {unknown}; heads: {', '.join(sorted(heads)) or 'none loaded'}")
        return chosen

    def score(self, images: np.ndarray, names: Sequence[str] = ()) -> dict[str, HeadResult]:
        """uint8 RGB [N, H, W, 3] -> results of the named heads (all heads when none named)."""
        chosen = self.check_heads(names)
        check_images(images)
        heads = self.heads
        batch = Batch(images)
        done: dict[str, HeadResult] = {}

        def run(name: str, trail: tuple[str, ...] = ()) -> HeadResult:
            if name in done:
                return done[name]
            if name in trail:
                raise FailedPrecondition(f"head dependency cycle: {' -> '.join((*trail, name))}")
            head = heads.get(name)
            if head is None:
                raise FailedPrecondition(f"a head needs head {name!r}, which is not loaded")
            inputs = {dep: run(dep, (*trail, name)) for dep in head.requires}
            done[name] = head.compute(batch, inputs)
            return done[name]

        return {name: run(name) for name in chosen}

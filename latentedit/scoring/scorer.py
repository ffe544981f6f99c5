"""The scorer: loads every head in the repository and scores batches with any subset of them."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from latentedit import observability as obs
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
        # (version, reason) of heads that failed to load or warm up: not retried until a new version.
        self._failed: dict[str, tuple[int, str]] = {}
        self._heads_changed = threading.Condition(self._lock)  # notified whenever a head loads or fails

    # loading ----------------------------------------------------------------------------------

    def refresh(self) -> list[str]:
        """Load heads that are new (or have a new version) in the repository."""
        for entry in self.repo.entries(HEAD_KIND):
            current = self._heads.get(entry.name)
            if current is not None and current.entry.version == entry.version:
                continue
            if self._failed.get(entry.name, (0, ""))[0] == entry.version:
                continue
            implementation = entry.manifest.get("implementation", "")
            head_type = HEAD_TYPES.get(implementation)
            if head_type is None:
                self._fail(entry.name, entry.version, f"unknown implementation {implementation!r}; known: {', '.join(HEAD_TYPES)}")
                continue
            try:
                started = time.perf_counter()
                models = {role: self._model(name) for role, name in entry.manifest.get("models", {}).items()}
                head = head_type(entry, models)
                obs.observe_model_load("head", time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - one broken head must not take the others down
                log.debug("head %s v%d failed to load", entry.name, entry.version, exc_info=True)
                self._fail(entry.name, entry.version, str(exc))
                continue
            with self._lock:
                self._heads[entry.name] = head
                self._heads_changed.notify_all()
            log.info("head %s v%d loaded (%s)", entry.name, entry.version, implementation)
        return sorted(self._heads)

    def _model(self, name: str) -> Any:
        entry = self.repo.resolve(name, kind=MODEL_KIND)
        key = (entry.name, entry.version)
        if key not in self._models:
            loader = MODEL_LOADERS.get(entry.manifest.get("format", ""))
            if loader is None:
                raise FailedPrecondition(f"scorer model {name}: unknown format {entry.manifest.get('format')!r}")
            started = time.perf_counter()
            self._models[key] = loader(entry)
            obs.observe_model_load("scorer_model", time.perf_counter() - started)
        return self._models[key]

    @property
    def heads(self) -> dict[str, Head]:
        return dict(self._heads)

    def reject(self, name: str, reason: str) -> None:
        """Unload a head that loaded but cannot score (e.g. its warm-up failed)."""
        head = self._heads.get(name)
        if head is not None:
            self._fail(name, head.entry.version, reason)

    def _fail(self, name: str, version: int, reason: str) -> None:
        log.error("head %s v%d not served: %s", name, version, reason)
        with self._lock:
            current = self._heads.get(name)
            if current is not None and current.entry.version == version:
                del self._heads[name]
            self._failed[name] = (version, reason)
            self._heads_changed.notify_all()

    def load_failure(self, name: str) -> str | None:
        """Why the newest tried version of head `name` is not served (None: no failure)."""
        failed = self._failed.get(name)
        return None if failed is None else failed[1]

    def wait_for_head(self, name: str, version: int = 0, timeout_s: float = 30.0) -> bool:
        """Block until head `name` is loaded (at `version` or newer; 0: any); False on timeout."""
        with self._heads_changed:
            return self._heads_changed.wait_for(
                lambda: name in self._heads and self._heads[name].entry.version >= version, timeout=timeout_s
            )

    def wait_for_failure(self, name: str, timeout_s: float = 30.0) -> bool:
        """Block until head `name` has failed to load or warm up; False on timeout."""
        with self._heads_changed:
            return self._heads_changed.wait_for(lambda: name in self._failed, timeout=timeout_s)

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

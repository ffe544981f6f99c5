"""Loaded generators: one per (name, version), each with its backends and batchers.

The newest version of every generator in the repository is loaded and warmed at start-up; a
poll thread loads new versions as they appear (no restart), and older versions load on first
use.

Memory is bounded: at most `max_loaded_models` (name, version) pairs stay loaded (config
`generator.max_loaded_models`, default MAX_LOADED_MODELS); loading one more unloads the least
recently used. Start-up and the poll load the newest versions of at most that many generators
(the default model first); others load on first use. An unloaded model's batchers finish what
is queued and end; a call that already holds it still completes (run unbatched in the
caller's thread), and its memory is freed when the last such call ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from generator_svc.backends import (
    BACKEND_NAMES,
    BACKENDS_BY_NAME,
    GeneratorBackend,
    OnnxRuntimeBackend,
    TensorRTBackend,
    TorchBackend,
    cached_onnx_export,
    cuda_available,
    tensorrt_available,
)
from latentedit import observability as obs
from latentedit.api.v1 import types_pb2
from latentedit.batching import DynamicBatcher, result_within
from latentedit.config import GeneratorConfig
from latentedit.errors import FailedPrecondition, InvalidArgument
from latentedit.latents import Latents, LatentSpaceSpec
from latentedit.models.generator import StagedGenerator
from latentedit.models.registry import load_generator
from latentedit.repository import Entry, ModelRepository
from latentedit.rpc.serving import PeriodicTask

log = logging.getLogger(__name__)
GENERATOR_KIND = "generator"
# Default bound on loaded (name, version) pairs when the config does not set max_loaded_models.
MAX_LOADED_MODELS = 4


@dataclass
class LoadedGenerator:
    entry: Entry
    model: StagedGenerator
    cpu_model: StagedGenerator  # the CPU copy for the mapping network (the torch backend may move `model`)
    backends: dict[int, GeneratorBackend]
    default_backend: int
    config: GeneratorConfig
    _batchers: dict[tuple, DynamicBatcher] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Unloaded from the pool: no batchers any more; calls still holding it run unbatched, one at a time.
    _retired: bool = False
    _direct_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def spec(self):
        return self.model.spec

    def sample(self, space: LatentSpaceSpec, count: int, seed: int, truncation_psi: float = 1.0) -> np.ndarray:
        """Seeded latents of `space` (W and W+ through the mapping network, on the CPU copy),
        truncated towards w_avg when `truncation_psi` != 1 (the model's cutoff in W+)."""
        return self.cpu_model.sample(space, count, seed, truncation_psi)

    def to_input(self, latents: Latents) -> np.ndarray:
        """Latents of any space -> input-layer features (mapping Z, broadcasting W), float32."""
        if latents.space == self.spec.latent_spaces[0] and latents.space.shape == self.spec.layers[0].shape:
            return latents.values
        with torch.inference_mode():
            return self.cpu_model.latents_to_input(torch.from_numpy(latents.values), latents.space.space).numpy()

    def backend_order(self) -> list[int]:
        return [self.default_backend, *sorted(k for k in self.backends if k != self.default_backend)]

    def choose_backend(self, requested: int, from_layer: str, to_layers: Sequence[str]) -> GeneratorBackend:
        if requested not in (types_pb2.BACKEND_UNSPECIFIED, *BACKEND_NAMES):
            raise InvalidArgument(f"backend {requested} is unknown; allowed: {', '.join(BACKEND_NAMES.values())}")
        if requested != types_pb2.BACKEND_UNSPECIFIED and requested not in self.backends:
            available = ", ".join(BACKEND_NAMES[k] for k in self.backend_order())
            raise FailedPrecondition(f"backend {BACKEND_NAMES[requested]} is not available here; available: {available}")
        preferred = self.default_backend if requested == types_pb2.BACKEND_UNSPECIFIED else requested
        backend = self.backends[preferred]
        if backend.supports(from_layer, to_layers):
            return backend
        # Feature-layer paths exist only in the staged torch graph.
        return self.backends[types_pb2.BACKEND_TORCH]

    def run(
        self,
        backend: GeneratorBackend,
        x: np.ndarray,
        from_layer: str,
        to_layers: Sequence[str],
        timeout_s: float,
        on_abandon: Callable[[Callable[[], None]], object] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run `x` in the batcher of this path and wait (DeadlineExceeded after `timeout_s`)."""
        future = self.submit(backend, x, from_layer, to_layers, timeout_s)
        if on_abandon is not None:
            on_abandon(future.cancel)
        return result_within(future, timeout_s)

    def submit(
        self,
        backend: GeneratorBackend,
        x: np.ndarray,
        from_layer: str,
        to_layers: Sequence[str],
        timeout_s: float | None = None,
    ) -> Future:
        """Queue `x` in the batcher of this path without waiting (see `batching.result_within`);
        `timeout_s` is the caller's remaining deadline (admission and dropping, see batching.py)."""
        with self._lock:  # one step with close(): a batcher is never used after its model is unloaded
            if not self._retired:
                return self._batcher(backend, from_layer, to_layers).submit(x, timeout_s)
        return self._run_directly(backend, x, from_layer, list(to_layers))

    def _run_directly(self, backend: GeneratorBackend, x: np.ndarray, from_layer: str, to_layers: list[str]) -> Future:
        future: Future = Future()
        future.set_running_or_notify_cancel()
        try:
            with self._direct_lock:
                future.set_result(backend.run(x, from_layer, to_layers))
        except BaseException as exc:  # noqa: BLE001 - the caller hears it through the future
            future.set_exception(exc)
        return future

    def batcher(self, backend_kind: int, from_layer: str, to_layers: Sequence[str]) -> DynamicBatcher | None:
        """The batcher of one path once a request has used it (its stats and queue are observable)."""
        with self._lock:
            return self._batchers.get((backend_kind, from_layer, tuple(to_layers)))

    def _batcher(self, backend: GeneratorBackend, from_layer: str, to_layers: Sequence[str]) -> DynamicBatcher:
        """The batcher of this path, made on first use (call with self._lock held)."""
        key = (backend.kind, from_layer, tuple(to_layers))
        batcher = self._batchers.get(key)
        if batcher is None:
            layers = list(to_layers)
            batcher = DynamicBatcher.from_config(lambda rows: backend.run(rows, from_layer, layers), self.config,
                                                 f"batch-{self.entry.name}-v{self.entry.version}-{backend.name}", "generator")
            self._batchers[key] = batcher
        return batcher

    def warm_up(self) -> None:
        """One small batch through every backend so the first real call pays no set-up cost."""
        latent = np.zeros((2, *self.spec.layers[0].shape), np.float32)
        for backend in self.backends.values():
            backend.run(latent, self.spec.layers[0].name, [self.spec.layers[-1].name])

    def close(self, wait: bool = True) -> None:
        """Unload: batchers take no more work; queued work is computed, then their threads end.

        `wait`: block until they have ended. Without it (LRU eviction) only idle batchers are
        waited for; busy ones end by themselves once their queue is empty."""
        with self._lock:
            self._retired = True
            batchers = list(self._batchers.values())
            self._batchers.clear()
        for batcher in batchers:
            batcher.close(wait=False)
        for batcher in batchers:
            if wait or batcher.idle:
                batcher.join(5)


def resolve_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if cuda_available() else "cpu"
    if setting == "cuda" and not cuda_available():
        raise RuntimeError("config.generator.device is cuda, but CUDA is not available")
    return setting


class GeneratorPool:
    def __init__(self, repo: ModelRepository, config: GeneratorConfig, max_loaded: int | None = None) -> None:
        """`max_loaded`: the LRU bound (default: config `max_loaded_models`, else MAX_LOADED_MODELS)."""
        self.repo = repo
        self.config = config
        self.device = resolve_device(config.device)
        if max_loaded is None:
            max_loaded = config.max_loaded_models
        self.max_loaded = max(1, max_loaded)
        # Least recently used first.
        self._loaded: OrderedDict[tuple[str, int], LoadedGenerator] = OrderedDict()
        self._lock = threading.Lock()  # guards _loaded (held briefly)
        self._load_lock = threading.Lock()  # one load at a time (slow: export, warm-up)
        self._poller: PeriodicTask | None = None
        self.evictions = 0

    def get(self, name: str, version: int = 0) -> LoadedGenerator:
        """The loaded (name, version); an empty name means the configured default model."""
        entry = self.repo.resolve(name or self.config.default_model, version, kind=GENERATOR_KIND)
        key = (entry.name, entry.version)
        loaded = self._lookup(key)
        if loaded is not None:
            return loaded
        with self._load_lock:
            loaded = self._lookup(key)
            if loaded is not None:
                return loaded
            started = time.perf_counter()
            loaded = self._load(entry)
            obs.observe_model_load(GENERATOR_KIND, time.perf_counter() - started)
            with self._lock:
                self._loaded[key] = loaded
                evicted = []
                while len(self._loaded) > self.max_loaded:
                    evicted.append(self._loaded.popitem(last=False))
            obs.MODELS_LOADED.labels(GENERATOR_KIND).inc()
        for (old_name, old_version), old in evicted:
            log.info("unloading generator %s v%d (least recently used; at most %d loaded)", old_name, old_version,
                     self.max_loaded)
            old.close(wait=False)
            self.evictions += 1
            obs.MODELS_LOADED.labels(GENERATOR_KIND).dec()
            obs.MODEL_EVICTIONS.labels(GENERATOR_KIND).inc()
        return loaded

    def _lookup(self, key: tuple[str, int]) -> LoadedGenerator | None:
        with self._lock:
            loaded = self._loaded.get(key)
            if loaded is not None:
                self._loaded.move_to_end(key)
            return loaded

    def loaded_keys(self) -> list[tuple[str, int]]:
        """(name, version) of every loaded model, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def refresh(self) -> list[LoadedGenerator]:
        """Load the newest version of every generator in the repository (of at most
        `max_loaded` generators, the default first, so the poll never cycles the LRU)."""
        names = self.repo.names(GENERATOR_KIND)
        names = sorted(names, key=lambda n: n != self.config.default_model)[: self.max_loaded]
        return [self.get(name) for name in names]

    def _load(self, entry: Entry) -> LoadedGenerator:
        log.info("loading generator %s v%d on %s", entry.name, entry.version, self.device)
        model = load_generator(entry)
        cpu_model = load_generator(entry) if self.device != "cpu" else model
        backends: dict[int, GeneratorBackend] = {}
        weights_sha = entry.manifest.get("sha256", {}).get("weights", f"{entry.name}-{entry.version}")
        onnx_path = None
        try:
            onnx_path = cached_onnx_export(model, self.repo, weights_sha, self.config.onnx_opset)
            backends[types_pb2.BACKEND_ONNXRUNTIME] = OnnxRuntimeBackend(onnx_path, self.config.threads)
        except Exception as exc:  # noqa: BLE001 - a model that cannot export still serves on torch
            log.warning("%s v%d: ONNX Runtime backend unavailable: %s", entry.name, entry.version, exc)
        if onnx_path is not None and tensorrt_available() and self.config.backend in ("auto", "tensorrt"):
            try:
                backends[types_pb2.BACKEND_TENSORRT] = TensorRTBackend(
                    onnx_path, self.repo, model.spec.layers[0].shape, self.config.max_batch_size, self.config.cuda_fp16
                )
            except Exception as exc:  # noqa: BLE001
                log.warning("%s v%d: TensorRT backend unavailable: %s", entry.name, entry.version, exc)
        backends[types_pb2.BACKEND_TORCH] = TorchBackend(model, self.device, fp16=self.config.cuda_fp16)
        default = self._default_backend(backends)
        loaded = LoadedGenerator(entry, model, cpu_model, backends, default, self.config)
        loaded.warm_up()
        log.info(
            "generator %s v%d ready; backends: %s (default %s)",
            entry.name,
            entry.version,
            ", ".join(BACKEND_NAMES[k] for k in loaded.backend_order()),
            BACKEND_NAMES[default],
        )
        return loaded

    def _default_backend(self, backends: dict[int, GeneratorBackend]) -> int:
        setting = self.config.backend
        if setting == "auto":
            if types_pb2.BACKEND_TENSORRT in backends:
                return types_pb2.BACKEND_TENSORRT
            if self.device == "cuda" or types_pb2.BACKEND_ONNXRUNTIME not in backends:
                return types_pb2.BACKEND_TORCH
            return types_pb2.BACKEND_ONNXRUNTIME
        if setting not in BACKENDS_BY_NAME:
            raise ValueError(f"config.generator.backend {setting!r} is unknown; use auto, {', '.join(BACKENDS_BY_NAME)}")
        if BACKENDS_BY_NAME[setting] not in backends:
            raise RuntimeError(f"config.generator.backend is {setting}, but that backend could not be set up here")
        return BACKENDS_BY_NAME[setting]

    def start_polling(self, on_refresh: Callable[[list[LoadedGenerator]], None] | None = None) -> None:
        """Scan the repository every poll interval; `on_refresh` gets what is loaded after each scan."""

        def scan() -> None:
            loaded = self.refresh()
            if on_refresh is not None:
                on_refresh(loaded)

        self._poller = PeriodicTask("repo-poll", self.config.poll_interval_s, scan)

    def close(self) -> None:
        if self._poller is not None:
            self._poller.stop()
        with self._lock:
            loaded_models = list(self._loaded.values())
            self._loaded.clear()
        for loaded in loaded_models:
            loaded.close()
            obs.MODELS_LOADED.labels(GENERATOR_KIND).dec()

"""The World port: everything a method needs from generators and scorers, in one interface.

Methods train and edit against a `World` and never know whether the models run in this
process (`LocalWorld`: benchmarks, evaluation, tests, the CLI's --in-process) or behind the
services (`latentedit.rpc.remote_world.RemoteWorld`: the trainer and the editor, every call
carrying the caller's remaining deadline and cancellable). Latents always travel with their
space (`Latents`), so Z, W and W+ go through the same calls.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from latentedit.errors import NotFound
from latentedit.latents import Latents, LatentSpaceSpec
from latentedit.models.generator import IMAGE_LAYER, INPUT_LAYER, GeneratorSpec, StagedGenerator
from latentedit.repository import ModelRepository
from latentedit.scoring.base import OutputSpec
from latentedit.wire import float_to_uint8_images

# {head: {output: [N, ...] array}}; a caption head's sentences under the output "captions".
Scores = dict[str, dict[str, np.ndarray]]
GENERATOR_KIND = "generator"


@dataclass(frozen=True)
class GeneratorInfo:
    """A resolved generator: the exact version every call of one job or edit goes to."""

    name: str
    version: int
    spec: GeneratorSpec

    def space(self, name: str | None = None) -> LatentSpaceSpec:
        return self.spec.space(name)


@dataclass(frozen=True)
class HeadInfo:
    name: str
    kind: str
    outputs: tuple[OutputSpec, ...]
    differentiable: bool = False


class World(Protocol):
    def generator(self, name: str = "", version: int = 0) -> GeneratorInfo:
        """Resolve a generator (empty name: the default; version 0: the newest)."""
        ...

    def sample(self, generator: GeneratorInfo, count: int, seed: int, space: str | None = None) -> Latents:
        """Seeded latents of `space` (default: the generator's first space, its prior)."""
        ...

    def generator_module(self, generator: GeneratorInfo) -> StagedGenerator:
        """The torch generator in this process, for training that needs gradients through it
        (no gRPC call carries them): loaded from the model repository by name and version."""
        ...

    def synthesize(self, generator: GeneratorInfo, latents: Latents) -> np.ndarray:
        """Latents -> uint8 NHWC images."""
        ...

    def features(self, generator: GeneratorInfo, latents: Latents, layers: Sequence[str]) -> dict[str, np.ndarray]:
        """Latents -> float32 features at the named layers."""
        ...

    def synthesize_from(self, generator: GeneratorInfo, layer: str, features: np.ndarray) -> np.ndarray:
        """Features at `layer` -> uint8 NHWC images (the generator's G2)."""
        ...

    def heads(self) -> list[HeadInfo]:
        ...

    def score(self, images: np.ndarray, heads: Sequence[str]) -> Scores:
        ...

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        ...


class LocalWorld:
    """The World on in-process models loaded from the repository (torch, batched)."""

    def __init__(self, repo: ModelRepository, default_generator: str = "dcgan-faces", batch: int = 256, scorer=None) -> None:
        self.repo = repo
        self.default_generator = default_generator
        self.batch = batch
        self._scorer = scorer
        self._models: dict[tuple[str, int], StagedGenerator] = {}
        self._lock = threading.Lock()

    # generators ---------------------------------------------------------------------------

    def generator(self, name: str = "", version: int = 0) -> GeneratorInfo:
        entry = self.repo.resolve(name or self.default_generator, version, kind=GENERATOR_KIND)
        return GeneratorInfo(entry.name, entry.version, self.model(entry.name, entry.version).spec)

    def model(self, name: str, version: int) -> StagedGenerator:
        """The torch generator (loaded once); for what no gRPC call carries, such as gradients."""
        from latentedit.models.registry import load_generator

        key = (name, version)
        with self._lock:
            if key not in self._models:
                self._models[key] = load_generator(self.repo.resolve(name, version, kind=GENERATOR_KIND))
            return self._models[key]

    def _model(self, generator: GeneratorInfo) -> StagedGenerator:
        return self.model(generator.name, generator.version)

    def generator_module(self, generator: GeneratorInfo) -> StagedGenerator:
        return self.model(generator.name, generator.version)

    def sample(self, generator: GeneratorInfo, count: int, seed: int, space: str | None = None) -> Latents:
        spec = generator.space(space)
        return Latents(spec, self._model(generator).sample(spec, count, seed))

    def _run(self, generator: GeneratorInfo, x: np.ndarray, space: str | None, from_layer: str, to_layers: Sequence[str]):
        model = self._model(generator)
        outputs: dict[str, list[np.ndarray]] = {name: [] for name in to_layers}
        with torch.inference_mode():
            for start in range(0, len(x), self.batch):
                chunk = torch.from_numpy(np.ascontiguousarray(x[start : start + self.batch]))
                if space is not None:
                    chunk = model.latents_to_input(chunk, space)
                for name, value in model.run(chunk, from_layer, to_layers).items():
                    outputs[name].append(value.numpy())
        return {name: np.concatenate(values) for name, values in outputs.items()}

    def synthesize(self, generator: GeneratorInfo, latents: Latents) -> np.ndarray:
        floats = self._run(generator, latents.values, latents.space.space, INPUT_LAYER, [IMAGE_LAYER])[IMAGE_LAYER]
        return float_to_uint8_images(floats)

    def features(self, generator: GeneratorInfo, latents: Latents, layers: Sequence[str]) -> dict[str, np.ndarray]:
        return self._run(generator, latents.values, latents.space.space, INPUT_LAYER, layers)

    def synthesize_from(self, generator: GeneratorInfo, layer: str, features: np.ndarray) -> np.ndarray:
        return float_to_uint8_images(self._run(generator, features.astype(np.float32), None, layer, [IMAGE_LAYER])[IMAGE_LAYER])

    # scorer -------------------------------------------------------------------------------

    @property
    def scorer(self):
        with self._lock:
            if self._scorer is None:
                from latentedit.scoring.scorer import Scorer

                self._scorer = Scorer(self.repo)
                self._scorer.refresh()
            return self._scorer

    def heads(self) -> list[HeadInfo]:
        return [HeadInfo(name, head.kind, tuple(head.outputs), head.differentiable) for name, head in sorted(self.scorer.heads.items())]

    def score(self, images: np.ndarray, heads: Sequence[str]) -> Scores:
        if not heads:
            return {}
        results: list[Scores] = []
        for start in range(0, len(images), self.batch):
            scored = self.scorer.score(images[start : start + self.batch], list(heads))
            results.append({name: {**r.outputs, **({"captions": np.array(r.captions, dtype=object)} if r.captions else {})}
                            for name, r in scored.items()})
        return {head: {key: np.concatenate([r[head][key] for r in results]) for key in results[0][head]} for head in results[0]}

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        return self.scorer.text_embedder().embed(list(texts))


def require_heads(world: World, names: Sequence[str], field: str = "score_heads") -> list[str]:
    """The distinct head names, each checked against the world's heads (NOT_FOUND names them all)."""
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return []
    known = [h.name for h in world.heads()]
    unknown = [h for h in wanted if h not in known]
    if unknown:
        raise NotFound(f"{field}: unknown head(s) {unknown}; heads: {', '.join(known)}")
    return wanted

"""EditorService: orchestrates generator_svc and scorer_svc over gRPC and streams each frame.

Every downstream call carries the time left before the caller's deadline, is skipped once
the caller has gone, and is cancelled if the caller goes while it is in flight. A dependency
that is down turns into UNAVAILABLE naming it.
"""

from __future__ import annotations

import threading

import grpc
import numpy as np
import torch

from latentedit import wire
from latentedit.api.v1 import (
    editor_pb2,
    editor_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    scorer_pb2,
    scorer_pb2_grpc,
    trainer_pb2,
    types_pb2,
)
from latentedit.artifacts import BOUNDARY_KIND, load_boundary, load_mapping
from latentedit.client import dependency, outputs_by_head, score_request, synthesize_request
from latentedit.config import EditorConfig
from latentedit.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unimplemented,
)
from latentedit.methods import interfacegan as ifg
from latentedit.methods.inversion import invert
from latentedit.methods.sgf import sgf_edit
from latentedit.models.generator import StagedGenerator
from latentedit.models.registry import load_generator
from latentedit.repository import ModelRepository
from latentedit.serving import deadline_seconds

FLOAT_DTYPES = [types_pb2.DATA_TYPE_FP32, types_pb2.DATA_TYPE_FP16, types_pb2.DATA_TYPE_FP64]


class Downstream:
    """Calls to the generator and scorer on behalf of one client RPC."""

    def __init__(self, servicer: EditorServicer, context: grpc.ServicerContext) -> None:
        self.s = servicer
        self.context = context
        self._in_flight: grpc.Future | None = None
        context.add_callback(self._cancel_in_flight)

    def _cancel_in_flight(self) -> None:
        if self._in_flight is not None:
            self._in_flight.cancel()

    def _call(self, name: str, address: str, method, request):
        if not self.context.is_active():
            raise Cancelled("the caller cancelled the edit")
        timeout = deadline_seconds(self.context)
        if timeout <= 0:
            raise DeadlineExceeded("the caller's deadline passed before the edit finished")
        with dependency(name, address):
            self._in_flight = method.future(request, timeout=timeout)
            try:
                return self._in_flight.result()
            except grpc.FutureCancelledError as exc:
                raise Cancelled("the caller cancelled the edit") from exc
            finally:
                self._in_flight = None

    def sample(self, generator: types_pb2.ModelRef, count: int, seed: int) -> tuple[np.ndarray, types_pb2.ModelRef]:
        response = self._call("generator", self.s.generator_address, self.s.generator.Sample,
                              generator_pb2.SampleRequest(model=generator, count=count, seed=seed))
        return wire.from_tensor(response.latents.values, field="latents"), response.model

    def synthesize(self, generator: types_pb2.ModelRef, latents: np.ndarray) -> np.ndarray:
        request = synthesize_request(generator, latents)
        response = self._call("generator", self.s.generator_address, self.s.generator.Synthesize, request)
        return wire.decode_images(response.images)

    def score(self, images: np.ndarray, heads: list[str]) -> list[types_pb2.HeadOutput]:
        request = score_request(images, heads)
        return list(self._call("scorer", self.s.scorer_address, self.s.scorer.Score, request).heads)

    def list_heads(self) -> list[str]:
        response = self._call("scorer", self.s.scorer_address, self.s.scorer.ListHeads, scorer_pb2.ListHeadsRequest())
        return [h.name for h in response.heads]


class EditorServicer(editor_pb2_grpc.EditorServiceServicer):
    def __init__(self, repo: ModelRepository, config: EditorConfig, generator_channel, generator_address: str,
                 scorer_channel, scorer_address: str) -> None:
        self.repo = repo
        self.config = config
        self.generator = generator_pb2_grpc.GeneratorServiceStub(generator_channel)
        self.generator_address = generator_address
        self.scorer = scorer_pb2_grpc.ScorerServiceStub(scorer_channel)
        self.scorer_address = scorer_address
        self._local_generators: dict[tuple[str, int], StagedGenerator] = {}
        self._lock = threading.Lock()

    # ---- ListEdits --------------------------------------------------------------------------

    def ListEdits(self, request, context):
        name = request.generator.name
        edits = []
        for entry in self.repo.entries(BOUNDARY_KIND):
            if name and entry.manifest.get("generator", {}).get("name") != name:
                continue
            attribute = entry.manifest.get("attribute", {})
            edits.append(editor_pb2.EditableArtifact(
                artifact=trainer_pb2.ArtifactRef(ref=types_pb2.ModelRef(name=entry.name, version=entry.version),
                                                 kind=trainer_pb2.ARTIFACT_KIND_BOUNDARY),
                attributes=[types_pb2.AttributeRef(head=attribute.get("head", ""), output=attribute.get("output", ""),
                                                   label=attribute.get("label", ""), index=attribute.get("index") or 0)],
                space=types_pb2.LATENT_SPACE_Z,
                metrics={k: float(v) for k, v in entry.manifest.get("metrics", {}).items()},
                job_id=entry.manifest.get("job_id", ""),
            ))
        return editor_pb2.ListEditsResponse(edits=edits)

    # ---- Edit -------------------------------------------------------------------------------

    def Edit(self, request, context):
        method = request.WhichOneof("method")
        if method is None:
            raise InvalidArgument("method: choose one of interfacegan, wstar, dplase, sgf")
        if method not in ("interfacegan", "sgf"):
            raise Unimplemented(f"{method} edits are not available yet; available: interfacegan, sgf")
        if request.image_encoding not in types_pb2.ImageEncoding.values():
            raise InvalidArgument(f"image_encoding {request.image_encoding} is unknown")
        frames = request.num_frames or 8
        if not 1 <= frames <= self.config.max_frames:
            raise InvalidArgument(f"num_frames {frames} must be in 1..{self.config.max_frames}")
        down = Downstream(self, context)
        heads = list(dict.fromkeys(request.score_heads))
        if heads:
            known = down.list_heads()
            unknown = [h for h in heads if h not in known]
            if unknown:
                raise NotFound(f"score_heads: unknown head(s) {unknown}; heads: {', '.join(known)}")
        start, generator = self._start(request, down)
        if method == "sgf":
            yield from self._sgf(request, down, start, generator, heads)
            return
        spec = request.interfacegan
        boundary, _ = load_boundary(self.repo, spec.boundary, generator=generator.name)
        condition_boundaries = [load_boundary(self.repo, name, generator=generator.name)[0] for name in spec.condition_boundaries]
        conditions = [b.normal for b in condition_boundaries]
        if spec.boundary in spec.condition_boundaries:
            raise InvalidArgument("condition_boundaries: the edited boundary cannot also be a condition")
        if boundary.normal.shape[0] != start.reshape(len(start), -1).shape[1]:
            raise FailedPrecondition(f"boundary {spec.boundary!r} has dimension {boundary.normal.shape[0]}, the latents {start.shape[1:]}")
        direction = ifg.conditioned_direction(boundary.normal, conditions)
        distances = np.linspace(spec.start_distance, spec.end_distance, frames)
        path = ifg.trajectory(start, direction, distances, boundary if spec.from_boundary else None)
        for index, (distance, latents) in enumerate(zip(distances, path)):
            images = down.synthesize(generator, latents)
            frame = editor_pb2.EditFrame(index=index, latents=types_pb2.Latents(space=types_pb2.LATENT_SPACE_Z, values=wire.to_tensor(latents)))
            if not request.omit_images:
                frame.images.CopyFrom(wire.encode_images(images, request.image_encoding))
            if heads:
                frame.scores.extend(down.score(images, heads))
            frame.metrics["distance"] = float(distance)
            frame.metrics["mean_boundary_distance"] = float(boundary.distance(latents).mean())
            for name, condition in zip(spec.condition_boundaries, condition_boundaries):
                frame.metrics[f"condition_distance/{name}"] = float(condition.distance(latents).mean())
            if index == frames - 1:
                frame.stop_reason = editor_pb2.STOP_REASON_COMPLETED
            yield frame

    def _sgf(self, request, down: Downstream, start: np.ndarray, generator: types_pb2.ModelRef, heads: list[str]):
        """SGF Algorithm 1: each Euler step is synthesized, scored and streamed as a frame."""
        spec = request.sgf
        mapping, condition, _ = load_mapping(self.repo, spec.mapping, generator=generator.name)
        target_kind = spec.WhichOneof("target")
        if target_kind is None:
            raise InvalidArgument("sgf.target: give attribute values, keypoints or a caption")
        expected = {"attributes": "attributes", "keypoints": "keypoints", "caption": "caption"}[target_kind]
        if condition.kind != expected:
            raise FailedPrecondition(f"mapping {spec.mapping!r} was trained on {condition.kind} conditions; the target is {target_kind}")
        step_size = spec.step_size or 0.2
        order = spec.neumann_order if spec.neumann_order > 0 else 1
        steps = spec.max_steps or 20
        tolerance = spec.tolerance or 0.1
        if not 0 < step_size <= 1 or not 0 <= order <= 10 or not 1 <= steps <= self.config.max_frames or tolerance <= 0:
            raise InvalidArgument("sgf: step_size must be in (0, 1], neumann_order in 0..10, max_steps in "
                                  f"1..{self.config.max_frames}, tolerance > 0")
        caption_target = None
        if target_kind == "caption":
            text = spec.caption.text
            if not text.strip():
                raise InvalidArgument("sgf.caption.text is empty; give a sentence such as 'a smiling young woman'")
            response = down._call("scorer", self.scorer_address, self.scorer.EmbedText, scorer_pb2.EmbedTextRequest(texts=[text]))
            caption_target = wire.from_tensor(response.embeddings, field="embeddings")[0]
        last: dict = {}

        def measure(z: torch.Tensor) -> torch.Tensor:
            images = down.synthesize(generator, z.numpy())
            heads_needed = list(dict.fromkeys([*condition.heads, *heads]))
            outputs = down.score(images, heads_needed)
            decoded = outputs_by_head(outputs)
            last.update(images=images, scores=[h for h in outputs if h.head in heads], raw=condition.raw(decoded))
            return torch.from_numpy(condition.standardise(last["raw"]))

        z0 = torch.from_numpy(start.astype(np.float32))
        first = measure(z0)
        target_raw, mask = self._sgf_target(spec, target_kind, condition, last["raw"], caption_target)
        target = torch.from_numpy(condition.standardise(target_raw))
        for step in sgf_edit(mapping, measure, z0, target, step_size, order, steps, tolerance, torch.from_numpy(mask), first):
            frame = editor_pb2.EditFrame(index=step.index, latents=types_pb2.Latents(space=types_pb2.LATENT_SPACE_Z,
                                                                                    values=wire.to_tensor(step.latents.numpy())))
            if not request.omit_images:
                frame.images.CopyFrom(wire.encode_images(last["images"], request.image_encoding))
            frame.scores.extend(last["scores"])
            frame.metrics["distance_to_target"] = float(step.distance.mean())
            frame.metrics["reached"] = float((step.distance <= tolerance).float().mean())
            if step.done:
                frame.stop_reason = {"target_reached": editor_pb2.STOP_REASON_TARGET_REACHED, "diverged": editor_pb2.STOP_REASON_DIVERGED}.get(
                    step.reason, editor_pb2.STOP_REASON_STEP_LIMIT)
            yield frame

    @staticmethod
    def _sgf_target(spec, kind: str, condition, current_raw: np.ndarray, caption_target) -> tuple[np.ndarray, np.ndarray]:
        """Target condition (raw units) per sample and the mask of entries that are targeted."""
        target = current_raw.copy()
        mask = np.zeros(current_raw.shape[1], np.float32)
        if kind == "attributes":
            if not spec.attributes.values:
                raise InvalidArgument("sgf.attributes.values is empty; name at least one attribute and its target value")
            names = [a.name for a in condition.attributes]
            for value in spec.attributes.values:
                ref = value.attribute
                matches = [i for i, a in enumerate(condition.attributes)
                           if a.head == ref.head and a.output == ref.output and (a.label == ref.label if ref.label else a.index in (None, ref.index))]
                if not matches:
                    raise NotFound(f"attribute {ref.head}.{ref.output}{'.' + ref.label if ref.label else ''} is not one the mapping "
                                   f"was trained on; attributes: {', '.join(names)}")
                if not np.isfinite(value.value):
                    raise InvalidArgument("sgf.attributes.values: target values must be finite")
                target[:, matches[0]] = value.value
                mask[matches[0]] = 1.0
            return target, mask
        if kind == "keypoints":
            points = wire.from_tensor(spec.keypoints.points, field="sgf.keypoints.points", dtypes=FLOAT_DTYPES)
            count = current_raw.shape[1] // 2
            if points.ndim == 2:
                points = np.broadcast_to(points, (len(current_raw), *points.shape))
            if points.ndim != 3 or points.shape[1:] != (count, 2) or points.shape[0] != len(current_raw):
                raise InvalidArgument(f"sgf.keypoints.points: shape {list(points.shape)}; this mapping needs [{count}, 2] or "
                                      f"[N={len(current_raw)}, {count}, 2] points in image pixels")
            return (points / condition.image_size).reshape(len(current_raw), -1).astype(np.float32), np.ones_like(mask)
        return np.broadcast_to(caption_target, current_raw.shape).astype(np.float32), np.ones_like(mask)

    def _start(self, request, down: Downstream) -> tuple[np.ndarray, types_pb2.ModelRef]:
        which = request.WhichOneof("start")
        if which is None:
            raise InvalidArgument("start: give a seed or latents")
        if which == "seed":
            count = request.seed.count or 1
            if not 1 <= count <= self.config.max_batch:
                raise (InvalidArgument if count < 1 else ResourceExhausted)(f"seed.count {count} must be in 1..{self.config.max_batch}")
            return down.sample(request.generator, count, request.seed.seed)
        if request.latents.space not in (types_pb2.LATENT_SPACE_UNSPECIFIED, types_pb2.LATENT_SPACE_Z):
            raise InvalidArgument("latents.space: InterFaceGAN boundaries here live in LATENT_SPACE_Z")
        latents = wire.from_tensor(request.latents.values, field="latents.values", dtypes=FLOAT_DTYPES).astype(np.float32)
        if latents.ndim != 2 or not 1 <= len(latents) <= self.config.max_batch:
            raise InvalidArgument(f"latents.values: shape {list(latents.shape)} must be [N, dim] with N in 1..{self.config.max_batch}")
        # Resolve the generator (and check the latent width) with one cheap sample call.
        prior, generator = down.sample(request.generator, 1, 0)
        if prior.shape[1] != latents.shape[1]:
            raise InvalidArgument(f"latents.values: width {latents.shape[1]} does not match {generator.name}'s {prior.shape[1]}")
        return latents, generator

    # ---- Invert -----------------------------------------------------------------------------

    def Invert(self, request, context):
        generator = self._local_generator(request.generator)
        spec = generator.spec
        images = wire.decode_images(request.images, field="images")
        if len(images) > self.config.max_batch:
            raise ResourceExhausted(f"images: {len(images)} images, more than the limit {self.config.max_batch}")
        if request.space not in (types_pb2.LATENT_SPACE_UNSPECIFIED, types_pb2.LATENT_SPACE_Z):
            raise InvalidArgument("space: inversion here targets LATENT_SPACE_Z")
        steps = request.steps or 300
        if not 1 <= steps <= self.config.max_invert_steps:
            raise InvalidArgument(f"steps {steps} must be in 1..{self.config.max_invert_steps}")
        rate = request.learning_rate or 0.1
        if not 0 < rate <= 1:
            raise InvalidArgument(f"learning_rate {rate:g} must be in (0, 1]")
        every = request.report_every or 10
        targets = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if targets.shape[-1] != spec.resolution or targets.shape[-2] != spec.resolution:
            targets = torch.nn.functional.interpolate(targets, size=(spec.resolution, spec.resolution), mode="bilinear",
                                                      align_corners=False, antialias=True)
        updates: list[editor_pb2.InvertProgress] = []

        def progress(step: int, errors: np.ndarray) -> bool:
            updates.append(editor_pb2.InvertProgress(step=step, total_steps=steps, reconstruction_error=wire.to_tensor(errors)))
            return context.is_active()

        # Optimisation runs in this thread; progress messages go out as they are produced.
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(
            out=invert(generator, targets, steps, rate, int(request.seed), report_every=every, progress=progress)), daemon=True)
        worker.start()
        sent = 0
        while worker.is_alive() or sent < len(updates):
            worker.join(0.05)
            while sent < len(updates):
                yield updates[sent]
                sent += 1
            if not context.is_active():
                return
        latents, errors = result["out"]
        with torch.no_grad():
            reconstructions = wire.float_to_uint8_images(generator(torch.from_numpy(latents)).numpy())
        yield editor_pb2.InvertProgress(
            step=steps, total_steps=steps, reconstruction_error=wire.to_tensor(errors), done=True,
            latents=types_pb2.Latents(space=types_pb2.LATENT_SPACE_Z, values=wire.to_tensor(latents)),
            reconstructions=wire.encode_images(reconstructions, types_pb2.IMAGE_ENCODING_RAW_UINT8),
        )

    def _local_generator(self, ref: types_pb2.ModelRef) -> StagedGenerator:
        entry = self.repo.resolve(ref.name or self.config.default_generator, ref.version, kind="generator")
        key = (entry.name, entry.version)
        with self._lock:
            if key not in self._local_generators:
                self._local_generators[key] = load_generator(entry)
            return self._local_generators[key]

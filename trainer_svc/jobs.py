"""Job kinds: spec validation (at StartJob, so bad specs fail fast) and the job bodies.

The bodies fetch samples, images and scores from generator_svc and scorer_svc over gRPC in
batches (deployed, that work fans out over the scaled-out services) and call the shared
method code in `latentedit.methods`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.json_format import MessageToDict

from latentedit import attributes, wire
from latentedit.api.v1 import generator_pb2, trainer_pb2, types_pb2
from latentedit.artifacts import CORRELATION_KIND, load_boundary, write_boundary, write_mapping, write_report
from latentedit.client import GeneratorClient, ScorerClient, dependency, synthesize_request
from latentedit.conditions import ConditionSpec
from latentedit.errors import FailedPrecondition, InvalidArgument, NotFound, Unimplemented
from latentedit.methods import interfacegan as ifg
from latentedit.repository import ModelRepository, validate_name
from trainer_svc.runner import JobBody, JobContext

MIN_SAMPLES = 100
MIN_PER_CLASS = 10
MAX_SAMPLES = 10_000_000
SPACE_NAMES = {types_pb2.LATENT_SPACE_Z: "z", types_pb2.LATENT_SPACE_W: "w", types_pb2.LATENT_SPACE_W_PLUS: "w+"}


@dataclass
class Dependencies:
    repo: ModelRepository
    generator: GeneratorClient
    generator_address: str
    scorer: ScorerClient
    scorer_address: str

    def generator_info(self, ref: types_pb2.ModelRef):
        """The generator's ModelInfo (resolving an empty name to the service's default)."""
        with dependency("generator", self.generator_address):
            models = self.generator.stub.ListModels(generator_pb2.ListModelsRequest(), timeout=30).models
        # An empty name is the service's default model: ask the service which one that is.
        wanted = ref.name or self.sample(ref, 1, 0)[1].name
        for info in models:
            if info.ref.name == wanted and (ref.version in (0, info.ref.version) or ref.version in info.versions):
                return info
        raise NotFound(f"no generator named {wanted!r} (version {ref.version or 'newest'}); generators: {', '.join(m.ref.name for m in models)}")

    def sample(self, ref: types_pb2.ModelRef, count: int, seed: int) -> tuple[np.ndarray, types_pb2.ModelRef]:
        with dependency("generator", self.generator_address):
            response = self.generator.stub.Sample(generator_pb2.SampleRequest(model=ref, count=count, seed=seed), timeout=60)
        return wire.from_tensor(response.latents.values, field="latents"), response.model

    def images(self, ref: types_pb2.ModelRef, latents: np.ndarray) -> np.ndarray:
        with dependency("generator", self.generator_address):
            return wire.decode_images(self.generator.stub.Synthesize(synthesize_request(ref, latents), timeout=300).images)

    def score(self, images: np.ndarray, heads: list[str]) -> dict[str, dict[str, np.ndarray]]:
        with dependency("scorer", self.scorer_address):
            return self.scorer.score(images, heads)

    def heads(self):
        with dependency("scorer", self.scorer_address):
            return self.scorer.list_heads()


def _options(options: trainer_pb2.TrainingOptions, default_batch: int = 256) -> tuple[int, int]:
    batch = options.batch_size or default_batch
    if not 1 <= batch <= 1024:
        raise InvalidArgument(f"options.batch_size {batch} must be in 1..1024")
    return batch, int(options.seed)


def _artifact_name(options: trainer_pb2.TrainingOptions, fallback: str) -> str:
    return validate_name(options.artifact_name or fallback)


def _batch_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) % (2**63)


# ---- InterFaceGAN boundary ----------------------------------------------------------------------


@dataclass
class BoundaryParams:
    spec: trainer_pb2.BoundaryJobSpec
    generator: types_pb2.ModelRef
    attribute: attributes.Attribute
    quality: attributes.Attribute | None
    num_samples: int
    keep: int
    batch: int
    seed: int
    name: str
    deps: Dependencies


def validate_boundary(spec: trainer_pb2.BoundaryJobSpec, deps: Dependencies) -> BoundaryParams:
    num = spec.num_samples or 2000
    if not MIN_SAMPLES <= num <= MAX_SAMPLES:
        raise InvalidArgument(f"num_samples {num} must be in {MIN_SAMPLES}..{MAX_SAMPLES}")
    fraction = spec.keep_fraction or 0.1
    if not 0.0 < fraction <= 0.5:
        raise InvalidArgument(f"keep_fraction {fraction:g} must be in (0, 0.5]")
    keep = int(num * fraction)
    if keep < MIN_PER_CLASS:
        raise InvalidArgument(
            f"num_samples {num} with keep_fraction {fraction:g} keeps {keep} samples per side; at least {MIN_PER_CLASS} are needed"
        )
    if not 0.0 <= spec.validation_fraction < 1.0:
        raise InvalidArgument(f"validation_fraction {spec.validation_fraction:g} must be in [0, 1)")
    if spec.svm_c < 0:
        raise InvalidArgument(f"svm_c {spec.svm_c:g} must be positive")
    if spec.space not in (types_pb2.LATENT_SPACE_UNSPECIFIED, types_pb2.LATENT_SPACE_Z):
        raise InvalidArgument("space: boundary jobs sample the generator's prior; only LATENT_SPACE_Z is supported")
    heads = deps.heads()
    attribute = attributes.resolve(spec.attribute, heads, "attribute")
    quality = attributes.resolve(spec.quality_attribute, heads, "quality_attribute") if spec.quality_attribute.head else None
    info = deps.generator_info(spec.generator)
    batch, seed = _options(spec.options)
    name = _artifact_name(spec.options, f"{info.ref.name}-{attribute.name.replace('.', '-').replace('[', '').replace(']', '')}".lower())
    return BoundaryParams(spec, info.ref, attribute, quality, num, keep, batch, seed, name, deps)


def run_boundary(ctx: JobContext, p: BoundaryParams) -> trainer_pb2.ArtifactRef:
    keeper = ifg.ExtremeKeeper(p.keep)
    scores = np.full(p.num_samples, np.nan)
    heads = sorted({p.attribute.head} | ({p.quality.head} if p.quality else set()))
    for index, start in enumerate(range(0, p.num_samples, p.batch)):
        ctx.check()
        count = min(p.batch, p.num_samples - start)
        latents, _ = p.deps.sample(p.generator, count, _batch_seed(p.seed, index))
        outputs = p.deps.score(p.deps.images(p.generator, latents), heads)
        values = p.attribute.extract(outputs)
        if p.quality is not None:
            good = p.quality.extract(outputs) >= p.spec.quality_min
            latents, values_kept = latents[good], values[good]
            values = np.where(good, values, np.nan)
        else:
            values_kept = values
        keeper.add(values_kept, latents)
        scores[start : start + count] = values
        ctx.report("sampling and scoring", 0.85 * (start + count) / p.num_samples,
                   message=f"scored {start + count}/{p.num_samples} samples")
    ctx.check()
    ctx.report("fitting the SVM", 0.87)
    kept_latents, labels, kept_scores = keeper.dataset()
    if p.spec.HasField("threshold"):
        labels = (kept_scores > p.spec.threshold).astype(np.int64)
    fit = ifg.fit_boundary(kept_latents, labels, p.spec.validation_fraction or 0.3, p.spec.svm_c or 1.0, p.seed)
    # Accuracy on all samples: regenerate their latents from the seeds (nothing was kept).
    ctx.report("measuring accuracy on all samples", 0.9)
    finite = np.isfinite(scores)
    threshold = float(p.spec.threshold) if p.spec.HasField("threshold") else float(np.median(scores[finite]))
    correct = 0
    for index, start in enumerate(range(0, p.num_samples, p.batch)):
        ctx.check()
        count = min(p.batch, p.num_samples - start)
        latents, _ = p.deps.sample(p.generator, count, _batch_seed(p.seed, index))
        batch_scores = scores[start : start + count]
        ok = np.isfinite(batch_scores)
        predicted = fit.boundary.distance(latents[ok]) > 0
        correct += int(np.sum(predicted == (batch_scores[ok] > threshold)))
    metrics = {
        "validation_accuracy": fit.validation_accuracy,
        "train_accuracy": fit.train_accuracy,
        "all_samples_accuracy": correct / max(int(finite.sum()), 1),
        "num_samples": float(p.num_samples),
        "num_kept": float(len(kept_latents)),
        "score_threshold": threshold,
    }
    ctx.report("writing the boundary", 0.98, metrics)
    entry = write_boundary(p.deps.repo, p.name, fit.boundary, {
        "generator": {"name": p.generator.name, "version": p.generator.version},
        "space": "z",
        "attribute": p.attribute.to_dict(),
        "metrics": metrics,
        "job_id": ctx.job_id,
        "spec": MessageToDict(p.spec),
    })
    return trainer_pb2.ArtifactRef(ref=types_pb2.ModelRef(name=entry.name, version=entry.version), kind=trainer_pb2.ARTIFACT_KIND_BOUNDARY)


# ---- custom boundary -----------------------------------------------------------------------------


@dataclass
class CustomBoundaryParams:
    spec: trainer_pb2.CustomBoundaryJobSpec
    generator: types_pb2.ModelRef
    latents: np.ndarray
    labels: np.ndarray
    name: str
    deps: Dependencies


def validate_custom_boundary(spec: trainer_pb2.CustomBoundaryJobSpec, deps: Dependencies) -> CustomBoundaryParams:
    info = deps.generator_info(spec.generator)
    dim = info.latent_spaces[0].dim
    latents = wire.from_tensor(spec.latents.values, field="latents.values", shape=[None, dim])
    labels = wire.from_tensor(spec.labels, field="labels")
    if labels.ndim != 1 or len(labels) != len(latents):
        raise InvalidArgument(f"labels: {labels.size} labels for {len(latents)} latents; give one label (0 or 1) per latent")
    values = set(np.unique(labels.astype(np.float64)).tolist())
    if not values <= {0.0, 1.0}:
        raise InvalidArgument(f"labels must be 0 or 1; found {sorted(values)[:5]}")
    if min(int((labels > 0).sum()), int((labels <= 0).sum())) < MIN_PER_CLASS:
        raise InvalidArgument(f"labels: each class needs at least {MIN_PER_CLASS} latents")
    if not 0.0 <= spec.validation_fraction < 1.0:
        raise InvalidArgument(f"validation_fraction {spec.validation_fraction:g} must be in [0, 1)")
    attribute = spec.attribute_name or "custom"
    name = _artifact_name(spec.options, f"{info.ref.name}-{attribute}".lower())
    return CustomBoundaryParams(spec, info.ref, latents, (labels > 0).astype(np.int64), name, deps)


def run_custom_boundary(ctx: JobContext, p: CustomBoundaryParams) -> trainer_pb2.ArtifactRef:
    ctx.report("fitting the SVM", 0.2)
    fit = ifg.fit_boundary(p.latents, p.labels, p.spec.validation_fraction or 0.3, p.spec.svm_c or 1.0, int(p.spec.options.seed))
    metrics = {
        "validation_accuracy": fit.validation_accuracy,
        "train_accuracy": fit.train_accuracy,
        "all_samples_accuracy": ifg.accuracy(fit.boundary, p.latents, p.labels),
        "num_samples": float(len(p.latents)),
    }
    ctx.report("writing the boundary", 0.9, metrics)
    entry = write_boundary(p.deps.repo, p.name, fit.boundary, {
        "generator": {"name": p.generator.name, "version": p.generator.version},
        "space": "z",
        "attribute": {"head": "", "output": p.spec.attribute_name or "custom", "label": "", "index": None},
        "metrics": metrics,
        "job_id": ctx.job_id,
    })
    return trainer_pb2.ArtifactRef(ref=types_pb2.ModelRef(name=entry.name, version=entry.version), kind=trainer_pb2.ARTIFACT_KIND_BOUNDARY)


# ---- correlation report (the paper's Tables 2-3) -----------------------------------------------


@dataclass
class CorrelationParams:
    spec: trainer_pb2.CorrelationJobSpec
    generator: types_pb2.ModelRef
    boundaries: list[tuple[str, ifg.Boundary, attributes.Attribute]]
    num_samples: int
    batch: int
    seed: int
    name: str
    deps: Dependencies


def validate_correlation(spec: trainer_pb2.CorrelationJobSpec, deps: Dependencies) -> CorrelationParams:
    if len(spec.boundaries) < 2:
        raise InvalidArgument("boundaries: name at least two boundaries to correlate")
    info = deps.generator_info(spec.generator)
    loaded = []
    for name in spec.boundaries:
        boundary, entry = load_boundary(deps.repo, name, generator=info.ref.name)
        attribute = attributes.Attribute.from_dict(entry.manifest["attribute"])
        if not attribute.head:
            raise InvalidArgument(f"boundary {name!r} was trained from caller labels; no head scores its attribute")
        loaded.append((name, boundary, attribute))
    num = spec.num_samples or 1000
    if not MIN_SAMPLES <= num <= MAX_SAMPLES:
        raise InvalidArgument(f"num_samples {num} must be in {MIN_SAMPLES}..{MAX_SAMPLES}")
    batch, seed = _options(spec.options)
    name = _artifact_name(spec.options, f"{info.ref.name}-correlation")
    return CorrelationParams(spec, info.ref, loaded, num, batch, seed, name, deps)


def run_correlation(ctx: JobContext, p: CorrelationParams) -> trainer_pb2.ArtifactRef:
    deps = p.deps
    heads = sorted({a.head for _, _, a in p.boundaries})
    columns = []
    for index, start in enumerate(range(0, p.num_samples, p.batch)):
        ctx.check()
        count = min(p.batch, p.num_samples - start)
        latents, _ = deps.sample(p.generator, count, _batch_seed(p.seed + 7919, index))
        outputs = deps.score(deps.images(p.generator, latents), heads)
        columns.append(np.stack([a.extract(outputs) for _, _, a in p.boundaries], axis=1))
        ctx.report("sampling and scoring", 0.95 * (start + count) / p.num_samples)
    scores = np.concatenate(columns)
    cosine = ifg.cosine_matrix([b.normal for _, b, _ in p.boundaries])
    correlation = ifg.correlation_matrix(scores)
    names = [n for n, _, _ in p.boundaries]
    off_diagonal = ~np.eye(len(names), dtype=bool)
    metrics = {
        "num_samples": float(p.num_samples),
        "cosine_correlation_agreement": float(np.corrcoef(cosine[off_diagonal], correlation[off_diagonal])[0, 1]) if len(names) > 2 else float("nan"),
        "mean_abs_difference": float(np.abs(cosine - correlation)[off_diagonal].mean()),
    }
    report = {"boundaries": names, "attributes": [a.name for _, _, a in p.boundaries],
              "cosine": cosine.round(4).tolist(), "correlation": correlation.round(4).tolist()}
    entry = write_report(deps.repo, p.name, CORRELATION_KIND, report, {
        "generator": {"name": p.generator.name, "version": p.generator.version}, "metrics": metrics, "job_id": ctx.job_id,
    })
    ctx.report("done", 1.0, metrics)
    return trainer_pb2.ArtifactRef(ref=types_pb2.ModelRef(name=entry.name, version=entry.version),
                                   kind=trainer_pb2.ARTIFACT_KIND_CORRELATION_REPORT)


# ---- SGF auxiliary mapping ----------------------------------------------------------------------


@dataclass
class MappingParams:
    spec: trainer_pb2.MappingJobSpec
    generator: types_pb2.ModelRef
    condition: ConditionSpec
    num_pairs: int
    depth: int
    hidden: int
    steps: int
    learning_rate: float
    batch: int
    seed: int
    name: str
    deps: Dependencies


def validate_mapping(spec: trainer_pb2.MappingJobSpec, deps: Dependencies) -> MappingParams:
    heads = deps.heads()
    schemas = {h.name: h for h in heads}
    info = deps.generator_info(spec.generator)
    if spec.condition == trainer_pb2.CONDITION_KIND_ATTRIBUTES:
        if not spec.attributes:
            raise InvalidArgument("attributes: an ATTRIBUTES mapping needs at least one attribute")
        condition = ConditionSpec("attributes", [attributes.resolve(a, heads, f"attributes[{i}]") for i, a in enumerate(spec.attributes)])
    elif spec.condition == trainer_pb2.CONDITION_KIND_KEYPOINTS:
        head = schemas.get(spec.keypoints_head)
        if head is None or "points" not in {o.name for o in head.outputs}:
            keypoint_heads = [h.name for h in heads if "points" in {o.name for o in h.outputs}]
            raise NotFound(f"keypoints_head {spec.keypoints_head!r} is not a keypoint head; keypoint heads: {', '.join(keypoint_heads)}")
        condition = ConditionSpec("keypoints", keypoints_head=spec.keypoints_head, image_size=info.resolution)
    elif spec.condition == trainer_pb2.CONDITION_KIND_CAPTION:
        if "caption" not in schemas:
            raise FailedPrecondition("the scorer has no caption head")
        condition = ConditionSpec("caption")
    else:
        raise InvalidArgument("condition: choose CONDITION_KIND_ATTRIBUTES, _KEYPOINTS or _CAPTION")
    num = spec.num_pairs or 2000
    if not MIN_SAMPLES <= num <= MAX_SAMPLES:
        raise InvalidArgument(f"num_pairs {num} must be in {MIN_SAMPLES}..{MAX_SAMPLES}")
    depth, hidden = spec.depth or 6, spec.hidden_dim or 256
    if not 2 <= depth <= 32 or not 8 <= hidden <= 4096:
        raise InvalidArgument(f"depth {depth} must be in 2..32 and hidden_dim {hidden} in 8..4096")
    steps = spec.options.steps or 3000
    rate = spec.options.learning_rate or 2e-3
    if not 1 <= steps <= 1_000_000 or not 0 < rate <= 1:
        raise InvalidArgument(f"options.steps {steps} must be in 1..1000000 and learning_rate {rate:g} in (0, 1]")
    batch, seed = _options(spec.options)
    name = _artifact_name(spec.options, f"{info.ref.name}-sgf-{condition.kind}")
    return MappingParams(spec, info.ref, condition, num, depth, hidden, steps, rate, batch, seed, name, deps)


def run_mapping(ctx: JobContext, p: MappingParams) -> trainer_pb2.ArtifactRef:
    import torch

    from latentedit.methods.sgf import AuxiliaryMapping, train_mapping

    latents, raw = [], []
    for index, start in enumerate(range(0, p.num_pairs, p.batch)):
        ctx.check()
        count = min(p.batch, p.num_pairs - start)
        z, _ = p.deps.sample(p.generator, count, _batch_seed(p.seed, index))
        latents.append(z)
        raw.append(p.condition.raw(p.deps.score(p.deps.images(p.generator, z), p.condition.heads)))
        ctx.report("building (z, c) pairs", 0.4 * (start + count) / p.num_pairs, message=f"{start + count}/{p.num_pairs} pairs")
    z_all, raw_all = np.concatenate(latents), np.concatenate(raw)
    p.condition.fit(raw_all)
    c_all = p.condition.standardise(raw_all)
    held_out = max(1, len(z_all) // 10)
    z_train, c_train = torch.from_numpy(z_all[held_out:]), torch.from_numpy(c_all[held_out:])
    torch.manual_seed(p.seed)
    mapping = AuxiliaryMapping(z_all.shape[1], c_all.shape[1], depth=p.depth, hidden=p.hidden)

    def progress(step: int, loss: float) -> bool:
        ctx.check()
        ctx.report("training F", 0.4 + 0.55 * step / p.steps, {"train_loss": loss})
        return True

    loss = train_mapping(mapping, z_train, c_train, p.steps, batch_size=128, learning_rate=p.learning_rate, seed=p.seed,
                         progress=progress)
    with torch.no_grad():
        z_val, c_val = torch.from_numpy(z_all[:held_out]), torch.from_numpy(c_all[:held_out])
        error = float((mapping(z_val, c_val) - z_val).pow(2).sum(1).mean() / z_val.pow(2).sum(1).mean())
    metrics = {"train_loss": loss, "reconstruction_error": error, "max_spectral_norm": max(mapping.layer_spectral_norms()),
               "num_pairs": float(p.num_pairs), "condition_dim": float(c_all.shape[1])}
    ctx.report("writing the mapping", 0.98, metrics)
    entry = write_mapping(p.deps.repo, p.name, mapping, p.condition, {
        "generator": {"name": p.generator.name, "version": p.generator.version}, "space": "z",
        "metrics": metrics, "job_id": ctx.job_id, "spec": MessageToDict(p.spec)})
    return trainer_pb2.ArtifactRef(ref=types_pb2.ModelRef(name=entry.name, version=entry.version), kind=trainer_pb2.ARTIFACT_KIND_MAPPING)


JOB_KINDS: dict[str, tuple[Any, JobBody]] = {
    "boundary": (validate_boundary, run_boundary),
    "custom_boundary": (validate_custom_boundary, run_custom_boundary),
    "correlation": (validate_correlation, run_correlation),
    "mapping": (validate_mapping, run_mapping),
}


def validate(request: trainer_pb2.StartJobRequest, deps: Dependencies) -> tuple[Any, JobBody]:
    kind = request.WhichOneof("spec")
    if kind is None:
        raise InvalidArgument("spec: set one job spec (boundary, custom_boundary, correlation, flow, directions, mapping)")
    if kind not in JOB_KINDS:
        raise Unimplemented(f"{kind} jobs are not available yet; available: {', '.join(JOB_KINDS)}")
    validator, body = JOB_KINDS[kind]
    return validator(getattr(request, kind), deps), body


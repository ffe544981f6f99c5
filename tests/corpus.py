"""A bad-input corpus for every RPC of the four services, generated from the proto descriptors,
and the harness that runs the services as separate processes (shared by
tests/test_bad_input_corpus.py, tests/test_reliability.py and bench/reliability.py).

How the cases are made:
- Each RPC has one or more valid base requests (`bases()`): the smallest request that succeeds
  against the default world plus the artifacts `prepare_artifacts` trains through the trainer.
- `walk` visits every field of every base request through its descriptor (recursing into the
  message fields that are set) and asks the rule tables below what to put there and which
  status code that must give: strings by their role (repository name, job id, head, layer,
  free text), enums (unknown numbers), numbers (per-field limits, NaN and +-Inf for every
  float), Tensor fields (wrong dtypes, shape and byte-count mismatches, negative and
  overflowing dimensions, NaN, Inf, float64 beyond float32, empty and oversized batches),
  image batches (corrupt, truncated, grey, tiny, oversized and header-declared gigapixel PNGs,
  raw zero-size images), repeated fields (unknown entries) and oneofs (missing).
  A field with no rule raises: a new proto field needs a decision here before the corpus runs.
- Per RPC it adds an empty request, a 1 ms deadline on a request with real work, and for
  streaming RPCs a client cancel after the first answer.

Every call carries a deadline (`Case.timeout`), so a hang shows up as DEADLINE_EXCEEDED where
another code was expected.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import os
import queue
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml
from google.protobuf import descriptor as pb_descriptor
from google.protobuf.message import Message
from PIL import Image

from latentedit.api.v1 import (
    editor_pb2,
    generator_pb2,
    scorer_pb2,
    trainer_pb2,
    types_pb2,
)

ROOT = Path(__file__).resolve().parent.parent
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
CANCELLED = grpc.StatusCode.CANCELLED
UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED

CALL_TIMEOUT_S = 60.0  # every corpus call carries a deadline: a hang is a DEADLINE_EXCEEDED
TINY_DEADLINE_S = 0.001
HUGE = "x" * (1 << 20)  # a 1 MiB string
LONG_JOB_SAMPLES = 500_000  # a boundary job of this many samples runs for many minutes on a CPU

SERVICES = {
    "generator": generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"],
    "scorer": scorer_pb2.DESCRIPTOR.services_by_name["ScorerService"],
    "trainer": trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"],
    "editor": editor_pb2.DESCRIPTOR.services_by_name["EditorService"],
}

# Artifacts `prepare_artifacts` trains through the trainer before the corpus runs.
YAW, SMILE = "corpus-yaw", "corpus-smile"
PCA = "corpus-pca"
DIRECTIONS = "corpus-dplase"
FLOW = "corpus-flow"
MAPPINGS = {"attributes": "corpus-sgf-attr", "keypoints": "corpus-sgf-kp", "caption": "corpus-sgf-caption"}
GENERATOR = "dcgan-faces"
DIM = 100
FEATURE_LAYER, FEATURE_SHAPE = "block1", (512, 4, 4)


# ---- small builders -----------------------------------------------------------------------------


def tensor(array: np.ndarray, dtype: int | None = None) -> types_pb2.Tensor:
    codes = {np.dtype(np.float32): 1, np.dtype(np.float16): 2, np.dtype(np.float64): 3, np.dtype(np.uint8): 4,
             np.dtype(np.int32): 5, np.dtype(np.int64): 6, np.dtype(np.bool_): 7}
    array = np.ascontiguousarray(array)
    return types_pb2.Tensor(dtype=dtype if dtype is not None else codes[array.dtype], shape=list(array.shape),
                            raw_data=array.astype(array.dtype.newbyteorder("<")).tobytes())


def z(count: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)


def latents(count: int = 1, seed: int = 0) -> types_pb2.Latents:
    return types_pb2.Latents(space=types_pb2.LATENT_SPACE_Z, values=tensor(z(count, seed)))


def faces(count: int = 1, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def raw_images(count: int = 1, size: int = 64) -> types_pb2.ImageBatch:
    return types_pb2.ImageBatch(encoding=types_pb2.IMAGE_ENCODING_RAW_UINT8, raw=tensor(faces(count, size)))


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height RGB pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


@functools.lru_cache(maxsize=4)
def png_bomb(side: int = 8000) -> bytes:
    """A real PNG of side x side black RGB pixels: small on the wire, about 190 MB decoded at 8000."""
    row = b"\0" + b"\0" * (3 * side)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def png_batch(*files: bytes) -> types_pb2.ImageBatch:
    return types_pb2.ImageBatch(encoding=types_pb2.IMAGE_ENCODING_PNG, png=list(files))


def attribute(head: str, output: str, label: str = "") -> types_pb2.AttributeRef:
    return types_pb2.AttributeRef(head=head, output=output, label=label)


def model(name: str = "") -> types_pb2.ModelRef:
    return types_pb2.ModelRef(name=name)


# ---- valid base requests ------------------------------------------------------------------------


def edit_request(method: str, message: Message, count: int = 1, frames: int = 2, **extra: Any) -> editor_pb2.EditRequest:
    extra.setdefault("omit_images", True)
    request = editor_pb2.EditRequest(seed=editor_pb2.SeedStart(seed=3, count=count), num_frames=frames, **extra)
    getattr(request, method).CopyFrom(message)
    return request


def bases() -> dict[str, list[tuple[str, Message]]]:
    """`Service.Method` -> [(variant, a valid request)]: the requests the corpus mutates."""
    options = lambda name, **kw: trainer_pb2.TrainingOptions(artifact_name=name, **kw)  # noqa: E731
    labels = (z(40)[:, 0] > 0).astype(np.int64)
    labels[:10], labels[10:20] = 0, 1  # each class well represented
    start = trainer_pb2.StartJobRequest
    sgf = editor_pb2.SGFEdit
    return {
        "generator.ListModels": [("", generator_pb2.ListModelsRequest())],
        "generator.Sample": [("", generator_pb2.SampleRequest(model=model(GENERATOR), space=1, count=2, seed=1))],
        "generator.Synthesize": [
            ("latents", generator_pb2.SynthesizeRequest(model=model(GENERATOR), latents=latents(2), request_id="r1",
                                                        return_layers=["block2"])),
            ("features", generator_pb2.SynthesizeRequest(features=types_pb2.LayerFeatures(
                layer=FEATURE_LAYER, values=tensor(np.zeros((1, *FEATURE_SHAPE), np.float32))), image_encoding=2)),
        ],
        "generator.SynthesizeStream": [
            ("latents", generator_pb2.SynthesizeRequest(model=model(GENERATOR), latents=latents(2), request_id="s1")),
        ],
        "scorer.ListHeads": [("", scorer_pb2.ListHeadsRequest())],
        "scorer.Score": [
            ("raw", scorer_pb2.ScoreRequest(images=raw_images(1), heads=["pose"])),
            ("png", scorer_pb2.ScoreRequest(images=png_batch(png(faces(1)[0])), heads=["expression"])),
        ],
        "scorer.EmbedText": [("", scorer_pb2.EmbedTextRequest(texts=["a smiling young woman"]))],
        "trainer.StartJob": [
            ("boundary", start(display_name="b", boundary=trainer_pb2.BoundaryJobSpec(
                generator=model(GENERATOR), space=1, attribute=attribute("pose", "yaw"), num_samples=200,
                keep_fraction=0.2, validation_fraction=0.3, threshold=0.0, svm_c=1.0,
                quality_attribute=attribute("quality", "face_probability"), quality_min=0.1,
                options=options("corpus-job-b", batch_size=100, seed=1)))),
            ("custom_boundary", start(custom_boundary=trainer_pb2.CustomBoundaryJobSpec(
                generator=model(GENERATOR), latents=latents(40), labels=tensor(labels), validation_fraction=0.3,
                svm_c=1.0, attribute_name="axis0", options=options("corpus-job-c")))),
            ("correlation", start(correlation=trainer_pb2.CorrelationJobSpec(
                generator=model(GENERATOR), boundaries=[YAW, SMILE], num_samples=100, options=options("corpus-job-r")))),
            ("flow", start(flow=trainer_pb2.FlowJobSpec(
                generator=model(GENERATOR), space=1, attributes=[attribute("pose", "yaw")], num_samples=100,
                num_coupling_layers=2, hidden_dim=16, distance_weight=1.0, options=options("corpus-job-f")))),
            ("directions", start(directions=trainer_pb2.DirectionJobSpec(
                generator=model(GENERATOR), space=1, layer="block2", num_directions=2, max_stride=3,
                num_channel_subspaces=2, num_samples=2, options=options("corpus-job-d", steps=2, batch_size=4)))),
            ("mapping", start(mapping=trainer_pb2.MappingJobSpec(
                generator=model(GENERATOR), space=1, condition=trainer_pb2.CONDITION_KIND_ATTRIBUTES,
                attributes=[attribute("pose", "yaw")], num_pairs=100, depth=2, hidden_dim=16,
                options=options("corpus-job-m", steps=2, batch_size=50, learning_rate=0.01)))),
            ("mapping-keypoints", start(mapping=trainer_pb2.MappingJobSpec(
                condition=trainer_pb2.CONDITION_KIND_KEYPOINTS, keypoints_head="keypoints5", num_pairs=100,
                options=options("corpus-job-k", steps=2)))),
            ("pca", start(pca=trainer_pb2.PCAJobSpec(
                generator=model(GENERATOR), space=1, layer="block1", num_samples=100, num_components=2,
                options=options("corpus-job-p")))),
        ],
        "trainer.GetJob": [("", trainer_pb2.GetJobRequest(id="job-placeholder"))],
        "trainer.ListJobs": [("", trainer_pb2.ListJobsRequest(states=[trainer_pb2.JOB_STATE_SUCCEEDED], page_size=2))],
        "trainer.CancelJob": [("", trainer_pb2.CancelJobRequest(id="job-placeholder"))],
        "trainer.WatchJob": [("", trainer_pb2.WatchJobRequest(id="job-placeholder"))],
        "editor.ListEdits": [("", editor_pb2.ListEditsRequest(generator=model(GENERATOR)))],
        "editor.Edit": [
            ("interfacegan", edit_request("interfacegan", editor_pb2.InterFaceGANEdit(
                boundary=YAW, condition_boundaries=[SMILE], start_distance=-1, end_distance=1), score_heads=["pose"],
                generator=model(GENERATOR))),
            ("interfacegan-latents", editor_pb2.EditRequest(latents=latents(1), num_frames=2, omit_images=True,
                                                             interfacegan=editor_pb2.InterFaceGANEdit(boundary=YAW, end_distance=1))),
            ("ganspace", edit_request("ganspace", editor_pb2.GANSpaceEdit(directions=PCA, component=1, start_distance=-1,
                                                                          end_distance=1))),
            ("dplase", edit_request("dplase", editor_pb2.DPLaSEEdit(directions=DIRECTIONS, direction_index=1, start_stride=-2,
                                                                    end_stride=2, density_preserving=True,
                                                                    subspace_refinement=True))),
            ("sgf-attributes", edit_request("sgf", sgf(mapping=MAPPINGS["attributes"], attributes=editor_pb2.AttributeTarget(
                values=[editor_pb2.AttributeValue(attribute=attribute("pose", "yaw"), value=10.0)]), step_size=0.5,
                neumann_order=1, max_steps=2, tolerance=0.1))),
            ("sgf-keypoints", edit_request("sgf", sgf(mapping=MAPPINGS["keypoints"], keypoints=editor_pb2.KeypointTarget(
                points=tensor(np.full((5, 2), 32.0, np.float32))), max_steps=2))),
            ("sgf-caption", edit_request("sgf", sgf(mapping=MAPPINGS["caption"], caption=editor_pb2.CaptionTarget(
                text="a smiling face"), max_steps=2))),
            ("wstar", edit_request("wstar", editor_pb2.WStarEdit(flow=FLOW, attribute=attribute("pose", "yaw"),
                                                                 end_distance=1))),
        ],
        "editor.Invert": [
            ("raw", editor_pb2.InvertRequest(generator=model(GENERATOR), images=raw_images(1), space=1, steps=2,
                                             learning_rate=0.1, seed=1, report_every=1)),
            ("png", editor_pb2.InvertRequest(images=png_batch(png(faces(1)[0])), steps=1)),
        ],
    }


# ---- rules: what each field may be set to, and the code that must come back ---------------------

# Strings by role. Names that reach the repository's file system (models, artifacts, job ids):
# the one allowed pattern, so traversal, absolute paths, NUL and over-long names are
# INVALID_ARGUMENT, and a well-formed name nobody has is NOT_FOUND.
STRING_ROLES: dict[str, list[tuple[str, str, grpc.StatusCode]]] = {
    "repo-name": [("unknown", "no-such-name", NOT_FOUND), ("traversal", "../dcgan-faces", INVALID),
                  ("absolute", "/etc/passwd", INVALID), ("nul", "dcgan\x00faces", INVALID), ("1MiB", HUGE, INVALID)],
    "job-id": [("unknown", "job-0000", NOT_FOUND), ("traversal", "../jobs", INVALID), ("nul", "a\x00b", INVALID),
               ("1MiB", HUGE, INVALID), ("empty", "", INVALID)],
    # Names looked up in a service's own table (heads, layers, outputs, labels): NOT_FOUND,
    # whatever their length, with a message that does not repeat 1 MiB.
    "table-name": [("unknown", "no-such-name", NOT_FOUND), ("1MiB", HUGE, NOT_FOUND)],
    # Text the caller owns that a service stores or models (idempotency keys, display names,
    # texts to embed): bounded, so 1 MiB is INVALID_ARGUMENT.
    "stored-text": [("1MiB", HUGE, INVALID)],
    # Echoed back only (request_id): any size within the message limit is fine.
    "echo": [("1MiB", HUGE, OK)],
    "page-token": [("garbage", "not-a-token", INVALID), ("huge-number", "9" * 4000, INVALID), ("negative", "-5", INVALID),
                   ("1MiB", HUGE, INVALID)],
}

STRING_FIELDS = {
    "latentedit.v1.ModelRef.name": "repo-name",
    "latentedit.v1.LayerFeatures.layer": "table-name",
    "latentedit.v1.AttributeRef.head": "table-name",
    "latentedit.v1.AttributeRef.output": "table-name",
    "latentedit.v1.AttributeRef.label": "table-name",
    "latentedit.v1.SynthesizeRequest.return_layers": "table-name",
    "latentedit.v1.SynthesizeRequest.request_id": "echo",
    "latentedit.v1.ScoreRequest.heads": "table-name",
    "latentedit.v1.EmbedTextRequest.texts": "stored-text",
    "latentedit.v1.StartJobRequest.idempotency_key": "stored-text",
    "latentedit.v1.StartJobRequest.display_name": "stored-text",
    "latentedit.v1.TrainingOptions.artifact_name": "repo-name-write",
    "latentedit.v1.CustomBoundaryJobSpec.attribute_name": "stored-text",
    "latentedit.v1.CorrelationJobSpec.boundaries": "repo-name",
    "latentedit.v1.DirectionJobSpec.layer": "table-name",
    "latentedit.v1.MappingJobSpec.keypoints_head": "table-name",
    "latentedit.v1.PCAJobSpec.layer": "table-name",
    "latentedit.v1.GetJobRequest.id": "job-id",
    "latentedit.v1.CancelJobRequest.id": "job-id",
    "latentedit.v1.WatchJobRequest.id": "job-id",
    "latentedit.v1.ListJobsRequest.page_token": "page-token",
    "latentedit.v1.InterFaceGANEdit.boundary": "repo-name",
    "latentedit.v1.InterFaceGANEdit.condition_boundaries": "repo-name",
    "latentedit.v1.WStarEdit.flow": "repo-name",
    "latentedit.v1.DPLaSEEdit.directions": "repo-name",
    "latentedit.v1.GANSpaceEdit.directions": "repo-name",
    "latentedit.v1.SGFEdit.mapping": "repo-name",
    "latentedit.v1.CaptionTarget.text": "stored-text",
    "latentedit.v1.EditRequest.score_heads": "table-name",
}
# A name a job writes: a new, well-formed name is fine (the job would write it), a malformed one is not.
STRING_ROLES["repo-name-write"] = [("traversal", "../dcgan-faces", INVALID), ("absolute", "/tmp/x", INVALID),
                                   ("nul", "a\x00b", INVALID), ("1MiB", HUGE, INVALID),
                                   ("another kind's name", GENERATOR, grpc.StatusCode.ALREADY_EXISTS)]

# Numbers: explicit (label, value, code) per field. Floats also get NaN, +Inf and -Inf
# (INVALID_ARGUMENT) unless FLOAT_NONFINITE says otherwise.
I32_MAX, I64_MAX, U64_MAX = 2**31 - 1, 2**63 - 1, 2**64 - 1
NUMBER_FIELDS: dict[str, list[tuple[str, float, grpc.StatusCode]]] = {
    "latentedit.v1.ModelRef.version": [("negative", -1, INVALID), ("unknown", 99, NOT_FOUND), ("int64 max", I64_MAX, NOT_FOUND)],
    "latentedit.v1.AttributeRef.index": [("negative", -1, INVALID), ("int32 max", I32_MAX, INVALID)],
    "latentedit.v1.RowRange.start": [("negative", -1, INVALID)],
    "latentedit.v1.RowRange.end": [("negative", -1, INVALID)],
    "latentedit.v1.SampleRequest.count": [("zero", 0, INVALID), ("negative", -1, INVALID), ("over the limit", 1025, EXHAUSTED),
                                          ("int32 max", I32_MAX, EXHAUSTED)],
    "latentedit.v1.SampleRequest.seed": [("uint64 max", U64_MAX, OK)],
    "latentedit.v1.SampleRequest.truncation_psi": [("unsupported", 0.5, INVALID)],
    "latentedit.v1.BoundaryJobSpec.num_samples": [("too few", 10, INVALID), ("negative", -5, INVALID), ("10 M + 1", 10_000_001, INVALID),
                                                  ("int64 max", I64_MAX, INVALID)],
    "latentedit.v1.BoundaryJobSpec.keep_fraction": [("negative", -0.1, INVALID), ("over 0.5", 0.7, INVALID)],
    "latentedit.v1.BoundaryJobSpec.validation_fraction": [("negative", -0.1, INVALID), ("one", 1.0, INVALID)],
    "latentedit.v1.BoundaryJobSpec.threshold": [],
    "latentedit.v1.BoundaryJobSpec.svm_c": [("negative", -1.0, INVALID)],
    "latentedit.v1.BoundaryJobSpec.quality_min": [],
    "latentedit.v1.TrainingOptions.seed": [],
    "latentedit.v1.TrainingOptions.batch_size": [("negative", -1, INVALID), ("over the limit", 1025, INVALID)],
    "latentedit.v1.TrainingOptions.steps": [("negative", -1, INVALID), ("int32 max", I32_MAX, INVALID)],
    "latentedit.v1.TrainingOptions.learning_rate": [("negative", -0.5, INVALID), ("over one", 5.0, INVALID)],
    "latentedit.v1.CustomBoundaryJobSpec.validation_fraction": [("one", 1.0, INVALID), ("negative", -0.5, INVALID)],
    "latentedit.v1.CustomBoundaryJobSpec.svm_c": [("negative", -1.0, INVALID)],
    "latentedit.v1.CorrelationJobSpec.num_samples": [("negative", -1, INVALID), ("int64 max", I64_MAX, INVALID)],
    "latentedit.v1.FlowJobSpec.num_samples": [("negative", -1, INVALID), ("too few", 10, INVALID), ("10 M + 1", 10_000_001, INVALID),
                                              ("int64 max", I64_MAX, INVALID)],
    "latentedit.v1.FlowJobSpec.num_coupling_layers": [("negative", -1, INVALID), ("over the limit", 65, INVALID)],
    "latentedit.v1.FlowJobSpec.hidden_dim": [("negative", -8, INVALID), ("huge", 10**6, INVALID)],
    "latentedit.v1.FlowJobSpec.distance_weight": [("negative", -1.0, INVALID), ("1e30", 1e30, INVALID)],
    "latentedit.v1.FlowJobSpec.identity_weight": [("negative", -1.0, INVALID)],
    "latentedit.v1.DirectionJobSpec.num_directions": [("negative", -1, INVALID), ("over the dimension", 101, INVALID)],
    "latentedit.v1.DirectionJobSpec.similarity_weight": [("negative", -1.0, INVALID)],
    "latentedit.v1.DirectionJobSpec.orthogonality_weight": [("negative", -1.0, INVALID)],
    "latentedit.v1.DirectionJobSpec.density_weight": [("negative", -1.0, INVALID)],
    "latentedit.v1.DirectionJobSpec.max_stride": [("negative", -1.0, INVALID)],
    "latentedit.v1.DirectionJobSpec.num_channel_subspaces": [("negative", -1, INVALID), ("over the channels", 10**6, INVALID)],
    "latentedit.v1.DirectionJobSpec.num_samples": [("one", 1, INVALID), ("int64 max", I64_MAX, INVALID)],
    "latentedit.v1.DirectionJobSpec.sparsity_weight": [("negative", -1.0, INVALID)],
    "latentedit.v1.MappingJobSpec.num_pairs": [("negative", -1, INVALID), ("10 M + 1", 10_000_001, INVALID)],
    "latentedit.v1.MappingJobSpec.depth": [("one", 1, INVALID), ("huge", 10**6, INVALID)],
    "latentedit.v1.MappingJobSpec.hidden_dim": [("negative", -8, INVALID), ("huge", 10**6, INVALID)],
    "latentedit.v1.PCAJobSpec.num_samples": [("negative", -1, INVALID), ("int64 max", I64_MAX, INVALID)],
    "latentedit.v1.PCAJobSpec.num_components": [("negative", -1, INVALID), ("over the samples", 10**6, INVALID)],
    "latentedit.v1.ListJobsRequest.page_size": [("negative", -1, INVALID), ("int32 max", I32_MAX, INVALID)],
    "latentedit.v1.SeedStart.seed": [("uint64 max", U64_MAX, OK)],
    "latentedit.v1.SeedStart.count": [("negative", -1, INVALID), ("over the limit", 257, EXHAUSTED), ("int32 max", I32_MAX, EXHAUSTED)],
    "latentedit.v1.InterFaceGANEdit.start_distance": [("1e30", 1e30, INVALID)],
    "latentedit.v1.InterFaceGANEdit.end_distance": [("-1e30", -1e30, INVALID)],
    "latentedit.v1.WStarEdit.start_distance": [("1e30", 1e30, INVALID)],
    "latentedit.v1.WStarEdit.end_distance": [("-1e30", -1e30, INVALID)],
    "latentedit.v1.DPLaSEEdit.direction_index": [("negative", -1, INVALID), ("out of range", 2, INVALID)],
    "latentedit.v1.DPLaSEEdit.start_stride": [("1e30", 1e30, INVALID)],
    "latentedit.v1.DPLaSEEdit.end_stride": [("-1e30", -1e30, INVALID)],
    "latentedit.v1.GANSpaceEdit.component": [("negative", -1, INVALID), ("out of range", 2, INVALID)],
    "latentedit.v1.GANSpaceEdit.start_distance": [("1e30", 1e30, INVALID)],
    "latentedit.v1.GANSpaceEdit.end_distance": [],
    "latentedit.v1.AttributeValue.value": [],
    "latentedit.v1.SGFEdit.step_size": [("negative", -0.5, INVALID), ("over one", 2.0, INVALID)],
    "latentedit.v1.SGFEdit.neumann_order": [("negative", -1, INVALID), ("eleven", 11, INVALID)],
    "latentedit.v1.SGFEdit.max_steps": [("negative", -1, INVALID), ("over max_frames", 257, INVALID)],
    "latentedit.v1.SGFEdit.tolerance": [("negative", -0.1, INVALID)],
    "latentedit.v1.EditRequest.num_frames": [("negative", -1, INVALID), ("over the limit", 257, INVALID), ("int32 max", I32_MAX, INVALID)],
    "latentedit.v1.InvertRequest.steps": [("negative", -1, INVALID), ("over the limit", 5001, INVALID)],
    "latentedit.v1.InvertRequest.learning_rate": [("negative", -0.1, INVALID)],
    "latentedit.v1.InvertRequest.seed": [("uint64 max", U64_MAX, OK)],
    "latentedit.v1.InvertRequest.report_every": [("negative", -3, INVALID)],
}
# Float fields whose NaN / Inf answer something other than INVALID_ARGUMENT (none today).
FLOAT_NONFINITE: dict[str, grpc.StatusCode] = {}

# Tensor fields by role.
TENSOR_FIELDS = {
    "latentedit.v1.Latents.values": "latents",
    "latentedit.v1.LayerFeatures.values": "features",
    "latentedit.v1.CustomBoundaryJobSpec.labels": "labels",
    "latentedit.v1.KeypointTarget.points": "points",
    "latentedit.v1.ImageBatch.raw": "image-raw",
}
IMAGE_FIELDS = {
    "latentedit.v1.ScoreRequest.images": "score",
    "latentedit.v1.InvertRequest.images": "invert",
}
# Enums: an unknown number is INVALID_ARGUMENT everywhere (also in repeated enum fields).
UNKNOWN_ENUM = 99
# Oneofs: clearing the one that is set.
ONEOF_MISSING = {
    "latentedit.v1.SynthesizeRequest.input": INVALID,
    "latentedit.v1.StartJobRequest.spec": INVALID,
    "latentedit.v1.EditRequest.start": INVALID,
    "latentedit.v1.EditRequest.method": INVALID,
    "latentedit.v1.SGFEdit.target": INVALID,
    "latentedit.v1.BoundaryJobSpec._threshold": None,  # proto3 optional: unset is valid
}
# Fields whose mutations the rules above do not cover, each with the reason.
SKIP = {
    "latentedit.v1.SynthesizeRequest.omit_images": "bool",
    "latentedit.v1.EditRequest.omit_images": "bool",
    "latentedit.v1.InterFaceGANEdit.from_boundary": "bool",
    "latentedit.v1.DPLaSEEdit.density_preserving": "bool",
    "latentedit.v1.WStarEdit.proxy_boundary": "bool",
    "latentedit.v1.DPLaSEEdit.subspace_refinement": "bool",
    "latentedit.v1.DirectionJobSpec.learn_density": "bool",
    "latentedit.v1.ImageBatch.png": "covered by the image corpus",
    "latentedit.v1.ImageBatch.encoding": "covered by the image corpus",
    "latentedit.v1.Tensor.dtype": "covered by the tensor corpus",
    "latentedit.v1.Tensor.shape": "covered by the tensor corpus",
    "latentedit.v1.Tensor.raw_data": "covered by the tensor corpus",
}
WORLD_BREAKERS = ("another kind's name", "named like a head")
# Per-base overrides of an expected code: "rpc[variant]:where: label" -> code.
OVERRIDES: dict[str, grpc.StatusCode] = {
    # keypoints_head belongs to KEYPOINTS mappings: an ATTRIBUTES mapping ignores it.
    "trainer.StartJob[mapping]:mapping.keypoints_head: unknown": OK,
    "trainer.StartJob[mapping]:mapping.keypoints_head: 1MiB": OK,
}
for _variant in ("sgf-attributes", "sgf-keypoints", "sgf-caption"):
    # SGF streams one frame per step (max_steps): num_frames is for range edits only.
    for _label in ("negative", "over the limit", "int32 max"):
        OVERRIDES[f"editor.Edit[{_variant}]:num_frames: {_label}"] = OK


# ---- cases --------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    service: str
    method: str
    request: Message
    expected: grpc.StatusCode
    timeout: float = CALL_TIMEOUT_S
    cancel_after: int | None = None  # the client cancels after this many answers (streams)
    stream_prefix: list[Message] = field(default_factory=list)  # SynthesizeStream: valid requests sent first

    @property
    def rpc(self) -> str:
        return f"{self.service}.{self.method}"


def _set(root: Message, path: tuple[str | int, ...], fn: Callable[[Message], None]) -> Message:
    """A copy of root with fn applied to the message at path (names, and indexes into repeated fields)."""
    result = copy.deepcopy(root)
    target: Any = result
    for name in path:
        target = target[name] if isinstance(name, int) else getattr(target, name)
    fn(target)
    return result


def _where(path: tuple[str | int, ...]) -> str:
    text = ""
    for name in path:
        text += f"[{name}]" if isinstance(name, int) else (f".{name}" if text else name)
    return text


def _assign(name: str, value: Any, repeated: bool) -> Callable[[Message], None]:
    def apply(message: Message) -> None:
        if repeated:
            getattr(message, name).append(value)
        else:
            setattr(message, name, value)

    return apply


def tensor_mutations(t: types_pb2.Tensor, role: str) -> Iterator[tuple[str, types_pb2.Tensor, grpc.StatusCode]]:
    """Bad variants of a valid tensor: dtype, shape, byte count, values, batch size."""
    shape, data = list(t.shape), t.raw_data
    item = len(data) // max(1, math.prod(shape))
    float_role = role in ("latents", "features", "points")
    yield "dtype unspecified", types_pb2.Tensor(dtype=0, shape=shape, raw_data=data), INVALID
    yield "dtype unknown 99", types_pb2.Tensor(dtype=UNKNOWN_ENUM, shape=shape, raw_data=data), INVALID
    if float_role or role == "image-raw":
        wrong = types_pb2.DATA_TYPE_INT32 if item == 4 else types_pb2.DATA_TYPE_FP32
        yield "dtype int32 same bytes" if item == 4 else "dtype fp32 for uint8", types_pb2.Tensor(
            dtype=wrong, shape=shape, raw_data=data), INVALID
    yield "raw_data one byte short", types_pb2.Tensor(dtype=t.dtype, shape=shape, raw_data=data[:-1]), INVALID
    yield "raw_data 4 bytes extra", types_pb2.Tensor(dtype=t.dtype, shape=shape, raw_data=data + b"\0" * 4), INVALID
    yield "negative dimension", types_pb2.Tensor(dtype=t.dtype, shape=[-1, *shape[1:]], raw_data=data), INVALID
    yield "dimensions overflowing int64", types_pb2.Tensor(dtype=t.dtype, shape=[2**62, 2**62, *shape[1:]], raw_data=data), INVALID
    if len(shape) > 1:
        yield "rank flattened", types_pb2.Tensor(dtype=t.dtype, shape=[math.prod(shape)], raw_data=data), INVALID
    yield "no shape", types_pb2.Tensor(dtype=t.dtype, raw_data=data[:item]), INVALID
    empty_shape = [0, *shape[1:]]
    yield "empty batch", types_pb2.Tensor(dtype=t.dtype, shape=empty_shape, raw_data=b""), INVALID
    if float_role:
        array = np.frombuffer(data, "<f4").copy() if t.dtype == 1 else None
        if array is not None:
            for label, value in (("NaN", np.nan), ("+Inf", np.inf), ("-Inf", -np.inf)):
                bad = array.copy()
                bad[0] = value
                yield f"one {label}", types_pb2.Tensor(dtype=1, shape=shape, raw_data=bad.tobytes()), INVALID
            big = np.full(array.shape, 1e300, "<f8")
            yield "float64 1e300 (Inf as float32)", types_pb2.Tensor(dtype=3, shape=shape, raw_data=big.tobytes()), INVALID
            yield "float64 in range", types_pb2.Tensor(dtype=3, shape=shape, raw_data=array.astype("<f8").tobytes()), OK
    if role == "labels":
        values = np.frombuffer(data, "<i8").copy()
        two = values.copy()
        two[0] = 2
        yield "label 2", tensor(two), INVALID
        yield "float labels 0.5", tensor(np.full(values.shape, 0.5, np.float32)), INVALID
        yield "NaN labels", tensor(np.full(values.shape, np.nan, np.float32)), INVALID
        yield "one label short", tensor(values[:-1]), INVALID
        yield "one class only", tensor(np.zeros_like(values)), INVALID
        yield "bool labels", tensor(values.astype(bool)), OK
    if role == "points":
        yield "[K, 3] points", tensor(np.zeros((5, 3), np.float32)), INVALID
        yield "68 points for a 5-point mapping", tensor(np.zeros((68, 2), np.float32)), INVALID


def image_mutations(role: str) -> Iterator[tuple[str, types_pb2.ImageBatch, grpc.StatusCode]]:
    limit = {"score": 1024, "invert": 256}[role]
    # The scorer takes 32..1024 px; an inversion resizes any size to the generator's.
    odd_size = OK if role == "invert" else INVALID
    grey = png(faces(1)[0][..., 0])
    yield "encoding unknown 99", types_pb2.ImageBatch(encoding=UNKNOWN_ENUM, raw=tensor(faces(1))), INVALID
    yield "PNG encoding, no files", types_pb2.ImageBatch(encoding=types_pb2.IMAGE_ENCODING_PNG), INVALID
    yield "PNG encoding with a raw tensor only", types_pb2.ImageBatch(encoding=2, raw=tensor(faces(1))), INVALID
    yield "raw encoding, no tensor", types_pb2.ImageBatch(encoding=1), INVALID
    yield "corrupt PNG", png_batch(b"\x89PNG\r\n\x1a\n garbage"), INVALID
    yield "truncated PNG", png_batch(png(faces(1)[0])[:100]), INVALID
    yield "JPEG bytes", png_batch(b"\xff\xd8\xff\xe0" + b"\0" * 64), INVALID
    yield "empty PNG file", png_batch(b""), INVALID
    yield "grey PNG", png_batch(grey), INVALID
    yield "16-bit PNG", png_batch(png(np.zeros((64, 64), np.uint16))), INVALID
    yield "PNG of differing sizes", png_batch(png(faces(1)[0]), png(faces(1, 96)[0])), INVALID
    yield "header declares 100000x100000", png_batch(png_header_only(100_000, 100_000)), EXHAUSTED
    yield "header declares 2^31-1 x 1", png_batch(png_header_only(2**31 - 1, 1)), EXHAUSTED
    yield "8000x8000 decompression bomb", png_batch(png_bomb(8000)), EXHAUSTED
    yield "five 4096x4096 PNGs (80 M pixels)", png_batch(*[png_bomb(4096)] * 5), EXHAUSTED
    yield "raw 0x0 images", types_pb2.ImageBatch(raw=tensor(np.zeros((1, 0, 0, 3), np.uint8))), INVALID
    yield "raw 1x1 image", types_pb2.ImageBatch(raw=tensor(np.zeros((1, 1, 1, 3), np.uint8))), odd_size
    yield "raw RGBA", types_pb2.ImageBatch(raw=tensor(np.zeros((1, 64, 64, 4), np.uint8))), INVALID
    yield "raw grey NHW", types_pb2.ImageBatch(raw=tensor(np.zeros((1, 64, 64), np.uint8))), INVALID
    yield "raw 8192x1", types_pb2.ImageBatch(raw=tensor(np.zeros((1, 8192, 1, 3), np.uint8))), odd_size
    yield "over the batch limit", types_pb2.ImageBatch(raw=tensor(np.zeros((limit + 1, 32, 32, 3), np.uint8))), EXHAUSTED


def walk(rpc: str, variant: str, base: Message) -> Iterator[tuple[str, Message, grpc.StatusCode]]:
    """(label, request, expected code) for every rule that applies to a field of base."""

    def visit(message: Message, path: tuple[str | int, ...]) -> Iterator[tuple[str, Message, grpc.StatusCode]]:
        descriptor = message.DESCRIPTOR
        for oneof in descriptor.oneofs:
            which = message.WhichOneof(oneof.name)
            expected = ONEOF_MISSING.get(oneof.full_name, INVALID)
            if which is not None and expected is not None:
                yield f"{_where(path + (oneof.name,))}: missing oneof", _set(base, path, lambda m, w=which: m.ClearField(w)), expected
        for fd in descriptor.fields:
            name, full = fd.name, fd.full_name
            where = _where(path + (name,))
            repeated = fd.is_repeated
            if full in SKIP:
                continue
            if fd.type == pb_descriptor.FieldDescriptor.TYPE_MESSAGE:
                if full in IMAGE_FIELDS and message.HasField(name):
                    for label, batch, code in image_mutations(IMAGE_FIELDS[full]):
                        yield f"{where}: {label}", _set(base, path, lambda m, n=name, b=batch: getattr(m, n).CopyFrom(b)), code
                    continue
                if full in TENSOR_FIELDS and message.HasField(name):
                    for label, t, code in tensor_mutations(getattr(message, name), TENSOR_FIELDS[full]):
                        yield f"{where}: {label}", _set(base, path, lambda m, n=name, t=t: getattr(m, n).CopyFrom(t)), code
                    continue
                if repeated:
                    items = getattr(message, name)
                    if len(items):
                        yield from visit(items[0], path + (name, 0))
                        yield f"{where}: empty list", _set(base, path, lambda m, n=name: m.ClearField(n)), INVALID
                    continue
                if fd.message_type.full_name.startswith("google.protobuf") or not message.HasField(name):
                    continue
                yield from visit(getattr(message, name), path + (name,))
                continue
            if fd.type == pb_descriptor.FieldDescriptor.TYPE_ENUM:
                yield (f"{where}: unknown enum {UNKNOWN_ENUM}", _set(base, path, _assign(name, UNKNOWN_ENUM, repeated)),
                       INVALID)
                continue
            if fd.type == pb_descriptor.FieldDescriptor.TYPE_STRING:
                role = STRING_FIELDS[full]  # KeyError: a new string field needs a rule
                for label, value, code in STRING_ROLES[role]:
                    yield f"{where}: {label}", _set(base, path, _assign(name, value, repeated)), code
                continue
            if fd.type == pb_descriptor.FieldDescriptor.TYPE_BOOL:
                raise KeyError(f"{full}: a bool field needs a rule or a SKIP entry")
            rules = list(NUMBER_FIELDS[full])  # KeyError: a new number field needs a rule
            if fd.type in (pb_descriptor.FieldDescriptor.TYPE_FLOAT, pb_descriptor.FieldDescriptor.TYPE_DOUBLE):
                nonfinite = FLOAT_NONFINITE.get(full, INVALID)
                rules += [("NaN", float("nan"), nonfinite), ("+Inf", float("inf"), nonfinite), ("-Inf", float("-inf"), nonfinite)]
            for label, value, code in rules:
                yield f"{where}: {label}", _set(base, path, _assign(name, value, repeated)), code

    yield from visit(base, ())


def _method(rpc: str) -> pb_descriptor.MethodDescriptor:
    service, method = rpc.split(".")
    return SERVICES[service].methods_by_name[method]


def build_corpus() -> list[Case]:
    cases: list[Case] = []
    all_bases = bases()
    for service, descriptor in SERVICES.items():
        for method in descriptor.methods:
            rpc = f"{service}.{method.name}"
            assert rpc in all_bases, f"{rpc} has no base request in the corpus"
    for rpc, variants in all_bases.items():
        service, method = rpc.split(".")
        for variant, base in variants:
            expected_base = OK
            prefix = f"{rpc}[{variant}]" if variant else rpc
            if rpc.startswith("trainer.") and rpc != "trainer.StartJob" and rpc != "trainer.ListJobs":
                expected_base = NOT_FOUND  # the placeholder id names no job
            cases.append(Case(f"{prefix} valid base", service, method, base, expected_base))
            for label, request, code in walk(rpc, variant, base):
                code = OVERRIDES.get(f"{prefix}:{label}", code)
                cases.append(Case(f"{prefix} {label}", service, method, request, code))
    cases += _extra_cases()
    # Cases that may break the world for every later case when they are wrongly accepted (an
    # artifact written under another kind's name) run last.
    cases.sort(key=lambda c: any(mark in c.id for mark in WORLD_BREAKERS))
    seen: set[str] = set()
    for case in cases:
        assert case.id not in seen, f"duplicate case id {case.id}"
        seen.add(case.id)
    return cases


# RPCs whose heavy request below takes far more than 1 ms of server work.
SLOW_ENOUGH = ("generator.Synthesize", "scorer.Score", "scorer.EmbedText", "editor.Edit", "editor.Invert")


def _extra_cases() -> list[Case]:
    """Whole-request cases: empty requests, 1 ms deadlines, cancels, stream sequences."""
    empty = {
        "generator.Sample": INVALID,  # count 0: an empty batch
        "generator.Synthesize": INVALID,
        "scorer.Score": INVALID,
        "scorer.EmbedText": INVALID,
        "trainer.StartJob": INVALID,
        "trainer.GetJob": INVALID,
        "trainer.CancelJob": INVALID,
        "trainer.WatchJob": INVALID,
        "trainer.ListJobs": OK,
        "editor.ListEdits": OK,
        "editor.Edit": INVALID,
        "editor.Invert": INVALID,
        "generator.ListModels": OK,
        "scorer.ListHeads": OK,
    }
    cases = []
    for rpc, code in empty.items():
        service, method = rpc.split(".")
        cases.append(Case(f"{rpc} empty request", service, method, _method(rpc).input_type._concrete_class(), code))
    heavy_latents = types_pb2.Latents(space=1, values=tensor(z(1024)))
    heavy = {
        "generator.Synthesize": generator_pb2.SynthesizeRequest(latents=heavy_latents, image_encoding=2),
        "generator.Sample": generator_pb2.SampleRequest(count=1024),
        "scorer.Score": scorer_pb2.ScoreRequest(images=raw_images(64)),
        "scorer.EmbedText": scorer_pb2.EmbedTextRequest(texts=["a smiling young woman with glasses"] * 256),
        "trainer.ListJobs": trainer_pb2.ListJobsRequest(page_size=500),
        "trainer.StartJob": trainer_pb2.StartJobRequest(pca=trainer_pb2.PCAJobSpec(num_samples=100, num_components=2)),
        "editor.Edit": edit_request("interfacegan", editor_pb2.InterFaceGANEdit(boundary=YAW, end_distance=3), count=256,
                                    frames=256, score_heads=["pose"]),
        "editor.Invert": editor_pb2.InvertRequest(images=raw_images(16), steps=5000),
        "editor.ListEdits": editor_pb2.ListEditsRequest(),
        "generator.ListModels": generator_pb2.ListModelsRequest(),
        "scorer.ListHeads": scorer_pb2.ListHeadsRequest(),
    }
    for rpc, request in heavy.items():
        service, method = rpc.split(".")
        if rpc in SLOW_ENOUGH:
            cases.append(Case(f"{rpc} 1 ms deadline", service, method, request, DEADLINE, timeout=TINY_DEADLINE_S))
        else:
            # A light call can be answered within 1 ms on loopback, and even a 1 us deadline raced a fast
            # ListModels once: the deadline is set a second in the past, so it has passed before the call starts.
            cases.append(Case(f"{rpc} deadline already passed", service, method, request, DEADLINE, timeout=-1.0))
    stream = generator_pb2.SynthesizeRequest(latents=types_pb2.Latents(space=1, values=tensor(z(64))))
    cases.append(Case("generator.SynthesizeStream 1 ms deadline", "generator", "SynthesizeStream", stream, DEADLINE,
                      timeout=TINY_DEADLINE_S, stream_prefix=[stream] * 3))
    cases.append(Case("generator.SynthesizeStream client cancel after the first answer", "generator", "SynthesizeStream",
                      stream, CANCELLED, cancel_after=1, stream_prefix=[stream] * 3))
    bad = generator_pb2.SynthesizeRequest(latents=types_pb2.Latents(space=1, values=tensor(z(1)[:, :99])))
    cases.append(Case("generator.SynthesizeStream a bad request after two good ones", "generator", "SynthesizeStream", bad,
                      INVALID, stream_prefix=[stream] * 2))
    long_edit = heavy["editor.Edit"]
    cases.append(Case("editor.Edit client cancel after the first frame", "editor", "Edit", long_edit, CANCELLED, cancel_after=1))
    cases.append(Case("editor.Invert client cancel after the first report", "editor", "Invert",
                      editor_pb2.InvertRequest(images=raw_images(4), steps=5000, report_every=1), CANCELLED, cancel_after=1))
    cases.append(Case("trainer.WatchJob client cancel mid-stream", "trainer", "WatchJob",
                      trainer_pb2.WatchJobRequest(id="@running"), CANCELLED, cancel_after=1))
    cases.append(Case("editor.Edit condition equals the edited boundary", "editor", "Edit", edit_request(
        "interfacegan", editor_pb2.InterFaceGANEdit(boundary=YAW, condition_boundaries=[YAW], end_distance=1)), INVALID))
    cases.append(Case("editor.Edit a PCA artifact named as a boundary", "editor", "Edit", edit_request(
        "interfacegan", editor_pb2.InterFaceGANEdit(boundary=PCA, end_distance=1)), NOT_FOUND))
    cases.append(Case("editor.Edit W+ rows on a Z boundary", "editor", "Edit", edit_request(
        "interfacegan", editor_pb2.InterFaceGANEdit(boundary=YAW, end_distance=1, rows=types_pb2.RowRange(start=0, end=3))), INVALID))
    cases.append(Case("editor.Edit SGF keypoint target on an attribute mapping", "editor", "Edit", edit_request("sgf", editor_pb2.SGFEdit(
        mapping=MAPPINGS["attributes"], keypoints=editor_pb2.KeypointTarget(points=tensor(np.zeros((5, 2), np.float32))))), PRECONDITION))
    cases.append(Case("editor.Edit latents in W for a Z boundary", "editor", "Edit", editor_pb2.EditRequest(
        latents=types_pb2.Latents(space=2, values=tensor(z(1))), interfacegan=editor_pb2.InterFaceGANEdit(boundary=YAW)), INVALID))
    cases.append(Case("editor.Edit 257 start latents", "editor", "Edit", editor_pb2.EditRequest(
        latents=latents(257), interfacegan=editor_pb2.InterFaceGANEdit(boundary=YAW)), EXHAUSTED))
    cases.append(Case("scorer.EmbedText 257 texts", "scorer", "EmbedText", scorer_pb2.EmbedTextRequest(texts=["a"] * 257), EXHAUSTED))
    cases.append(Case("scorer.EmbedText a blank text", "scorer", "EmbedText", scorer_pb2.EmbedTextRequest(texts=["ok", "  "]), INVALID))
    cases.append(Case("generator.Synthesize return layer before the input", "generator", "Synthesize", generator_pb2.SynthesizeRequest(
        features=types_pb2.LayerFeatures(layer="block2", values=tensor(np.zeros((1, 256, 8, 8), np.float32))),
        return_layers=["block1"]), INVALID))
    cases.append(Case("generator.Synthesize features at the output layer", "generator", "Synthesize", generator_pb2.SynthesizeRequest(
        features=types_pb2.LayerFeatures(layer="image", values=tensor(np.zeros((1, 3, 64, 64), np.float32)))), INVALID))
    cases.append(Case("generator.Synthesize nothing to return", "generator", "Synthesize", generator_pb2.SynthesizeRequest(
        latents=latents(1), omit_images=True), INVALID))
    cases.append(Case("generator.Synthesize TensorRT on a CPU machine", "generator", "Synthesize", generator_pb2.SynthesizeRequest(
        latents=latents(1), backend=types_pb2.BACKEND_TENSORRT), PRECONDITION))
    cases.append(Case("generator.Sample W space of a Z-only model", "generator", "Sample", generator_pb2.SampleRequest(
        count=1, space=types_pb2.LATENT_SPACE_W), INVALID))
    # The limits table (latentedit/limits.py): just over each limit a request can reach cheaply.
    big = types_pb2.Latents(space=1, values=tensor(np.full((1, DIM), 2e4, np.float32)))
    cases.append(Case("generator.Synthesize latents of 2e4 (over latent_abs)", "generator", "Synthesize",
                      generator_pb2.SynthesizeRequest(latents=big), INVALID))
    cases.append(Case("editor.Edit start latents of 2e4 (over latent_abs)", "editor", "Edit", editor_pb2.EditRequest(
        latents=big, interfacegan=editor_pb2.InterFaceGANEdit(boundary=YAW, end_distance=1)), INVALID))
    cases.append(Case("editor.Edit distance 1001 (over edit_distance)", "editor", "Edit", edit_request(
        "interfacegan", editor_pb2.InterFaceGANEdit(boundary=YAW, end_distance=1001)), INVALID))
    cases.append(Case("editor.Edit 65 condition boundaries (over list_items)", "editor", "Edit", edit_request(
        "interfacegan", editor_pb2.InterFaceGANEdit(boundary=YAW, condition_boundaries=[SMILE] * 65, end_distance=1)), INVALID))
    cases.append(Case("editor.Edit 65 SGF attribute targets (over list_items)", "editor", "Edit", edit_request("sgf", editor_pb2.SGFEdit(
        mapping=MAPPINGS["attributes"], attributes=editor_pb2.AttributeTarget(values=[editor_pb2.AttributeValue(
            attribute=attribute("pose", "yaw"), value=1.0)] * 65))), INVALID))
    cases.append(Case("editor.Edit caption of 2001 characters (over text_chars)", "editor", "Edit", edit_request("sgf", editor_pb2.SGFEdit(
        mapping=MAPPINGS["caption"], caption=editor_pb2.CaptionTarget(text="a" * 2001))), INVALID))
    cases.append(Case("trainer.StartJob correlation of 65 boundaries (over list_items)", "trainer", "StartJob", trainer_pb2.StartJobRequest(
        correlation=trainer_pb2.CorrelationJobSpec(boundaries=[YAW, SMILE] * 33, num_samples=100)), INVALID))
    cases.append(Case("trainer.StartJob mapping of 100,001 pairs (over mapping_pairs)", "trainer", "StartJob", trainer_pb2.StartJobRequest(
        mapping=trainer_pb2.MappingJobSpec(condition=1, attributes=[attribute("pose", "yaw")], num_pairs=100_001)), INVALID))
    cases.append(Case("trainer.StartJob mapping 17 layers deep (over mapping_depth)", "trainer", "StartJob", trainer_pb2.StartJobRequest(
        mapping=trainer_pb2.MappingJobSpec(condition=1, attributes=[attribute("pose", "yaw")], num_pairs=100, depth=17)), INVALID))
    cases.append(Case("trainer.StartJob mapping 1025 wide (over mapping_width)", "trainer", "StartJob", trainer_pb2.StartJobRequest(
        mapping=trainer_pb2.MappingJobSpec(condition=1, attributes=[attribute("pose", "yaw")], num_pairs=100, hidden_dim=1025)), INVALID))
    cases.append(Case("trainer.StartJob boundary of 500,001 samples (over job_samples)", "trainer", "StartJob", trainer_pb2.StartJobRequest(
        boundary=trainer_pb2.BoundaryJobSpec(attribute=attribute("pose", "yaw"), num_samples=500_001)), INVALID))
    cases.append(Case("trainer.StartJob idempotency key reused with another spec", "trainer", "StartJob", trainer_pb2.StartJobRequest(
        idempotency_key="corpus-yaw", pca=trainer_pb2.PCAJobSpec(num_samples=100, num_components=2)), INVALID))
    cases.append(Case("trainer.StartJob correlation of one boundary", "trainer", "StartJob", trainer_pb2.StartJobRequest(
        correlation=trainer_pb2.CorrelationJobSpec(boundaries=[YAW], num_samples=100)), INVALID))
    cases.append(Case("trainer.StartJob a boundary named like a head", "trainer", "StartJob", trainer_pb2.StartJobRequest(
        custom_boundary=trainer_pb2.CustomBoundaryJobSpec(latents=latents(40), labels=tensor(np.arange(40) % 2),
                                                          options=trainer_pb2.TrainingOptions(artifact_name="pose"))),
                      grpc.StatusCode.ALREADY_EXISTS))
    return cases


# ---- calling ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    seconds: float
    answers: int = 0
    response: Message | None = None


def call(channel: grpc.Channel, case: Case, substitute: dict[str, str] | None = None) -> Outcome:
    """Run one case through a generic stub built from the method descriptor."""
    descriptor = _method(case.rpc)
    path = f"/{descriptor.containing_service.full_name}/{descriptor.name}"
    request = case.request
    if substitute and getattr(request, "id", None) in substitute:
        request = copy.deepcopy(request)
        request.id = substitute[request.id]
    serialize = type(request).SerializeToString
    deserialize = descriptor.output_type._concrete_class.FromString
    started = time.monotonic()
    answers, last = 0, None
    try:
        if descriptor.client_streaming:
            multi = channel.stream_stream(path, request_serializer=serialize, response_deserializer=deserialize)
            requests: queue.SimpleQueue = queue.SimpleQueue()
            for item in [*case.stream_prefix, request]:
                requests.put(item)
            if case.cancel_after is None:
                requests.put(None)  # end of the request stream: half-close
            responses = multi(iter(requests.get, None), timeout=case.timeout)
        elif descriptor.server_streaming:
            multi = channel.unary_stream(path, request_serializer=serialize, response_deserializer=deserialize)
            responses = multi(request, timeout=case.timeout)
        else:
            multi = channel.unary_unary(path, request_serializer=serialize, response_deserializer=deserialize)
            last = multi(request, timeout=case.timeout)
            return Outcome(OK, "", time.monotonic() - started, 1, last)
        try:
            for last in responses:  # noqa: B007 - the last answer is returned
                answers += 1
                if case.cancel_after is not None and answers >= case.cancel_after:
                    responses.cancel()
        finally:
            if descriptor.client_streaming and case.cancel_after is not None:
                requests.put(None)
        return Outcome(OK, "", time.monotonic() - started, answers, last)
    except grpc.RpcError as exc:
        return Outcome(exc.code(), exc.details() or "", time.monotonic() - started, answers, last)


def valid_call(channels: dict[str, grpc.Channel], service: str, boundary: str = YAW) -> Outcome:
    """A cheap valid call that does real work on `service`: it must succeed after every case."""
    requests = {
        "generator": Case("probe", "generator", "Synthesize", generator_pb2.SynthesizeRequest(latents=latents(1)), OK),
        "scorer": Case("probe", "scorer", "Score", scorer_pb2.ScoreRequest(images=raw_images(1), heads=["pose"]), OK),
        # StartJob resolves the generator and the head before it finds the existing job by its key.
        "trainer": Case("probe", "trainer", "StartJob", PROBE_JOB, OK),
        "editor": Case("probe", "editor", "Edit", edit_request("interfacegan", editor_pb2.InterFaceGANEdit(
            boundary=boundary, end_distance=1), frames=1, omit_images=False), OK),
    }
    return call(channels[service], requests[service])


# ---- the four services as separate processes ----------------------------------------------------


def _free_port() -> int:
    from tests.conftest import free_port  # one allocator: ports are never handed out twice

    return free_port()


def _security_section(code_root: Path) -> dict[str, Any]:
    """`insecure: true` where the services' config knows the key (the authentication work adds
    it), asked of the code the services will run."""
    probe = Path(tempfile.mkdtemp()) / "probe.yaml"
    for candidate in ({"insecure": True}, {"security": {"insecure": True}}):
        probe.write_text(yaml.safe_dump(candidate))
        check = subprocess.run([sys.executable, "-c", f"from latentedit.config import load_config; load_config({str(probe)!r})"],
                               cwd=code_root, capture_output=True, timeout=120)
        if check.returncode == 0:
            return candidate
    return {}



def stop_processes(processes) -> None:
    """SIGTERM every process still running, then wait (30 s each; kill -9 past that)."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

class ProcessSuite:
    """generator, scorer, trainer and editor, each its own `latentedit serve NAME` process."""

    NAMES = ("generator", "scorer", "trainer", "editor")

    def __init__(self, repository: str | os.PathLike[str], workdir: str | os.PathLike[str],
                 sections: dict[str, Any] | None = None, code_root: str | os.PathLike[str] | None = None) -> None:
        self.repository = str(repository)
        # Where the services' code is imported from (a snapshot of a commit, say); default: this checkout.
        self.code_root = Path(code_root or os.environ.get("LATENTEDIT_CODE_ROOT") or ROOT)
        self.workdir = Path(workdir)
        self.ports = {name: _free_port() for name in self.NAMES}
        self.config_path = self.workdir / "suite.yaml"
        config = {"repository": self.repository,
                  "services": {n: {"port": p, "grace_period_s": 2} for n, p in self.ports.items()},
                  "generator": {"poll_interval_s": 0.5}, "scorer": {"poll_interval_s": 0.5},
                  **_security_section(self.code_root)}
        for section, values in (sections or {}).items():
            if isinstance(values, dict):
                config.setdefault(section, {}).update(values)
            else:
                config[section] = values
        self.config_path.write_text(yaml.safe_dump(config))
        self.processes: dict[str, subprocess.Popen] = {}
        self._channels: dict[str, grpc.Channel] = {}

    def address(self, name: str) -> str:
        return f"localhost:{self.ports[name]}"

    def start(self, *names: str, timeout_s: float = 300.0) -> None:
        names = names or self.NAMES
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("LATENTEDIT_REPOSITORY", None)
        for name in names:
            log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "latentedit", "--config", str(self.config_path), "serve", name],
                cwd=self.code_root, env=env, stdout=log, stderr=subprocess.STDOUT)
            log.close()
        for name in names:
            self.wait_serving(name, timeout_s)

    def wait_serving(self, name: str, timeout_s: float = 300.0) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel(name))
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            process = self.processes[name]
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}: {self.log_tail(name)}")
            try:
                # Check blocks until the channel connects or its own deadline passes: no sleep needed.
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2, wait_for_ready=True).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = str(status)
                watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=min(5.0, deadline - time.monotonic()))
                try:
                    for update in watch:  # returns at the first SERVING, or at the watch's deadline
                        if update.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                except grpc.RpcError:
                    pass
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
        raise RuntimeError(f"{name} never reported SERVING within {timeout_s:.0f} s (last: {last}); {self.log_tail(name)}")

    def log_tail(self, name: str, chars: int = 2000) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def channel(self, name: str) -> grpc.Channel:
        if name not in self._channels:
            from latentedit.rpc.client import connect

            self._channels[name] = connect(self.address(name))
        return self._channels[name]

    @property
    def channels(self) -> dict[str, grpc.Channel]:
        return {name: self.channel(name) for name in self.NAMES}

    def pid(self, name: str) -> int:
        return self.processes[name].pid

    def rss_bytes(self, name: str) -> int:
        for line in Path(f"/proc/{self.pid(name)}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for {name}")

    def threads(self, name: str) -> int:
        for line in Path(f"/proc/{self.pid(name)}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
        return 0

    def kill(self, name: str) -> None:
        """kill -9, and wait for the process to be gone."""
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait(30)

    def alive(self, name: str) -> bool:
        return self.processes[name].poll() is None

    def stop(self) -> None:
        stop_processes(self.processes.values())
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


def trainer_stub(suite: ProcessSuite):
    from latentedit.api.v1 import trainer_pb2_grpc

    return trainer_pb2_grpc.TrainerServiceStub(suite.channel("trainer"))


def run_job(suite: ProcessSuite, request: trainer_pb2.StartJobRequest, timeout_s: float = 600.0) -> trainer_pb2.Job:
    """Start a job and follow WatchJob to its end; returns the final job."""
    stub = trainer_stub(suite)
    job = stub.StartJob(request, timeout=120)
    final = job
    for event in stub.WatchJob(trainer_pb2.WatchJobRequest(id=job.id), timeout=timeout_s):
        final = event.job
    return final


def _yaw_job() -> trainer_pb2.StartJobRequest:
    return trainer_pb2.StartJobRequest(idempotency_key=YAW, boundary=trainer_pb2.BoundaryJobSpec(
        attribute=attribute("pose", "yaw"), num_samples=200, keep_fraction=0.25,
        options=trainer_pb2.TrainingOptions(artifact_name=YAW, batch_size=100)))


PROBE_JOB = _yaw_job()


def prepare_artifacts(suite: ProcessSuite) -> dict[str, str]:
    """Train, through the trainer, the small artifacts the Edit bases use; returns {name: job id}."""
    start = trainer_pb2.StartJobRequest
    options = lambda name, **kw: trainer_pb2.TrainingOptions(artifact_name=name, **kw)  # noqa: E731
    jobs = [
        PROBE_JOB,
        start(idempotency_key=SMILE, boundary=trainer_pb2.BoundaryJobSpec(
            attribute=attribute("expression", "probabilities", "happy"), num_samples=200, keep_fraction=0.25,
            options=options(SMILE, batch_size=100))),
        start(idempotency_key=PCA, pca=trainer_pb2.PCAJobSpec(layer="block1", num_samples=100, num_components=2,
                                                              options=options(PCA))),
        start(idempotency_key=DIRECTIONS, directions=trainer_pb2.DirectionJobSpec(
            layer="block2", num_directions=2, num_channel_subspaces=2, num_samples=2,
            options=options(DIRECTIONS, steps=3, batch_size=4))),
        start(idempotency_key=FLOW, flow=trainer_pb2.FlowJobSpec(
            attributes=[attribute("pose", "yaw")], num_samples=100, num_coupling_layers=2, hidden_dim=16,
            options=options(FLOW, steps=5))),
        start(idempotency_key=MAPPINGS["attributes"], mapping=trainer_pb2.MappingJobSpec(
            condition=trainer_pb2.CONDITION_KIND_ATTRIBUTES, attributes=[attribute("pose", "yaw")], num_pairs=100, depth=2,
            hidden_dim=16, options=options(MAPPINGS["attributes"], steps=5, batch_size=100))),
        start(idempotency_key=MAPPINGS["keypoints"], mapping=trainer_pb2.MappingJobSpec(
            condition=trainer_pb2.CONDITION_KIND_KEYPOINTS, keypoints_head="keypoints5", num_pairs=100, depth=2, hidden_dim=16,
            options=options(MAPPINGS["keypoints"], steps=5, batch_size=100))),
        start(idempotency_key=MAPPINGS["caption"], mapping=trainer_pb2.MappingJobSpec(
            condition=trainer_pb2.CONDITION_KIND_CAPTION, num_pairs=100, depth=2, hidden_dim=16,
            options=options(MAPPINGS["caption"], steps=5, batch_size=100))),
    ]
    ids = {}
    for request in jobs:
        final = run_job(suite, request)
        if final.state != trainer_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"fixture job {request.idempotency_key} ended {trainer_pb2.JobState.Name(final.state)}: {final.error}")
        ids[request.idempotency_key] = final.id
    return ids


def run_case(suite: ProcessSuite, case: Case) -> tuple[Outcome, Outcome]:
    """The case, then a valid call to the same service. A job a case started is cancelled."""
    substitute, running = {}, None
    if getattr(case.request, "id", None) == "@running":
        # A job that runs for minutes, so the watch is certainly mid-stream when the client cancels.
        running = trainer_stub(suite).StartJob(trainer_pb2.StartJobRequest(boundary=trainer_pb2.BoundaryJobSpec(
            attribute=attribute("pose", "yaw"), num_samples=LONG_JOB_SAMPLES, keep_fraction=0.1)), timeout=60)
        substitute["@running"] = running.id
    outcome = call(suite.channel(case.service), case, substitute)
    started = [running.id] if running is not None else []
    if case.rpc == "trainer.StartJob" and outcome.code == OK and outcome.response is not None:
        started.append(outcome.response.id)
    for job_id in started:
        try:
            trainer_stub(suite).CancelJob(trainer_pb2.CancelJobRequest(id=job_id), timeout=30)
        except grpc.RpcError:
            pass  # already finished
    after = valid_call(suite.channels, case.service)
    if after.code == OK and case.rpc == "trainer.StartJob":
        # An artifact written under another kind's name can shadow a generator or a head.
        for dependency in ("generator", "scorer"):
            after = valid_call(suite.channels, dependency)
            if after.code != OK:
                after.details = f"(the {dependency} afterwards) {after.details}"
                break
    return outcome, after


# ---- reporting ----------------------------------------------------------------------------------


def hung(case: Case, outcome: Outcome) -> bool:
    """A call that ran into its own deadline although the case expected another answer."""
    return outcome.code == DEADLINE and case.expected != DEADLINE


def wrong(case: Case, outcome: Outcome, after: Outcome) -> bool:
    return outcome.code != case.expected or after.code != OK


def where_to_fix(case: Case, outcome: Outcome) -> str:
    """A best guess at the file where a wrong answer gets fixed (for the findings list)."""
    details, label = outcome.details, case.id
    if "metadata size exceeds" in details:
        return "latentedit/rpc/serving.py (_abort_for: cap the message it repeats) or latentedit/errors.py"
    if outcome.code == grpc.StatusCode.INTERNAL and "OSError" in details:
        return "latentedit/repository.py (resolve: validate names used to read)"
    if any(m in label for m in WORLD_BREAKERS):
        return "latentedit/repository.py (write: one namespace per kind) / latentedit/methods/base.py (job_basics)"
    if case.service == "trainer" and case.method in ("GetJob", "CancelJob", "WatchJob"):
        return "trainer_svc/service.py or trainer_svc/store.py (job ids: the allowed pattern)"
    if ": traversal" in label or ": absolute" in label or ": nul" in label:
        return "latentedit/repository.py (resolve: validate names used to read)"
    if "page_token" in label:
        return "trainer_svc/service.py (ListJobs page_token)"
    if "1e300" in label:
        return "latentedit/wire.py (from_tensor: finite after the cast to float32)"
    if "images:" in label:
        return "latentedit/wire.py (decode_images)" if "PNG" in label or "header" in label else f"{case.service}_svc/service.py"
    if "generator.version" in label and case.service in ("trainer", "editor"):
        return ("editor_svc/service.py (ListEdits)" if case.method == "ListEdits"
                else "latentedit/rpc/remote_world.py (generator(): negative version)")
    if case.rpc == "trainer.StartJob":
        if "display_name" in label or "attribute_name" in label or "idempotency_key" in label:
            return "trainer_svc/service.py (StartJob: bound stored strings)"
        if "options." in label:
            return "latentedit/methods/base.py (job_basics: validate every TrainingOptions field)"
        if "attribute" in label:
            return "latentedit/methods/base.py or the method's job_spec (AttributeRef label/index)"
        for method, module in (("boundary", "interfacegan"), ("correlation", "interfacegan"), ("directions", "dplase"),
                               ("mapping", "sgf"), ("pca", "ganspace")):
            if f"[{method}" in label:
                return f"latentedit/methods/{module}.py (job_spec)"
    if case.rpc == "editor.Edit":
        for variant, module in (("[interfacegan", "interfacegan"), ("[ganspace", "ganspace"), ("[dplase", "dplase"),
                                ("[sgf", "sgf")):
            if variant in label:
                return f"latentedit/methods/{module}.py (edit_options / prepare)"
        return "editor_svc/service.py"
    return {"generator": "generator_svc/service.py", "scorer": "scorer_svc/service.py", "trainer": "trainer_svc/service.py",
            "editor": "editor_svc/service.py"}[case.service]


def _short(text: str, limit: int = 200) -> str:
    return text.replace("\n", " ").replace("|", "/")[:limit]


def findings_markdown(rows: list[tuple[Case, Outcome, Outcome]], title: str) -> str:
    bad = [(c, o, a) for c, o, a in rows if wrong(c, o, a)]
    internal = sum(o.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) for _, o, _ in rows)
    hangs = sum(hung(c, o) for c, o, _ in rows)
    lines = [f"# Bad-input corpus findings ({title})", "",
             f"{len(rows)} cases run; {len(bad)} answered other than expected (or broke the service for the next call); "
             f"INTERNAL/UNKNOWN: {internal}; hangs: {hangs}.", "",
             "One line per case: RPC | input | expected | got: message (first 200 chars) | the call after | where the fix belongs", ""]
    for case, outcome, after in bad:
        after_text = "next call OK" if after.code == OK else f"NEXT CALL {after.code.name}: {_short(after.details, 120)}"
        lines.append(f"- {case.rpc} | {case.id} | {case.expected.name} | {outcome.code.name}: {_short(outcome.details)} | "
                     f"{after_text} | {where_to_fix(case, outcome)}")
    return "\n".join(lines) + "\n"


def summary(rows: list[tuple[Case, Outcome, Outcome]]) -> dict[str, Any]:
    import collections

    per_rpc: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for case, outcome, _ in rows:
        per_rpc[case.rpc][outcome.code.name] += 1
    return {
        "cases": len(rows),
        "per_rpc": {rpc: dict(codes) for rpc, codes in sorted(per_rpc.items())},
        "per_service": dict(collections.Counter(c.service for c, _, _ in rows)),
        "codes": dict(collections.Counter(o.code.name for _, o, _ in rows)),
        "wrong": sum(wrong(c, o, a) for c, o, a in rows),
        "internal": sum(o.code == grpc.StatusCode.INTERNAL for _, o, _ in rows),
        "unknown": sum(o.code == grpc.StatusCode.UNKNOWN for _, o, _ in rows),
        "hangs": sum(hung(c, o) for c, o, _ in rows),
        "next_call_failed": sum(a.code != OK for _, _, a in rows),
    }

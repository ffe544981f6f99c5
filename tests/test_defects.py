"""Regression tests for the defects the production issue (#12) found from outside, as a client.

Each runs through real stubs on services in this process (on a private copy of the repository,
since some of them try to damage it), and checks the status code and that serving goes on.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from latentedit import wire
from latentedit.api.v1 import (
    editor_pb2,
    editor_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    scorer_pb2,
    scorer_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
    types_pb2,
)
from latentedit.install import link_or_copy
from latentedit.rpc.serving import channel_options
from tests.conftest import private_copy, start_services

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MAX_DETAILS = 2048  # latentedit.errors.MAX_MESSAGE_BYTES
TERMINAL = (trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED, trainer_pb2.JOB_STATE_CANCELLED)
MiB = 1 << 20


@pytest.fixture(scope="module")
def suite(installed_repo, tmp_path_factory):
    """The four services on a private copy of the repository: (repo, stubs by service name)."""
    repo = private_copy(installed_repo, tmp_path_factory.mktemp("defects") / "repo", keep_cache=True)
    _, hosts = start_services(repo)
    channels = {n: grpc.insecure_channel(f"localhost:{h.port}", options=channel_options()) for n, h in hosts.items()}
    stubs = {"generator": generator_pb2_grpc.GeneratorServiceStub(channels["generator"]),
             "scorer": scorer_pb2_grpc.ScorerServiceStub(channels["scorer"]),
             "trainer": trainer_pb2_grpc.TrainerServiceStub(channels["trainer"]),
             "editor": editor_pb2_grpc.EditorServiceStub(channels["editor"])}
    yield repo, stubs
    for channel in channels.values():
        channel.close()
    for host in reversed(list(hosts.values())):
        host.stop(0)


def _status(call, request, timeout=60):
    """(code, details) of a call (unary or server streaming); (OK, "") when it succeeds."""
    try:
        result = call(request, timeout=timeout)
        if not hasattr(result, "ListFields"):
            list(result)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _expect(call, request, code, *texts, timeout=60):
    got, details = _status(call, request, timeout)
    assert got == code, f"{got}: {details[:300]}"
    for text in texts:
        assert text in details, details[:300]
    assert len(details.encode()) <= MAX_DETAILS + 100, f"a {len(details)}-character message"
    return details


def _serving(stubs):
    """The default world still answers (after a bad call)."""
    response = stubs["generator"].Sample(generator_pb2.SampleRequest(count=1, seed=1), timeout=60)
    assert response.model.name == "dcgan-faces"


def _latents(array, space=types_pb2.LATENT_SPACE_Z):
    return types_pb2.Latents(space=space, values=wire.to_tensor(array))


def _custom_boundary(name="", count=40, **fields):
    latents = np.random.default_rng(0).standard_normal((count, 100)).astype(np.float32)
    labels = (latents[:, 0] > 0).astype(np.float32)
    return trainer_pb2.StartJobRequest(custom_boundary=trainer_pb2.CustomBoundaryJobSpec(
        latents=_latents(latents), labels=wire.to_tensor(labels), options=trainer_pb2.TrainingOptions(artifact_name=name), **fields))


@pytest.fixture(scope="module")
def boundaries(suite):
    """Two boundaries trained from caller labels, "cb-one" and "cb-two"."""
    _, stubs = suite
    for name in ("cb-one", "cb-two"):
        job = _finish(stubs["trainer"], stubs["trainer"].StartJob(_custom_boundary(name), timeout=60).id)
        assert job.state == trainer_pb2.JOB_STATE_SUCCEEDED and job.artifact.ref.name == name, job.error
    return "cb-one", "cb-two"


def _finish(trainer, job_id, timeout=120):
    for event in trainer.WatchJob(trainer_pb2.WatchJobRequest(id=job_id), timeout=timeout):
        if event.job.state in TERMINAL:
            return event.job
    raise AssertionError(f"job {job_id}: the watch ended before the job did")


# ---- 1. artifact kinds do not share one namespace silently -----------------------------------


def test_a_job_cannot_write_its_artifact_under_a_name_of_another_kind(suite, boundaries):
    """A boundary named like the generator (or a scorer head, or an artifact of another kind) is
    refused at StartJob with ALREADY_EXISTS; the generator and the head are never shadowed."""
    repo, stubs = suite
    trainer = stubs["trainer"]
    _expect(trainer.StartJob, _custom_boundary("dcgan-faces"), grpc.StatusCode.ALREADY_EXISTS,
            "'dcgan-faces' already holds a generator")
    _expect(trainer.StartJob, _custom_boundary("pose"), grpc.StatusCode.ALREADY_EXISTS, "'pose' already holds a head")
    assert repo.kinds("dcgan-faces") == {"generator"} and repo.kinds("pose") == {"head"}
    _serving(stubs)
    heads = stubs["scorer"].ListHeads(scorer_pb2.ListHeadsRequest(), timeout=60)
    assert "pose" in {h.name for h in heads.heads}
    # PCA directions (another kind) named like a boundary.
    pca = trainer_pb2.StartJobRequest(pca=trainer_pb2.PCAJobSpec(options=trainer_pb2.TrainingOptions(artifact_name="cb-one")))
    _expect(trainer.StartJob, pca, grpc.StatusCode.ALREADY_EXISTS, "'cb-one' already holds a boundary",
            "pca-directions cannot be written")
    from latentedit.methods.registry import METHODS

    assert METHODS["interfacegan"].job_artifact_kind("correlation") == "correlation-report"
    # The same kind under the same name is a new version, as before.
    job = _finish(trainer, trainer.StartJob(_custom_boundary("cb-two"), timeout=60).id)
    assert job.state == trainer_pb2.JOB_STATE_SUCCEEDED and job.artifact.ref.version == 2, job.error
    assert repo.kinds("cb-two") == {"boundary"}


def test_reads_by_kind_skip_versions_of_another_kind(suite):
    """A repository damaged before the fix (a boundary written as the generator's newest version)
    still serves the generator: a read by kind takes the newest version of that kind."""
    repo, stubs = suite
    damaged = repo.root / "dcgan-faces" / "99"
    damaged.mkdir()
    try:
        (damaged / "manifest.json").write_text('{"kind": "boundary", "name": "dcgan-faces", "version": 99, "files": {}}')
        assert repo.resolve("dcgan-faces", kind="generator").version == 1
        assert "dcgan-faces" in repo.names("generator") and "dcgan-faces" in repo.names("boundary")
        _serving(stubs)
        models = stubs["generator"].ListModels(generator_pb2.ListModelsRequest(), timeout=60)
        assert "dcgan-faces" in {m.ref.name for m in models.models}
    finally:
        shutil.rmtree(damaged)


# ---- 2. names that reach the file system: one pattern, for reads and writes -------------------

BAD_NAMES = {
    "relative path": "./dcgan-faces/",
    "trailing slash": "dcgan-faces/",
    "parent": "..",
    "parent path": "../model-repo/dcgan-faces",
    "inner parent": "a/../dcgan-faces",
    "absolute path": "/etc/passwd",
    "NUL byte": "dcgan-faces\0",
    "newline": "dcgan-faces\n",
    "upper case": "DCGAN-FACES",
    "129 characters": "d" * 129,
    "1 MiB": "d" * MiB,
}


def _name_requests(name):
    """(label, call, request) of every RPC that takes a repository name or job id from the caller."""
    seed = editor_pb2.SeedStart(seed=0, count=1)
    raw = types_pb2.ImageBatch(encoding=types_pb2.IMAGE_ENCODING_RAW_UINT8, raw=wire.to_tensor(np.zeros((1, 64, 64, 3), np.uint8)))
    return [
        ("Sample model", "generator", "Sample", generator_pb2.SampleRequest(model=types_pb2.ModelRef(name=name), count=1)),
        ("Synthesize model", "generator", "Synthesize", generator_pb2.SynthesizeRequest(
            model=types_pb2.ModelRef(name=name), latents=_latents(np.zeros((1, 100), np.float32)))),
        ("Invert generator", "editor", "Invert", editor_pb2.InvertRequest(generator=types_pb2.ModelRef(name=name), images=raw, steps=1)),
        ("Edit generator", "editor", "Edit", editor_pb2.EditRequest(
            generator=types_pb2.ModelRef(name=name), seed=seed, interfacegan=editor_pb2.InterFaceGANEdit(boundary="cb-two"))),
        ("boundary", "editor", "Edit", editor_pb2.EditRequest(seed=seed, interfacegan=editor_pb2.InterFaceGANEdit(boundary=name))),
        ("condition boundary", "editor", "Edit", editor_pb2.EditRequest(seed=seed, interfacegan=editor_pb2.InterFaceGANEdit(
            boundary="cb-two", condition_boundaries=[name]))),
        ("mapping", "editor", "Edit", editor_pb2.EditRequest(seed=seed, sgf=editor_pb2.SGFEdit(
            mapping=name, caption=editor_pb2.CaptionTarget(text="a face")))),
        ("PCA directions", "editor", "Edit", editor_pb2.EditRequest(seed=seed, ganspace=editor_pb2.GANSpaceEdit(directions=name))),
        ("DP-LaSE directions", "editor", "Edit", editor_pb2.EditRequest(seed=seed, dplase=editor_pb2.DPLaSEEdit(directions=name))),
        ("artifact name", "trainer", "StartJob", _custom_boundary(name)),
        ("job generator", "trainer", "StartJob", trainer_pb2.StartJobRequest(pca=trainer_pb2.PCAJobSpec(
            generator=types_pb2.ModelRef(name=name)))),
        ("correlated boundary", "trainer", "StartJob", trainer_pb2.StartJobRequest(correlation=trainer_pb2.CorrelationJobSpec(
            boundaries=["cb-two", name]))),
        ("GetJob id", "trainer", "GetJob", trainer_pb2.GetJobRequest(id=name)),
        ("CancelJob id", "trainer", "CancelJob", trainer_pb2.CancelJobRequest(id=name)),
        ("WatchJob id", "trainer", "WatchJob", trainer_pb2.WatchJobRequest(id=name)),
    ]


@pytest.mark.parametrize("case", list(BAD_NAMES))
def test_every_name_is_checked_against_one_pattern(suite, boundaries, case):
    """Every name a caller gives (models, boundaries, mappings, directions, artifact names, the
    Invert generator, job ids) is INVALID_ARGUMENT outside the one pattern, for reads and writes;
    the message names the field and stays short however long the name was."""
    _, stubs = suite
    wrong = []
    for label, service, rpc, request in _name_requests(BAD_NAMES[case]):
        code, details = _status(getattr(stubs[service], rpc), request)
        if code != INVALID or "not valid" not in details or len(details.encode()) > MAX_DETAILS + 100:
            wrong.append(f"{label}: {code.name} {details[:120]!r} ({len(details)} characters)")
    assert not wrong, "\n".join(wrong)
    _serving(stubs)


def test_one_model_has_one_spelling(suite):
    """Every other spelling of the default generator is refused, so none loads another copy."""
    _, stubs = suite
    for spelling in ("./dcgan-faces", "dcgan-faces/", "dcgan-faces/.", "./dcgan-faces/", "Dcgan-Faces", " dcgan-faces"):
        _expect(stubs["generator"].Sample, generator_pb2.SampleRequest(model=types_pb2.ModelRef(name=spelling), count=1),
                INVALID, "not valid")


def test_a_traversal_name_never_reads_or_writes_outside_the_repository(suite):
    """A complete generator entry next to the repository is out of reach by `..` or an absolute
    path, and a job cannot write there; nothing outside changes."""
    repo, stubs = suite
    outside = repo.root.parent / "outside"
    (outside / "evil").mkdir(parents=True, exist_ok=True)
    shutil.copytree(repo.root / "dcgan-faces" / "1", outside / "evil" / "1", dirs_exist_ok=True, copy_function=link_or_copy)

    def snapshot():
        return sorted(str(p.relative_to(repo.root.parent)) for p in repo.root.parent.rglob("*")
                      if repo.root not in p.parents and p != repo.root)

    before = snapshot()
    for name in ("../outside/evil", str(outside / "evil"), "../outside/new"):
        _expect(stubs["generator"].Sample, generator_pb2.SampleRequest(model=types_pb2.ModelRef(name=name), count=1), INVALID)
        _expect(stubs["trainer"].StartJob, _custom_boundary(name), INVALID, "options.artifact_name")
        _expect(stubs["editor"].Edit, editor_pb2.EditRequest(seed=editor_pb2.SeedStart(count=1),
                                                             interfacegan=editor_pb2.InterFaceGANEdit(boundary=name)), INVALID)
    with pytest.raises(Exception, match="not valid"):
        repo.write("../outside/new", {"kind": "boundary"}, lambda folder: None)
    assert snapshot() == before
    _serving(stubs)


# ---- 3. INTERNAL where the caller erred; messages that echo huge inputs ----------------------


def test_huge_or_malformed_page_tokens_are_invalid_argument(suite):
    _, stubs = suite
    for token in ("9" * 40, "-5", " 5", "1_0", "5.0", "\u0665"):
        _expect(stubs["trainer"].ListJobs, trainer_pb2.ListJobsRequest(page_token=token), INVALID, "page_token")
    first = stubs["trainer"].ListJobs(trainer_pb2.ListJobsRequest(page_size=1), timeout=60)
    if first.next_page_token:
        stubs["trainer"].ListJobs(trainer_pb2.ListJobsRequest(page_size=1, page_token=first.next_page_token), timeout=60)


def test_zero_sized_and_oversized_raw_images_to_invert(suite):
    _, stubs = suite
    for shape in ((1, 0, 0, 3), (1, 0, 64, 3), (1, 64, 0, 3)):
        raw = types_pb2.ImageBatch(encoding=types_pb2.IMAGE_ENCODING_RAW_UINT8, raw=wire.to_tensor(np.zeros(shape, np.uint8)))
        _expect(stubs["editor"].Invert, editor_pb2.InvertRequest(images=raw, steps=1), INVALID, "has no pixels")
    wide = types_pb2.ImageBatch(encoding=types_pb2.IMAGE_ENCODING_RAW_UINT8,
                                raw=wire.to_tensor(np.zeros((1, 1, 4096 * 4096 + 1, 3), np.uint8)))
    _expect(stubs["editor"].Invert, editor_pb2.InvertRequest(images=wide, steps=1), grpc.StatusCode.RESOURCE_EXHAUSTED,
            "larger than the limit")
    _serving(stubs)


@pytest.mark.parametrize("text", ["h" * MiB, "\u00e9" * (MiB // 2), "\U0001f600" * (MiB // 4)])
def test_messages_that_repeat_a_huge_input_keep_their_status(suite, text):
    """An error that names a 1 MiB input (ASCII, or multi-byte UTF-8 that percent-encodes to 3
    bytes per byte) reaches the client with its own code, not RESOURCE_EXHAUSTED."""
    _, stubs = suite
    seed = editor_pb2.SeedStart(count=1)
    _expect(stubs["editor"].Edit, editor_pb2.EditRequest(seed=seed, score_heads=[text], interfacegan=editor_pb2.InterFaceGANEdit(
        boundary="dcgan-faces")), grpc.StatusCode.NOT_FOUND, "head")
    _expect(stubs["scorer"].Score, scorer_pb2.ScoreRequest(heads=[text], images=types_pb2.ImageBatch(
        raw=wire.to_tensor(np.zeros((1, 64, 64, 3), np.uint8)))), grpc.StatusCode.NOT_FOUND)
    _expect(stubs["generator"].Sample, generator_pb2.SampleRequest(model=types_pb2.ModelRef(name=text), count=1), INVALID)
    _serving(stubs)


# ---- 4. non-finite values ------------------------------------------------------------------


def _float_paths(descriptor, depth=0):
    """Paths (tuples of field descriptors) to every float/double field under `descriptor`."""
    from google.protobuf.descriptor import FieldDescriptor

    for field in descriptor.fields:
        if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
            yield (field,)
        elif field.type == FieldDescriptor.TYPE_MESSAGE and depth < 3 and not field.message_type.GetOptions().map_entry:
            for rest in _float_paths(field.message_type, depth + 1):
                yield (field, *rest)


def _repeated(field) -> bool:
    from google.protobuf.descriptor import FieldDescriptor

    flag = getattr(field, "is_repeated", None)
    return bool(flag) if flag is not None else field.label == FieldDescriptor.LABEL_REPEATED


def _set_path(message, path, value):
    for field in path[:-1]:
        child = getattr(message, field.name)
        message = child.add() if _repeated(field) else child
    last = path[-1]
    if _repeated(last):
        getattr(message, last.name).append(value)
    else:
        setattr(message, last.name, value)


def _float_cases():
    from latentedit.methods import registry

    cases = []
    for field in trainer_pb2.StartJobRequest.DESCRIPTOR.oneofs_by_name["spec"].fields:
        if field.name not in registry.PLANNED_JOBS:
            cases += [("trainer", "StartJob", trainer_pb2.StartJobRequest, (field, *p)) for p in _float_paths(field.message_type)]
    for field in editor_pb2.EditRequest.DESCRIPTOR.oneofs_by_name["method"].fields:
        if field.name not in registry.PLANNED:
            cases += [("editor", "Edit", editor_pb2.EditRequest, (field, *p)) for p in _float_paths(field.message_type)]
    cases += [("editor", "Invert", editor_pb2.InvertRequest, p) for p in _float_paths(editor_pb2.InvertRequest.DESCRIPTOR)]
    return cases


FLOAT_CASES = _float_cases()


def test_the_float_field_list_covers_the_reported_fields():
    names = {".".join(f.name for f in path) for *_, path in FLOAT_CASES}
    for reported in ("boundary.quality_min", "boundary.svm_c", "boundary.threshold", "custom_boundary.svm_c",
                     "sgf.tolerance", "sgf.attributes.values.value", "mapping.options.learning_rate", "learning_rate"):
        assert reported in names, sorted(names)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_option_of_every_job_spec_and_edit_must_be_finite(suite, value):
    """NaN passes every range check (it compares false), so each float field of every job spec,
    edit method and Invert is refused up front with INVALID_ARGUMENT naming it."""
    _, stubs = suite
    wrong = []
    for service, rpc, message_type, path in FLOAT_CASES:
        request = message_type()
        _set_path(request, path, value)
        if rpc == "Edit":
            request.seed.count = 1
        if rpc == "Invert":
            request.images.raw.CopyFrom(wire.to_tensor(np.zeros((1, 64, 64, 3), np.uint8)))
            request.steps = 1
        code, details = _status(getattr(stubs[service], rpc), request)
        label = f"{rpc} {'.'.join(f.name for f in path)}"
        # Invert's one float (learning_rate) is refused by its range check, in its own words.
        if code != INVALID or path[-1].name not in details or ("finite" not in details and rpc != "Invert"):
            wrong.append(f"{label}={value}: {code.name} {details[:150]!r}")
    assert not wrong, "\n".join(wrong)
    _serving(stubs)


def test_a_nan_sgf_tolerance_never_reports_the_target_reached(suite):
    """Through the editor (refused before any step), and in the algorithm itself."""
    import torch

    from latentedit.errors import InvalidArgument
    from latentedit.methods.sgf import AuxiliaryMapping, sgf_edit

    _, stubs = suite
    for field in ("tolerance", "step_size"):
        request = editor_pb2.EditRequest(seed=editor_pb2.SeedStart(count=1), sgf=editor_pb2.SGFEdit(
            mapping="none", caption=editor_pb2.CaptionTarget(text="a face"), **{field: float("nan")}))
        _expect(stubs["editor"].Edit, request, INVALID, f"sgf.{field}")
    mapping = AuxiliaryMapping(4, 2, depth=2, hidden=8)
    steps = sgf_edit(mapping, lambda z: z[:, :2].clone(), torch.zeros(3, 4), torch.ones(3, 2), 0.2, 1, 5, float("nan"))
    with pytest.raises(InvalidArgument, match="tolerance"):
        list(steps)


def test_float64_values_beyond_float32_are_refused(suite, boundaries):
    """1e300 is a finite float64 and an infinite float32: refused wherever a tensor is decoded
    (latents, keypoint targets, labels), and finite latents far beyond the prior too."""
    _, stubs = suite
    huge = np.full((1, 100), 1e300)
    _expect(stubs["generator"].Synthesize, generator_pb2.SynthesizeRequest(latents=_latents(huge)), INVALID, "finite")
    _expect(stubs["editor"].Edit, editor_pb2.EditRequest(latents=_latents(huge), interfacegan=editor_pb2.InterFaceGANEdit(
        boundary="cb-one")), INVALID, "finite")
    points = wire.to_tensor(np.full((5, 2), 1e300))
    _expect(stubs["editor"].Edit, editor_pb2.EditRequest(seed=editor_pb2.SeedStart(count=1), sgf=editor_pb2.SGFEdit(
        mapping="none", keypoints=editor_pb2.KeypointTarget(points=points))), INVALID, "sgf.keypoints.points", "finite")
    request = _custom_boundary("cb-labels")
    request.custom_boundary.labels.CopyFrom(wire.to_tensor(np.r_[np.full(39, 1.0), 1e300]))
    _expect(stubs["trainer"].StartJob, request, INVALID, "labels", "finite")
    _expect(stubs["editor"].Edit, editor_pb2.EditRequest(latents=_latents(np.full((1, 100), 1e30, np.float32)),
                                                         interfacegan=editor_pb2.InterFaceGANEdit(boundary="cb-one")),
            INVALID, "latent_abs")
    _serving(stubs)


# ---- 5. unbounded job specs: the limits table -------------------------------------------------

YAW = types_pb2.AttributeRef(head="pose", output="yaw")


def _limit_cases():
    seed = editor_pb2.SeedStart(count=1)
    mapping = dict(condition=trainer_pb2.CONDITION_KIND_ATTRIBUTES, attributes=[YAW])
    return [
        ("trainer", "StartJob", trainer_pb2.StartJobRequest(boundary=trainer_pb2.BoundaryJobSpec(attribute=YAW, num_samples=10_000_000)), "job_samples"),
        ("trainer", "StartJob", trainer_pb2.StartJobRequest(mapping=trainer_pb2.MappingJobSpec(depth=32, **mapping)), "mapping_depth"),
        ("trainer", "StartJob", trainer_pb2.StartJobRequest(mapping=trainer_pb2.MappingJobSpec(hidden_dim=4096, **mapping)), "mapping_width"),
        ("trainer", "StartJob", trainer_pb2.StartJobRequest(mapping=trainer_pb2.MappingJobSpec(num_pairs=1_000_000, **mapping)), "mapping_pairs"),
        ("trainer", "StartJob", trainer_pb2.StartJobRequest(mapping=trainer_pb2.MappingJobSpec(
            options=trainer_pb2.TrainingOptions(steps=10_000_000), **mapping)), "training_steps"),
        ("trainer", "StartJob", trainer_pb2.StartJobRequest(directions=trainer_pb2.DirectionJobSpec(
            options=trainer_pb2.TrainingOptions(steps=10_000_000))), "training_steps"),
        ("trainer", "StartJob", trainer_pb2.StartJobRequest(pca=trainer_pb2.PCAJobSpec(layer="block4", num_samples=100_000)), "pca_feature_values"),
        ("trainer", "StartJob", trainer_pb2.StartJobRequest(pca=trainer_pb2.PCAJobSpec(num_samples=10_000, num_components=1000)), "directions"),
        ("trainer", "StartJob", trainer_pb2.StartJobRequest(boundary=trainer_pb2.BoundaryJobSpec(
            attribute=YAW, options=trainer_pb2.TrainingOptions(batch_size=100_000))), "job_batch"),
        ("trainer", "StartJob", trainer_pb2.StartJobRequest(correlation=trainer_pb2.CorrelationJobSpec(
            boundaries=[f"b{i}" for i in range(100)])), "list_items"),
        ("trainer", "StartJob", _custom_boundary(attribute_name="a" * 5000), "attribute_name"),
        ("trainer", "StartJob", trainer_pb2.StartJobRequest(display_name="d" * 5000, boundary=trainer_pb2.BoundaryJobSpec(attribute=YAW)),
         "display_name"),
        ("trainer", "StartJob", trainer_pb2.StartJobRequest(directions=trainer_pb2.DirectionJobSpec(max_stride=1e30)), "edit_distance"),
        ("trainer", "StartJob", trainer_pb2.StartJobRequest(directions=trainer_pb2.DirectionJobSpec(density_weight=1e30)), "weight_max"),
        ("trainer", "StartJob", trainer_pb2.StartJobRequest(boundary=trainer_pb2.BoundaryJobSpec(attribute=YAW, svm_c=1e30)), "weight_max"),
        ("editor", "Edit", editor_pb2.EditRequest(seed=seed, sgf=editor_pb2.SGFEdit(
            mapping="none", caption=editor_pb2.CaptionTarget(text="a face " * 1000))), "sgf.caption.text"),
        ("editor", "Edit", editor_pb2.EditRequest(seed=seed, interfacegan=editor_pb2.InterFaceGANEdit(
            boundary="cb-one", end_distance=1e9)), "edit_distance"),
        ("editor", "Edit", editor_pb2.EditRequest(seed=seed, dplase=editor_pb2.DPLaSEEdit(directions="none", start_stride=-1e9)),
         "edit_distance"),
        ("editor", "Edit", editor_pb2.EditRequest(seed=seed, interfacegan=editor_pb2.InterFaceGANEdit(
            boundary="cb-one", condition_boundaries=[f"c{i}" for i in range(100)])), "list_items"),
    ]


def test_requests_over_a_limit_are_refused_at_start_naming_the_limit(suite, boundaries):
    _, stubs = suite
    wrong = []
    for service, rpc, request, limit in _limit_cases():
        code, details = _status(getattr(stubs[service], rpc), request)
        if code != INVALID or limit not in details:
            wrong.append(f"{limit}: {code.name} {details[:200]!r}")
    assert not wrong, "\n".join(wrong)
    jobs = stubs["trainer"].ListJobs(trainer_pb2.ListJobsRequest(states=[trainer_pb2.JOB_STATE_QUEUED, trainer_pb2.JOB_STATE_RUNNING]),
                                     timeout=60)
    assert not jobs.jobs, "a job over a limit was queued"
    _serving(stubs)


def test_the_limits_table_documents_every_limit():
    from latentedit import limits

    rows = limits.describe()
    assert {name for name, _, _ in rows} >= {"job_samples", "mapping_depth", "mapping_width", "training_steps", "name_chars",
                                             "text_chars", "image_pixels"}
    assert all(doc for _, _, doc in rows), [name for name, _, doc in rows if not doc]


# ---- 5b. findings of the bad-input corpus that fall in the same classes ----------------------


def test_corpus_findings_answer_the_precise_code(suite, boundaries):
    _, stubs = suite
    trainer, editor = stubs["trainer"], stubs["editor"]
    seed = editor_pb2.SeedStart(count=1)
    # TrainingOptions fields a job kind does not use are still checked; negative generator versions.
    for options in (trainer_pb2.TrainingOptions(steps=-1), trainer_pb2.TrainingOptions(steps=2**31 - 1),
                    trainer_pb2.TrainingOptions(learning_rate=-0.5), trainer_pb2.TrainingOptions(learning_rate=2.0)):
        _expect(trainer.StartJob, trainer_pb2.StartJobRequest(boundary=trainer_pb2.BoundaryJobSpec(attribute=YAW, options=options)),
                INVALID, "options.")
    _expect(trainer.StartJob, trainer_pb2.StartJobRequest(boundary=trainer_pb2.BoundaryJobSpec(
        attribute=YAW, generator=types_pb2.ModelRef(version=-1))), INVALID, "generator.version -1")
    _expect(editor.Edit, editor_pb2.EditRequest(seed=seed, generator=types_pb2.ModelRef(version=-1),
                                                interfacegan=editor_pb2.InterFaceGANEdit(boundary="cb-one")), INVALID, "generator.version")
    # A label or index on a scalar output is an error, not ignored (boundary and mapping jobs).
    for field, ref, code in (("attribute.label", types_pb2.AttributeRef(head="pose", output="yaw", label="left"), grpc.StatusCode.NOT_FOUND),
                             ("attribute.index", types_pb2.AttributeRef(head="pose", output="yaw", index=2**31 - 1), INVALID),
                             ("attribute.index", types_pb2.AttributeRef(head="pose", output="yaw", index=-1), INVALID)):
        _expect(trainer.StartJob, trainer_pb2.StartJobRequest(boundary=trainer_pb2.BoundaryJobSpec(attribute=ref)), code, field)
        _expect(trainer.StartJob, trainer_pb2.StartJobRequest(boundary=trainer_pb2.BoundaryJobSpec(attribute=YAW, quality_attribute=ref)),
                code, "quality_" + field)
        _expect(trainer.StartJob, trainer_pb2.StartJobRequest(mapping=trainer_pb2.MappingJobSpec(
            condition=trainer_pb2.CONDITION_KIND_ATTRIBUTES, attributes=[ref])), code, field.replace("attribute", "attributes[0]"))
    # ListEdits checks the generator it filters by.
    _expect(editor.ListEdits, editor_pb2.ListEditsRequest(generator=types_pb2.ModelRef(name="no-such-generator")),
            grpc.StatusCode.NOT_FOUND, "no-such-generator")
    _expect(editor.ListEdits, editor_pb2.ListEditsRequest(generator=types_pb2.ModelRef(name="x" * MiB)), INVALID, "not valid")
    _expect(editor.ListEdits, editor_pb2.ListEditsRequest(generator=types_pb2.ModelRef(name="dcgan-faces", version=-1)),
            INVALID, "negative")
    _expect(editor.ListEdits, editor_pb2.ListEditsRequest(generator=types_pb2.ModelRef(name="dcgan-faces", version=2**62)),
            grpc.StatusCode.NOT_FOUND, "no version")
    listed = editor.ListEdits(editor_pb2.ListEditsRequest(generator=types_pb2.ModelRef(name="dcgan-faces")), timeout=60)
    assert "cb-one" in {e.artifact.ref.name for e in listed.edits}
    # SGF: a negative Neumann order or attribute index is not silently the default.
    _expect(editor.Edit, editor_pb2.EditRequest(seed=seed, sgf=editor_pb2.SGFEdit(
        mapping="none", neumann_order=-1, caption=editor_pb2.CaptionTarget(text="a face"))), INVALID, "sgf.neumann_order")
    target = editor_pb2.AttributeTarget(values=[editor_pb2.AttributeValue(attribute=types_pb2.AttributeRef(
        head="pose", output="yaw", index=-1), value=10.0)])
    _expect(editor.Edit, editor_pb2.EditRequest(seed=seed, sgf=editor_pb2.SGFEdit(mapping="none", attributes=target)),
            INVALID, "attribute.index -1")
    # Too many start latents is over a limit, like too many seeds.
    _expect(editor.Edit, editor_pb2.EditRequest(latents=_latents(np.zeros((257, 100), np.float32)),
                                                interfacegan=editor_pb2.InterFaceGANEdit(boundary="cb-one")),
            grpc.StatusCode.RESOURCE_EXHAUSTED, "257 latents")
    # A PNG header beyond PIL's own guard is RESOURCE_EXHAUSTED like any other oversized image.
    import struct
    import zlib

    def png_header(width, height):
        """A valid 1x1 PNG whose IHDR (CRC fixed) declares width x height."""
        data = bytearray(_png(1, 1))
        data[16:24] = struct.pack(">II", width, height)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
        return bytes(data)

    for width, height in ((100_000, 100_000), (2**31 - 1, 1)):
        bomb = types_pb2.ImageBatch(encoding=types_pb2.IMAGE_ENCODING_PNG, png=[png_header(width, height)])
        _expect(stubs["scorer"].Score, scorer_pb2.ScoreRequest(images=bomb), grpc.StatusCode.RESOURCE_EXHAUSTED, "limit")
        _expect(editor.Invert, editor_pb2.InvertRequest(images=bomb, steps=1), grpc.StatusCode.RESOURCE_EXHAUSTED, "limit")
    _serving(stubs)


def test_sgf_attribute_targets_match_scalar_attributes_only_at_index_0():
    from latentedit.attributes import Attribute
    from latentedit.conditions import ConditionSpec
    from latentedit.errors import InvalidArgument, NotFound
    from latentedit.methods.sgf import SGF, AttributeGoal

    condition = ConditionSpec("attributes", [Attribute("pose", "yaw", None)])
    current = np.zeros((2, 1), np.float32)
    target, mask = SGF.target((AttributeGoal("pose", "yaw", "", 0, 20.0),), condition, current, None)
    assert target[:, 0].tolist() == [20.0, 20.0] and mask.tolist() == [1.0]
    with pytest.raises(InvalidArgument, match="pose.yaw is a scalar"):
        SGF.target((AttributeGoal("pose", "yaw", "", 2**31 - 1, 20.0),), condition, current, None)
    with pytest.raises(NotFound, match="pose.pitch"):
        SGF.target((AttributeGoal("pose", "pitch", "", 0, 20.0),), condition, current, None)


# ---- 6. already fixed before this work: they hold --------------------------------------------


def _png(width, height):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def test_png_decompression_bombs_are_resource_exhausted_through_the_services(suite):
    _, stubs = suite
    bomb = types_pb2.ImageBatch(encoding=types_pb2.IMAGE_ENCODING_PNG, png=[_png(8192, 8192)])
    _expect(stubs["scorer"].Score, scorer_pb2.ScoreRequest(images=bomb), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than the limit")
    _expect(stubs["editor"].Invert, editor_pb2.InvertRequest(images=bomb, steps=1), grpc.StatusCode.RESOURCE_EXHAUSTED,
            "larger than the limit")
    _serving(stubs)


def _wait_until(condition, what, timeout_s=30.0):
    """Poll `condition` until it holds (bounded), failing with `what`."""
    pause = threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return
        pause.wait(0.05)
    assert condition(), what


def test_cancelled_synthesize_streams_leave_no_reader_thread(suite):
    _, stubs = suite

    def readers():
        return {t for t in threading.enumerate() if t.name == "synth-stream-reader"}

    before = readers()

    def requests():
        # More than the server's read-ahead window: a reader not stopped would wait for room forever.
        for i in range(1000):
            yield generator_pb2.SynthesizeRequest(request_id=f"r{i}", latents=_latents(np.zeros((1, 100), np.float32)))

    streams = [stubs["generator"].SynthesizeStream(requests(), timeout=60) for _ in range(4)]
    for stream in streams:
        next(stream)
        stream.cancel()
    _wait_until(lambda: not (readers() - before), "reader threads outlived their cancelled streams")
    _serving(stubs)


def test_no_file_left_in_the_repository_by_refused_requests(suite, boundaries):
    """Refused requests wrote nothing: no staging folders and no folder under a name outside the
    pattern (before the fix, 'dcgan-faces\\n' passed the write check: `$` matches before a newline)."""
    import re

    repo, _ = suite
    leftovers = [p.name for p in repo.root.iterdir() if p.name.startswith(".tmp")]
    odd = [p.name for p in repo.root.iterdir() if not p.name.startswith(".") and not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", p.name)]
    assert not leftovers and not odd, (leftovers, odd)
    assert os.path.isdir(repo.root / "dcgan-faces") and Path(repo.root / "cb-one").is_dir()
    assert not (repo.root.parent / "outside" / "new").exists()

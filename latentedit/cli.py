"""The `latentedit` command line: serve, models install/list, generate, wait."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from latentedit.config import SERVICE_NAMES, load_config
from latentedit.errors import LatentEditError
from latentedit.limits import LIMITS


class UsageError(Exception):
    """A command line argparse refuses: one line, exit code 1 like every other error."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see: {self.prog} --help)")


def _number(kind: type, low: float | None = None, high: float | None = None, *, above: bool = False,
            zero: str = "") -> Callable[[str], float]:
    """An argparse type: `kind` (int or float), finite, >= low (> low with `above`), <= high;
    0 also allowed when `zero` says what it means (e.g. "the service's default")."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if zero and value == 0:
            return value
        too_low = low is not None and (value <= low if above else value < low)
        if too_low or (high is not None and value > high):
            if high is None:
                bounds = f"{'above' if above else 'at least'} {low:g}"
            elif low is None:
                bounds = f"at most {high:g}"
            else:
                bounds = f"in ({low:g}, {high:g}]" if above else f"in {low:g}..{high:g}"
            raise argparse.ArgumentTypeError(f"{value:g} must be {bounds}" + (f" (or 0: {zero})" if zero else ""))
        return value
    parse.__name__ = kind.__name__
    return parse


COUNT = _number(int, 1)  # how many of something: at least one
SEED = _number(int, 0, 2**63 - 1)
SECONDS = _number(float, 0, above=True)


def _config(args: argparse.Namespace):
    return load_config(args.config)


def _start_hint(args: argparse.Namespace, name: str = "", targeted: bool = False) -> str:
    """How to start service `name` (every service when empty), in the command's own words."""
    if targeted:
        return "is --target right, and is the service running there?"
    le = f"latentedit --config {args.config}" if args.config else "latentedit"
    every = f"{le} serve, then {le} wait"
    return f"start it: {le} serve {name} (or all four: {every})" if name else f"start the services: {every}"


def _service(args: argparse.Namespace, name: str, address: str = "") -> grpc.Channel:
    """A channel to service `name` (at `address`, else --target, else the config's) once it is
    SERVING. Nothing listening there fails within seconds, naming the address and how to start
    it; a service still starting (models loading) is waited for up to --wait seconds, saying so."""
    from latentedit.rpc.client import await_serving

    targeted = not address and bool(getattr(args, "target", ""))
    address = address or getattr(args, "target", "") or _config(args).address(name)
    channel = _connect(args, address)
    await_serving(channel, address, f"the {name} service", timeout_s=getattr(args, "wait", 180.0),
                  hint=_start_hint(args, name, targeted), on_wait=lambda line: print(line, file=sys.stderr, flush=True))
    return channel


def _add_service_args(parser: argparse.ArgumentParser, name: str, wait_s: float = 180.0) -> None:
    parser.add_argument("--target", default="", help=f"{name} address (default: from the config)")
    parser.add_argument("--wait", type=SECONDS, default=wait_s,
                        help=f"seconds to wait while the {name} is starting up (not SERVING yet); "
                             "nothing listening there fails within seconds")


def _add_job_args(parser: argparse.ArgumentParser) -> None:
    """Arguments every training job takes (the trainer's address among them)."""
    parser.add_argument("--name", default="", help="artifact name (default: derived)")
    parser.add_argument("--model", default="", help="generator name (default: the trainer's default)")
    parser.add_argument("--seed", type=SEED, default=0)
    parser.add_argument("--key", default="", help="idempotency key: retrying with it returns the same job")
    _add_service_args(parser, "trainer")


def _connect(args: argparse.Namespace, address: str):
    """A channel with the caller's credentials: --token / --token-file / LATENTEDIT_TOKEN, and
    --ca, --client-cert, --client-key (or LATENTEDIT_CA, _CERT, _KEY, then the config's ca_file and
    client_cert_file / client_key_file). TLS unless the config is insecure and no CA is given."""
    import os

    from latentedit.rpc import security as sec
    from latentedit.rpc.client import connect

    config = _config(args).security
    secure = not sec.is_insecure(config)
    token = args.token
    if token is None and args.token_file:
        token = Path(args.token_file).read_text().strip()
    ca = args.ca or os.environ.get(sec.CA_ENV) or (config.ca_file if secure else "")
    cert = args.client_cert or os.environ.get(sec.CERT_ENV) or (config.client_cert_file if secure else "")
    key = args.client_key or os.environ.get(sec.KEY_ENV) or (config.client_key_file if secure else "")
    return connect(address, token, ca, cert_file=cert, key_file=key, tls=secure or bool(ca or cert), service="cli")


def cmd_certs_make(args: argparse.Namespace) -> int:
    from latentedit.rpc.security import DEFAULT_HOSTS, make_certs

    paths = make_certs(args.directory, hosts=args.host or DEFAULT_HOSTS, days=args.days)
    for name, path in paths.items():
        print(f"{name:14s} {path}")
    print(f"server certificate for {', '.join(args.host or DEFAULT_HOSTS)}, valid {args.days} days. "
          "config/secure-local.yaml reads out/certs/; callers: export LATENTEDIT_TOKEN=$(cat "
          f"{paths['admin.token']})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from latentedit.rpc.launch import ALL_NAMES, serve_all, serve_one

    names = args.services or list(SERVICE_NAMES)  # serve_all adds the web gateway to the four
    unknown = [n for n in names if n not in ALL_NAMES]
    if unknown:
        raise SystemExit(f"error: unknown service(s) {unknown}; known: {', '.join(ALL_NAMES)}")
    config = _config(args)
    # Settings that cannot work stop here in one line, before any service starts.
    from latentedit.rpc.security import ClientSecurity, resolve

    resolve(config.security)
    for name in {"editor", "trainer"} & set(names):
        ClientSecurity.for_service(config.security, name)
    if len(names) == 1:
        serve_one(names[0], config)
        return 0
    print(f"starting {', '.join(names)} (one process each); repository {config.repository}", flush=True)
    return serve_all(args.config, names)


def cmd_models_install(args: argparse.Namespace) -> int:
    from latentedit.install import install_defaults
    from latentedit.repository import ModelRepository

    install_defaults(ModelRepository(_config(args).repository))
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from latentedit.repository import ModelRepository

    repo = ModelRepository(_config(args).repository)
    entries = repo.entries()
    if not entries:
        print(f"no models in {repo.root}; run: latentedit models install")
    for entry in entries:
        print(f"{entry.name:24s} {entry.kind:12s} v{entry.version}  versions {repo.versions(entry.name)}")
    return 0


def cmd_models_import(args: argparse.Namespace) -> int:
    from latentedit.models.checkpoints import CheckpointError, import_checkpoint
    from latentedit.repository import ModelRepository

    if not args.path.is_file():
        raise SystemExit(f"error: {args.path}: no such file (give a rosinality .pt or an NVIDIA .pkl StyleGAN2 checkpoint)")
    try:
        entry = import_checkpoint(ModelRepository(_config(args).repository), args.path, args.name, log=print)
    except CheckpointError as exc:
        raise SystemExit(f"error: {args.path}: {exc.message}") from None
    print(f"imported {entry.name} v{entry.version}; use it as --model {entry.name} (ModelRef name {entry.name!r})")
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    from latentedit.rpc.client import wait_serving

    config = _config(args)
    for name in args.services or SERVICE_NAMES:
        address = config.address(name)
        print(f"waiting for {name} at {address} ...", flush=True)
        wait_serving(_connect(args, address), timeout_s=args.timeout, what=f"{name} service at {address}")
    print("all SERVING")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from latentedit import wire

    if args.in_process:
        from latentedit.repository import ModelRepository
        from latentedit.world import LocalWorld

        config = _config(args)
        world = LocalWorld(ModelRepository(config.repository), config.generator.default_model)
        generator = world.generator(args.model)
        images = world.synthesize(generator, world.sample(generator, args.count, args.seed))
        where = "in-process (torch)"
    else:
        from latentedit.rpc.client import GeneratorClient

        address = args.target or _config(args).address("generator")
        client = GeneratorClient(_service(args, "generator"), args.model)
        latents = client.sample(args.count, args.seed)
        images = client.synthesize(latents)
        where = f"generator service at {address}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = args.columns or int(np.ceil(np.sqrt(args.count)))
    grid = Image.fromarray(wire.image_grid(images, columns))
    if args.scale > 1:  # 64 px faces are tiny on screen; nearest keeps the real pixels
        grid = grid.resize((grid.width * args.scale, grid.height * args.scale), Image.Resampling.NEAREST)
    grid.save(out)
    print(f"wrote {out} ({args.count} faces, seed {args.seed}, {where})")
    return 0


def _attribute_ref(text: str):
    """'pose.yaw' or 'expression.probabilities.happy' -> AttributeRef."""
    from latentedit.api.v1 import types_pb2

    parts = text.split(".")
    if len(parts) not in (2, 3) or not all(parts):
        raise SystemExit(f"error: attribute {text!r} must look like head.output or head.output.label (e.g. pose.yaw)")
    return types_pb2.AttributeRef(head=parts[0], output=parts[1], label=parts[2] if len(parts) == 3 else "")


def _field_names(descriptor, prefix: str = "") -> list[str]:
    """Dotted names of every settable field of a message (nested messages expanded), for --help."""
    from google.protobuf.descriptor import FieldDescriptor

    names: list[str] = []
    for field in descriptor.fields:
        name = prefix + field.name
        if field.type == FieldDescriptor.TYPE_MESSAGE and not field.message_type.GetOptions().map_entry \
                and field.message_type.full_name.startswith("latentedit.") and not field.is_repeated:
            names += _field_names(field.message_type, name + ".")
        else:
            names.append(name)
    return names


def _params_epilog(descriptor, handled: tuple[str, ...] = ()) -> str:
    names = [n for n in _field_names(descriptor) if n not in handled]
    return f"--param fields of {descriptor.name}: " + ", ".join(names)


def _walk_end(value: float | None, which: str) -> float:
    from latentedit.methods.interfacegan import InterFaceGANOptions

    if value is not None:
        return value
    return InterFaceGANOptions.start_distance if which == "start" else InterFaceGANOptions.end_distance


def _walk_range(args: argparse.Namespace, message) -> None:
    """--start / --end fill a method's start_* / end_* distance or stride fields (W*, GANSpace,
    DP-LaSE, ...) unless --param set them; given to a method without such fields, they are refused
    (not silently ignored)."""
    given = {item.partition("=")[0] for item in args.param}
    for which, value in (("start", args.start), ("end", args.end)):
        fields = [f.name for f in message.DESCRIPTOR.fields
                  if f.name.startswith(which + "_") and f.name.endswith(("_distance", "_stride"))]
        if not fields and value is not None:
            raise SystemExit(f"error: --{which} does not apply to --method {args.method} (it has no {which} distance or stride)")
        for name in fields:
            if name not in given:
                setattr(message, name, _walk_end(value, which))


def _params(items: list[str], message) -> None:
    """--param key=value (dotted keys for nested fields, e.g. rows.start=2) -> fields of `message`."""
    import json

    from google.protobuf import json_format

    tree: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --param {item!r} must look like name=value")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value  # a plain string
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parsed
    try:
        json_format.ParseDict(tree, message)
    except json_format.ParseError as exc:
        fields = ", ".join(f.name for f in message.DESCRIPTOR.fields)
        raise SystemExit(f"error: --param: {str(exc).splitlines()[0]}; fields of {message.DESCRIPTOR.name}: {fields}") from None


def cmd_methods(args: argparse.Namespace) -> int:
    from latentedit.methods.registry import METHODS, PLANNED

    # Columns sized to the longest entry, so a long title never runs into the next column.
    name_width = max(len(m.name) for m in METHODS.values()) + 2
    title_width = max(len(m.title) for m in METHODS.values()) + 2
    kind_width = max(len(m.artifact_kind) for m in METHODS.values()) + 2
    for method in METHODS.values():
        jobs = ", ".join(method.jobs) or "none"
        print(f"{method.name:{name_width}s}{method.title:{title_width}s}edits with: {method.artifact_kind:{kind_width}s}"
              f"trained by jobs: {jobs}")
    for name, what in PLANNED.items():
        print(f"{name:{name_width}s}{what} (not available yet)")
    return 0


def cmd_train_generic(args: argparse.Namespace) -> int:
    """Any job kind of the registry: its spec message filled from --param."""
    from latentedit.api.v1 import trainer_pb2, types_pb2

    request = trainer_pb2.StartJobRequest(idempotency_key=args.key, display_name=f"{args.kind} {args.name}")
    spec = getattr(request, args.kind)
    _params(args.param, spec)
    spec.generator.CopyFrom(types_pb2.ModelRef(name=args.model))
    spec.options.seed, spec.options.artifact_name = args.seed, args.name
    return _run_job(args, request, f"training {args.kind} {args.name or '(auto name)'}")


def _run_job(args: argparse.Namespace, request, what: str, preface: str = "") -> int:
    """Start a job on the trainer (`preface` printed once the trainer is known to be up) and follow it to the end."""
    from latentedit.api.v1 import trainer_pb2_grpc

    stub = trainer_pb2_grpc.TrainerServiceStub(_service(args, "trainer"))
    if preface:
        print(preface, flush=True)
    return _watch(stub, stub.StartJob(request, timeout=120), what)


def _watch(stub, job, what: str) -> int:
    """Follow a job: a progress line (bar, phase, what the job says, elapsed, the trainer's ETA),
    redrawn in place on a terminal; elsewhere (a log) one line per phase and every 10%."""
    from latentedit.api.v1 import trainer_pb2

    print(f"job {job.id}: {what}", flush=True)
    tty = sys.stdout.isatty()
    started, phase, shown, drawn = time.monotonic(), None, -1.0, False
    for event in stub.WatchJob(trainer_pb2.WatchJobRequest(id=job.id)):
        job = event.job
        line = progress_line(job, event.message, time.monotonic() - started)
        if tty:
            if job.phase != phase and drawn:
                print(flush=True)  # keep the finished phase's last line
            print("\r" + line + "\033[K", end="", flush=True)
            drawn = True
        elif job.phase != phase or job.progress - shown >= 0.1 or job.state != trainer_pb2.JOB_STATE_RUNNING:
            print(line, flush=True)
            shown = job.progress
        phase = job.phase
    if tty and drawn:
        print()
    if job.state != trainer_pb2.JOB_STATE_SUCCEEDED:
        print(f"error: job {job.id} {trainer_pb2.JobState.Name(job.state)}: {job.error}", file=sys.stderr)
        return 1
    for key in sorted(job.metrics):
        print(f"  {key:24s} {job.metrics[key]:.4f}")
    print(f"{trainer_pb2.ArtifactKind.Name(job.artifact.kind).removeprefix('ARTIFACT_KIND_').lower()} "
          f"{job.artifact.ref.name} v{job.artifact.ref.version} written")
    return 0


def cmd_train_mapping(args: argparse.Namespace) -> int:
    from latentedit.api.v1 import trainer_pb2, types_pb2

    kinds = {"attributes": trainer_pb2.CONDITION_KIND_ATTRIBUTES, "keypoints": trainer_pb2.CONDITION_KIND_KEYPOINTS,
             "caption": trainer_pb2.CONDITION_KIND_CAPTION}
    spec = trainer_pb2.MappingJobSpec(
        generator=types_pb2.ModelRef(name=args.model), condition=kinds[args.condition],
        attributes=[_attribute_ref(a) for a in args.attribute], keypoints_head=args.keypoints_head,
        num_pairs=args.pairs, depth=args.depth, hidden_dim=args.hidden, space=_space_code(args.space),
        options=trainer_pb2.TrainingOptions(seed=args.seed, steps=args.steps, artifact_name=args.name))
    return _run_job(args, trainer_pb2.StartJobRequest(idempotency_key=args.key, mapping=spec),
                    f"training SGF mapping {args.name or '(auto name)'} on {args.condition}",
                    preface=mapping_estimate_line(args.condition, args.pairs, args.steps, args.hidden, args.depth))


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(job, message: str = "", elapsed_s: float = 0.0) -> str:
    """[#####.....]  42.0% running: building (z, c) pairs, 840/2000 pairs; 1m05s elapsed, ETA ~1m30s"""
    from latentedit.api.v1 import trainer_pb2

    width = 30
    filled = int(job.progress * width)
    state = trainer_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
    said = f", {message}" if message and message != job.phase else ""
    loss = f", loss {job.metrics['train_loss']:.3g}" if "train_loss" in job.metrics else ""
    eta = f", ETA ~{_duration(job.eta_seconds)}" if job.eta_seconds > 0 and job.state == trainer_pb2.JOB_STATE_RUNNING else ""
    return (f"[{'#' * filled}{'.' * (width - filled)}] {job.progress * 100:5.1f}% {state}: {job.phase}{said}{loss}; "
            f"{_duration(elapsed_s)} elapsed{eta}")


# What a mapping job costs on 2 CPU cores that nothing else uses, for the estimate `train mapping`
# prints before it starts: pairs x PAIR_SECONDS[condition] (sample, synthesize and score the heads
# the condition needs; MTCNN makes keypoints the slow one) + steps x the cost of one Adam step of
# F on a batch of 128, scaled by depth x hidden^2 from 6 x 256. Measured here in-process on
# 2026-11-29 (LocalWorld, 128 pairs per condition; 60 steps of the a z + R(z, c) F with 1 torch
# thread): attributes 0.018 s, keypoints 0.21 s, caption 0.059 s per pair, 0.15 s per step.
# Shared cores are far slower for the trainer's multi-threaded torch (the same day, load 14-16:
# 2.5 s per step in-process with 2 threads; a 300-pair, 100-step caption job estimated at 33 s took
# 9m51s), so the line says the estimate assumes free cores, and the progress line's ETA follows
# the real rate.
PAIR_SECONDS = {"attributes": 0.02, "keypoints": 0.2, "caption": 0.06}
STEP_SECONDS_AT_256x6 = 0.15


def estimate_mapping_seconds(condition: str, pairs: int, steps: int, hidden: int, depth: int,
                             batch: int = 128) -> tuple[float, float]:
    """(seconds building pairs, seconds training F) of a mapping job; 0 arguments: the defaults."""
    pairs, steps, hidden, depth = _mapping_settings(pairs, steps, hidden, depth)
    per_step = STEP_SECONDS_AT_256x6 * (hidden * hidden * depth) / (256 * 256 * 6) * batch / 128
    return pairs * PAIR_SECONDS[condition], steps * per_step


def _mapping_settings(pairs: int, steps: int, hidden: int, depth: int) -> tuple[int, int, int, int]:
    """The job's settings with 0 (unset) replaced by MappingSpec's defaults, as the trainer does."""
    from latentedit.methods.sgf import MappingSpec

    defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(MappingSpec)}
    return (pairs or defaults["num_pairs"], steps or defaults["steps"], hidden or defaults["hidden"],
            depth or defaults["depth"])


def mapping_estimate_line(condition: str, pairs: int, steps: int, hidden: int, depth: int) -> str:
    pairs_s, steps_s = estimate_mapping_seconds(condition, pairs, steps, hidden, depth)
    pairs, steps, hidden, depth = _mapping_settings(pairs, steps, hidden, depth)
    return (f"expected time: ~{_duration(pairs_s + steps_s)} on 2 free CPU cores ({pairs} pairs ~{_duration(pairs_s)}, "
            f"{steps} steps of a {depth}x{hidden} F ~{_duration(steps_s)}); cores other work uses can make it many "
            "times longer (the ETA below follows the real rate); fewer --pairs / --steps or a smaller --hidden train faster")


def cmd_train_boundary(args: argparse.Namespace) -> int:
    from latentedit.api.v1 import trainer_pb2, types_pb2

    spec = trainer_pb2.BoundaryJobSpec(
        generator=types_pb2.ModelRef(name=args.model),
        attribute=types_pb2.AttributeRef(head=args.head, output=args.output, label=args.label, index=args.index),
        num_samples=args.samples,
        keep_fraction=args.keep,
        space=_space_code(args.space),
        options=trainer_pb2.TrainingOptions(seed=args.seed, artifact_name=args.name),
    )
    if args.quality_min > 0:
        spec.quality_attribute.CopyFrom(types_pb2.AttributeRef(head="quality", output="face_probability"))
        spec.quality_min = args.quality_min
    request = trainer_pb2.StartJobRequest(idempotency_key=args.key, display_name=f"boundary {args.name}", boundary=spec)
    label = f"{args.head}.{args.output}{'.' + args.label if args.label else ''}"
    return _run_job(args, request, f"training boundary {args.name or '(auto name)'} on {label}")


def _space_code(space: str):
    """'' (the generator's first space) or z / w / w+ -> the wire enum."""
    from latentedit import wire
    from latentedit.api.v1 import types_pb2

    return wire.SPACE_CODES[space] if space else types_pb2.LATENT_SPACE_UNSPECIFIED


def _row_range(text: str):
    """'START:END' (W+ rows START <= row < END) -> (start, end), checked before any call."""
    start, sep, end = text.partition(":")
    if not sep or not start.strip().isdigit() or not end.strip().isdigit() or int(start) >= int(end):
        raise argparse.ArgumentTypeError(f"{text!r} is not START:END with 0 <= START < END (W+ rows, e.g. 0:4)")
    return int(start), int(end)


def cmd_edit(args: argparse.Namespace) -> int:
    from latentedit import wire
    from latentedit.api.v1 import editor_pb2, editor_pb2_grpc, types_pb2
    from latentedit.render import frame_lines, sample_lines, write_edit
    from latentedit.rpc.client import NotListening

    config = _config(args)
    # The request is built (and every argument checked) before any service is called.
    request = editor_pb2.EditRequest(
        generator=types_pb2.ModelRef(name=args.model),
        seed=editor_pb2.SeedStart(seed=args.seed, count=args.count),
        num_frames=args.frames,
        score_heads=args.score,
    )
    if args.method == "interfacegan" and not args.param:
        if not args.boundary:
            raise SystemExit("error: --boundary is required with --method interfacegan")
        request.interfacegan.CopyFrom(editor_pb2.InterFaceGANEdit(
            boundary=args.boundary, condition_boundaries=args.condition, start_distance=_walk_end(args.start, "start"),
            end_distance=_walk_end(args.end, "end")))
        if args.rows is not None:
            request.interfacegan.rows.CopyFrom(types_pb2.RowRange(start=args.rows[0], end=args.rows[1]))
    elif args.rows is not None:
        raise SystemExit("error: --rows works with --method interfacegan --boundary; other methods take "
                         "--param rows.start=S --param rows.end=E where they have rows")
    elif args.method == "sgf" and not args.param:
        request.sgf.CopyFrom(_sgf_request(args))
        _walk_range(args, request.sgf)  # refuses --start / --end: SGF walks to a target
    else:
        # Any method: its EditRequest message filled from --param name=value, and --start / --end.
        _params(args.param, getattr(request, args.method))
        _walk_range(args, getattr(request, args.method))
    channel = _service(args, "editor")
    if args.method == "sgf" and args.keypoints_from_seed is not None:
        request.sgf.keypoints.points.CopyFrom(wire.to_tensor(_keypoints_of_seed(args, config)))
    try:
        labels, target = _score_context(args, config)
    except NotListening as exc:  # the editor reaches its scorer; this machine need not
        print(f"note: scores shown without class labels or caption cosine: {exc.message}", file=sys.stderr)
        labels, target = {}, None
    frames, tiles = [], []
    for frame in editor_pb2_grpc.EditorServiceStub(channel).Edit(request, timeout=600):
        images = wire.decode_images(frame.images)
        scores = wire.scores_from_proto(frame.scores)
        common = frame_lines(frame.metrics) or [f"step {frame.index}"]
        per_sample = [sample_lines(scores, n, labels, target) for n in range(len(images))]
        frames.append(images)
        tiles.append([common + lines for lines in per_sample])
        stop = f"  [{editor_pb2.StopReason.Name(frame.stop_reason).removeprefix('STOP_REASON_').lower()}]" if frame.stop_reason else ""
        print(f"frame {frame.index:3d}  " + "  ".join(common) + stop, flush=True)
        for n, lines in enumerate(per_sample):
            if lines:
                print(f"    #{n}  " + " | ".join(lines), flush=True)
    if not frames:
        raise SystemExit("error: the editor sent no frames")
    png, gif = write_edit(frames, tiles, Path(args.out))
    print(f"wrote {png} and {gif}")
    return 0


def _score_context(args: argparse.Namespace, config) -> tuple[dict[str, list[str]], Any]:
    """What the score lines need from the scorer: the labels of vector outputs (expression
    classes), and the embedding of the SGF caption target (each frame's caption is compared with it)."""
    from latentedit.rpc.client import ScorerClient

    if not args.score and not args.caption:
        return {}, None
    scorer = ScorerClient(_service(args, "scorer", config.address("scorer")))
    labels = {f"{h.name}.{o.name}": list(o.labels) for h in scorer.list_heads() for o in h.outputs if o.labels}
    target = scorer.embed_text([args.caption])[0] if args.method == "sgf" and args.caption else None
    return labels, target


def _keypoints_of_seed(args: argparse.Namespace, config):
    """SGF keypoint target: those of another sample, measured through the generator and scorer."""
    import numpy as np

    from latentedit.rpc.client import GeneratorClient, ScorerClient

    generator = GeneratorClient(_service(args, "generator", config.address("generator")), args.model)
    images = generator.synthesize(generator.sample(1, args.keypoints_from_seed))
    scorer = ScorerClient(_service(args, "scorer", config.address("scorer")))
    return scorer.score(images, [args.keypoints_head])[args.keypoints_head]["points"][0].astype(np.float32)


def cmd_eval_mds(args: argparse.Namespace) -> int:
    from latentedit.evaluation import DEFAULT_ATTRIBUTES, check_mds_settings, plot_curves, run_mds
    from latentedit.repository import ModelRepository
    from latentedit.world import LocalWorld

    check_mds_settings(DEFAULT_ATTRIBUTES, args.attributes, args.train, args.samples, args.sgf_steps)  # before any model
    config = _config(args)
    print("loading the generator and scorer heads in this process ...", flush=True)
    world = LocalWorld(ModelRepository(config.repository), config.generator.default_model)
    results, thresholds = run_mds(world, world.generator(args.model), DEFAULT_ATTRIBUTES, args.attributes, num_train=args.train,
                                  num_test=args.samples, sgf_steps=args.sgf_steps, log=lambda m: print(m, flush=True))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(results, out.with_suffix(".png"))
    methods = list(dict.fromkeys(r.method for r in results))
    lines = ["| method | " + " | ".join(args.attributes) + " | overall |", "|---|" + "---|" * (len(args.attributes) + 1)]
    for method in methods:
        scores = [next(r.mds for r in results if r.method == method and r.attribute == a) for a in args.attributes]
        lines.append(f"| {method} | " + " | ".join(f"{v:.3f}" for v in scores) + f" | {sum(scores) / len(scores):.3f} |")
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(table + "\n\nChange thresholds: " + ", ".join(f"{k} {v:.3g}" for k, v in thresholds.items()) + "\n")
    print(table)
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.md')}")
    return 0


def dplase_settings(args: argparse.Namespace):
    from latentedit.evaluation import DPLaSEEvalSettings

    return DPLaSEEvalSettings(samples=args.samples, quality_samples=args.quality_samples, strides=tuple(args.strides),
                              num_directions=args.directions, steps=args.steps, batch_size=args.batch_size,
                              layer=args.layer, features=args.features, curve_samples=args.curve_samples,
                              pca_samples=args.pca_samples, naming_samples=args.naming_samples, seed=args.seed)


def cmd_eval_dplase(args: argparse.Namespace) -> int:
    from latentedit.evaluation import check_dplase_settings, dplase_markdown, run_dplase_table
    from latentedit.repository import ModelRepository
    from latentedit.world import LocalWorld

    config = _config(args)
    settings = dplase_settings(args)
    world = LocalWorld(ModelRepository(config.repository), config.generator.default_model)
    generator = world.generator(args.model)
    check_dplase_settings(world, generator, settings)  # before the output folder or any model work
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = run_dplase_table(world, generator, settings, log=lambda m: print(m, flush=True))
    text = dplase_markdown(table)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(dataclasses.asdict(table), indent=1))
    print(text)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


def cmd_eval_wstar(args: argparse.Namespace) -> int:
    from latentedit.methods.wstar import load_flow
    from latentedit.models.face_descriptor import load_face_descriptor
    from latentedit.perceptual import PerceptualDistance
    from latentedit.repository import ModelRepository
    from latentedit.world import LocalWorld
    from latentedit.wstar_eval import scatter_png, table1, table1_markdown

    config = _config(args)
    repo = ModelRepository(config.repository)
    world = LocalWorld(repo, config.generator.default_model)
    generator = world.generator(args.model)
    artifact = load_flow(repo, args.flow, generator)  # NOT_FOUND / FAILED_PRECONDITION before any sampling
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    descriptor = load_face_descriptor(repo) if args.identity_seeds else None
    table = table1(world, generator, artifact, PerceptualDistance.from_repository(repo), descriptor, args.samples,
                   identity_seeds=args.identity_seeds, log=lambda m: print(m, flush=True))
    text = table1_markdown(table, args.flow)
    out.with_suffix(".md").write_text(text)
    scatter_png(out.with_suffix(".png"), table.scatter)
    print(text)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')} (latent vs perceptual distance, Fig. 5)")
    return 0


def _sgf_request(args: argparse.Namespace):
    """SGF target from the command line: --set head.output=value, --keypoints-from-seed (its points
    are measured once the services are known to be up), or --caption."""
    from latentedit.api.v1 import editor_pb2

    if not args.mapping:
        raise SystemExit("error: --mapping is required with --method sgf")
    request = editor_pb2.SGFEdit(mapping=args.mapping, max_steps=args.steps, tolerance=args.tolerance, step_size=args.step_size)
    chosen = [bool(args.target_value), args.keypoints_from_seed is not None, bool(args.caption)]
    if sum(chosen) != 1:
        raise SystemExit("error: give exactly one SGF target: --set head.output=value (repeatable), --keypoints-from-seed N or --caption TEXT")
    if args.target_value:
        for item in args.target_value:
            name, _, value = item.partition("=")
            try:
                number = float(value)
            except ValueError:
                raise SystemExit(f"error: --set {item!r} must look like pose.yaw=25") from None
            if not math.isfinite(number):
                raise SystemExit(f"error: --set {item!r}: the value must be a finite number")
            request.attributes.values.append(editor_pb2.AttributeValue(attribute=_attribute_ref(name), value=number))
    elif args.caption:
        request.caption.text = args.caption
    return request


def _add_serve(sub) -> None:
    """latentedit serve [SERVICE ...]"""
    serve = sub.add_parser("serve", help="serve one service in this process, or several as child processes")
    from latentedit.rpc.launch import ALL_NAMES

    serve.add_argument("services", nargs="*", help=f"any of {', '.join(ALL_NAMES)} (default: all, with the web gateway)")
    serve.set_defaults(func=cmd_serve)


def _add_models(sub) -> None:
    """latentedit models install | list | import PATH --name NAME"""
    models = sub.add_parser("models", help="manage the model repository")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("install", help="install the embedded default models").set_defaults(func=cmd_models_install)
    models_sub.add_parser("list", help="list the repository").set_defaults(func=cmd_models_list)
    imported = models_sub.add_parser("import", help="convert a StyleGAN2 checkpoint (rosinality .pt or NVIDIA .pkl) "
                                     "into a generator in the repository (safetensors; no pickled code is run)")
    imported.add_argument("path", type=Path, help="the checkpoint file")
    imported.add_argument("--name", required=True, help="the generator's name in the repository")
    imported.set_defaults(func=cmd_models_import)


def _add_certs(sub) -> None:
    """latentedit certs make DIRECTORY"""
    certs = sub.add_parser("certs", help="certificates for a secure local set-up")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    make = certs_sub.add_parser("make", help="a self-signed CA, a server and a client certificate, and tokens, in DIRECTORY")
    make.add_argument("directory", type=Path)
    make.add_argument("--host", action="append", help="a name or IP the server certificate covers (repeatable; default: "
                      "localhost, 127.0.0.1, ::1 and the four service names)")
    make.add_argument("--days", type=COUNT, default=365)
    make.set_defaults(func=cmd_certs_make)


def _add_wait(sub) -> None:
    """latentedit wait [SERVICE ...]"""
    wait = sub.add_parser("wait", help="wait until services report SERVING")
    wait.add_argument("services", nargs="*")
    wait.add_argument("--timeout", type=SECONDS, default=180, help="seconds to wait, listening or not")
    wait.set_defaults(func=cmd_wait)


def _add_generate(sub) -> None:
    """latentedit generate: a PNG grid of generated faces"""
    gen = sub.add_parser("generate", help="write a PNG grid of generated images")
    gen.add_argument("--out", default="out/faces.png")
    gen.add_argument("--count", type=_number(int, 1, LIMITS.custom_latents), default=16)
    gen.add_argument("--seed", type=SEED, default=0)
    gen.add_argument("--columns", type=_number(int, 0), default=0, help="faces per row (default: a square)")
    gen.add_argument("--scale", type=_number(int, 1, 16), default=2, help="enlarge the grid this many times for viewing")
    gen.add_argument("--model", default="", help="generator name (default: the service's default)")
    gen.add_argument("--in-process", action="store_true", help="run the generator here instead of calling the service")
    _add_service_args(gen, "generator", wait_s=60)
    gen.set_defaults(func=cmd_generate)


def _add_train(sub) -> None:
    """latentedit train boundary | mapping | <any job kind of the method registry>"""
    from latentedit.api.v1 import trainer_pb2
    from latentedit.methods.registry import METHODS
    from latentedit.methods.sgf import MappingSpec

    # The CLI shows the methods' own defaults; unset values travel as 0 and the service fills them in.
    mapping_defaults = {f.name: f.default for f in dataclasses.fields(MappingSpec)}
    default = "the default"
    train = sub.add_parser("train", help="train artifacts through the trainer service")
    train_sub = train.add_subparsers(dest="train_command", required=True)
    boundary = train_sub.add_parser("boundary", help="an InterFaceGAN boundary for one scorer attribute")
    boundary.add_argument("--head", required=True, help="scorer head, e.g. pose")
    boundary.add_argument("--output", required=True, help="the head's output, e.g. yaw")
    boundary.add_argument("--label", default="", help="class label of a vector output, e.g. happy")
    boundary.add_argument("--index", type=_number(int, 0), default=0, help="entry of a vector output without labels")
    boundary.add_argument("--samples", type=_number(int, 2, LIMITS.job_samples), default=2000)
    boundary.add_argument("--keep", type=_number(float, 0, 0.5, above=True), default=0.1,
                          help="fraction kept at each end of the ranking")
    boundary.add_argument("--quality-min", type=_number(float, 0, 1), default=0.0,
                          help="drop samples whose face probability is lower")
    boundary.add_argument("--space", choices=["z", "w", "w+"], default="",
                          help="latent space of the boundary (default: the generator's first, z)")
    _add_job_args(boundary)
    boundary.set_defaults(func=cmd_train_boundary)

    mapping = train_sub.add_parser("mapping", help="an SGF auxiliary mapping F(z, c)")
    mapping.add_argument("--condition", choices=["attributes", "keypoints", "caption"], required=True)
    mapping.add_argument("--attribute", action="append", default=[], help="head.output[.label] (repeatable), for attributes")
    mapping.add_argument("--keypoints-head", default="keypoints5")
    mapping.add_argument("--space", choices=["z", "w", "w+"], default="",
                         help="latent space F maps (default: the generator's first, z)")
    mapping.add_argument("--pairs", type=_number(int, 1, LIMITS.mapping_pairs, zero=default), default=0,
                         help=f"(z, c) pairs (default {mapping_defaults['num_pairs']}; the paper: 200,000)")
    mapping.add_argument("--depth", type=_number(int, 2, LIMITS.mapping_depth, zero=default), default=0,
                         help=f"layers of F (default {mapping_defaults['depth']})")
    mapping.add_argument("--hidden", type=_number(int, 8, LIMITS.mapping_width, zero=default), default=0,
                         help=f"width of F (default {mapping_defaults['hidden']})")
    mapping.add_argument("--steps", type=_number(int, 1, LIMITS.training_steps, zero=default), default=0,
                         help=f"training steps (default {mapping_defaults['steps']})")
    _add_job_args(mapping)
    mapping.set_defaults(func=cmd_train_mapping)
    specific = {"boundary", "mapping"}
    for kind in [k for m in METHODS.values() for k in m.jobs if k not in specific]:
        spec_descriptor = trainer_pb2.StartJobRequest.DESCRIPTOR.fields_by_name[kind].message_type
        generic = train_sub.add_parser(
            kind, help=f"a {kind} job; its spec fields from --param name=value",
            epilog=_params_epilog(spec_descriptor, ("generator", "generator.name", "generator.version",
                                                     "options.seed", "options.artifact_name")))
        generic.add_argument("--param", action="append", default=[], help="a field of the job spec, name=value (repeatable)")
        _add_job_args(generic)
        generic.set_defaults(func=cmd_train_generic, kind=kind)


def _add_edit(sub) -> None:
    """latentedit edit: stream an edit, write a strip PNG and a GIF"""
    from latentedit.api.v1 import editor_pb2
    from latentedit.methods.interfacegan import InterFaceGANOptions
    from latentedit.methods.registry import METHODS
    from latentedit.methods.sgf import SGFOptions

    ifg_defaults, sgf_defaults = InterFaceGANOptions(""), SGFOptions("", ())
    default = "the default"
    edit = sub.add_parser("edit", help="stream an edit and write a strip PNG and an animated GIF",
                          epilog="\n".join(_params_epilog(editor_pb2.EditRequest.DESCRIPTOR.fields_by_name[m].message_type)
                                            for m in METHODS if m in editor_pb2.EditRequest.DESCRIPTOR.fields_by_name),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    edit.add_argument("--method", choices=list(METHODS), default="interfacegan",
                      help="edit method (see `latentedit methods`)")
    edit.add_argument("--param", action="append", default=[],
                      help="a field of the method's request message, name=value (repeatable), e.g. --param directions=pca")
    edit.add_argument("--boundary", default="", help="InterFaceGAN boundary")
    edit.add_argument("--mapping", default="", help="SGF mapping")
    edit.add_argument("--set", dest="target_value", action="append", default=[],
                      help="SGF attribute target head.output[.label]=value (repeatable), e.g. pose.yaw=25")
    edit.add_argument("--keypoints-from-seed", type=SEED, default=None, help="SGF keypoint target: another sample's keypoints")
    edit.add_argument("--keypoints-head", default="keypoints5")
    edit.add_argument("--caption", default="", help="SGF caption target")
    edit.add_argument("--steps", type=_number(int, 1, LIMITS.training_steps, zero=default), default=0,
                      help=f"SGF step limit (default {sgf_defaults.max_steps})")
    edit.add_argument("--step-size", type=_number(float, 0, above=True, zero=default), default=0.0,
                      help=f"SGF step size (default {sgf_defaults.step_size})")
    edit.add_argument("--tolerance", type=_number(float, 0, above=True, zero=default), default=0.0,
                      help=f"SGF stop distance, in standardised condition units (default {sgf_defaults.tolerance})")
    edit.add_argument("--condition", action="append", default=[], help="boundary to hold fixed (repeatable)")
    distance = _number(float, -LIMITS.edit_distance, LIMITS.edit_distance)
    edit.add_argument("--start", type=distance, default=None,
                      help=f"where the walk starts: a method's start distance or stride (default {ifg_defaults.start_distance:g})")
    edit.add_argument("--end", type=distance, default=None,
                      help=f"where the walk ends: a method's end distance or stride (default {ifg_defaults.end_distance:g})")
    edit.add_argument("--rows", type=_row_range, default=None, metavar="START:END",
                      help="per-layer edit: move only these W+ rows (a W boundary is broadcast over them)")
    edit.add_argument("--frames", type=COUNT, default=ifg_defaults.num_frames)
    edit.add_argument("--seed", type=SEED, default=0)
    edit.add_argument("--count", type=COUNT, default=4, help="how many samples to edit")
    edit.add_argument("--score", action="append", default=[], help="scorer head to score every frame with (repeatable)")
    edit.add_argument("--model", default="")
    edit.add_argument("--out", default="out/edit", help="path without suffix: writes .png and .gif")
    _add_service_args(edit, "editor")
    edit.set_defaults(func=cmd_edit)


def _add_methods(sub) -> None:
    """latentedit methods"""
    sub.add_parser("methods", help="list the edit methods and the jobs that train them").set_defaults(func=cmd_methods)


def _add_eval(sub) -> None:
    """latentedit eval mds | dplase | wstar (in-process)"""
    evaluate = sub.add_parser("eval", help="evaluate edit methods")
    eval_sub = evaluate.add_subparsers(dest="eval_command", required=True)
    mds = eval_sub.add_parser("mds", help="Manipulation Disentanglement Score of every method (SGF paper 4.4.1)")
    mds.add_argument("--attributes", nargs="+", default=["smile", "yaw", "mouth-open", "male"])
    mds.add_argument("--samples", type=_number(int, 1, 100_000), default=100, help="test samples per attribute")
    mds.add_argument("--train", type=_number(int, 100, LIMITS.mapping_pairs), default=2000,
                     help="samples for boundaries, PCA and F")
    mds.add_argument("--sgf-steps", type=_number(int, 1, LIMITS.training_steps), default=3000,
                     help="training steps of SGF's F")
    mds.add_argument("--model", default="")
    mds.add_argument("--out", default="out/mds", help="path without suffix: writes .png (curves) and .md (table)")
    mds.set_defaults(func=cmd_eval_mds)
    # Defaults written out (importing latentedit.evaluation here would load torch for every
    # command); tests/test_dplase_eval.py checks they equal DPLaSEEvalSettings().
    dplase = eval_sub.add_parser(
        "dplase", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="DP-LaSE paper's Table 1 (random walks with and without density preservation) and Fig. 10",
        description="Trains DP-LaSE directions in-process, then measures walks from N(0, I) starts at each stride: "
                    "Frechet distance to fresh samples, share of faces the quality head accepts, and (Fig. 10) "
                    "1 - MS-SSIM and identity distance to the start for DP-LaSE, PCA and SeFa directions.")
    dplase.add_argument("--samples", type=int, default=1000, help="walked samples per cell, and fresh samples")
    dplase.add_argument("--quality-samples", type=int, default=200,
                        help="of those, how many the quality head scores (MTCNN is the slow part)")
    dplase.add_argument("--strides", type=float, nargs="+", default=[0.0, 2.0, 4.0, 6.0, 8.0, 10.0], help="must include 0")
    dplase.add_argument("--directions", type=int, default=10, help="DP-LaSE, PCA and SeFa directions")
    dplase.add_argument("--steps", type=int, default=200, help="DP-LaSE training steps")
    dplase.add_argument("--batch-size", type=int, default=8, help="DP-LaSE training batch")
    dplase.add_argument("--layer", default="", help="G1/G2 split (DP-LaSE, PCA); empty: the third intermediate layer")
    dplase.add_argument("--features", choices=["expression", "identity"], default="expression",
                        help="network whose features the Frechet distance compares")
    dplase.add_argument("--curve-samples", type=int, default=64, help="starts per Fig. 10 curve; 0: skip")
    dplase.add_argument("--pca-samples", type=int, default=1000)
    dplase.add_argument("--naming-samples", type=int, default=2,
                        help="starts per direction the job scores to name it")
    dplase.add_argument("--seed", type=int, default=0)
    dplase.add_argument("--model", default="")
    dplase.add_argument("--out", default="out/dplase", help="path without suffix: writes .md (tables) and .json (cells)")
    dplase.set_defaults(func=cmd_eval_dplase)
    wstar = eval_sub.add_parser(
        "wstar", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="W* paper's Table 1 and Fig. 5 for a trained flow: original vs proxy space",
        description="Measures a trained W* flow (latentedit train flow) on fresh samples, in-process: held-out linear "
                    "accuracy per attribute, DCI (Lasso alpha 0.02), latent - perceptual distance gap, 2AFC with the "
                    "perceptual distance as judge, and identity drift vs InterFaceGAN at equal target change. The "
                    "training figures are bench/wstar.py's.")
    wstar.add_argument("--flow", required=True, help="the flow artifact's name")
    wstar.add_argument("--samples", type=_number(int, 100, 100_000), default=2000, help="fresh samples (80/20 splits)")
    wstar.add_argument("--identity-seeds", type=_number(int, 0, 10_000), default=100,
                       help="starts for the identity-drift comparison (0: skip it)")
    wstar.add_argument("--model", default="")
    wstar.add_argument("--out", default="out/wstar", help="path without suffix: writes .md (table) and .png (scatter)")
    wstar.set_defaults(func=cmd_eval_wstar)


# Each command adds its own subparser; only the command given is built (the edit, train and
# eval parsers import the method registry, i.e. torch and scikit-learn: seconds that a
# `generate` or `wait` need not spend). A new command: one _add_<name> function and a line here.
COMMANDS: dict[str, Callable[[Any], None]] = {
    "serve": _add_serve, "models": _add_models, "certs": _add_certs, "wait": _add_wait, "generate": _add_generate,
    "train": _add_train, "edit": _add_edit, "methods": _add_methods, "eval": _add_eval,
}
# Global options that take a value (to find the command word in argv without parsing).
_VALUED_OPTIONS = {"--config", "--token", "--token-file", "--ca", "--client-cert", "--client-key"}


def command_word(argv: list[str]) -> str:
    """The command in argv ('' when none is given or it comes after something unexpected)."""
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token in _VALUED_OPTIONS:
            skip = True
        elif not token.startswith("-"):
            return token
    return ""


def build_parser(only: str = "") -> argparse.ArgumentParser:
    """The whole command line, or with `only` (a COMMANDS key) just that command's part."""
    parser = _Parser(prog="latentedit", description="Latent-space image editing services.")
    parser.add_argument("--config", type=Path, default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--token", default=None, help="bearer token for the services (default: $LATENTEDIT_TOKEN)")
    parser.add_argument("--token-file", default=None, help="read the bearer token from this file")
    parser.add_argument("--ca", default=None, help="CA file that verifies the services' certificates "
                        "(default: $LATENTEDIT_CA, then the config's security.ca_file)")
    # Not --cert/--key: `train --key` is the idempotency key, and one dest would clobber the other.
    parser.add_argument("--client-cert", default=None, help="client certificate, for mutual TLS (default: "
                        "$LATENTEDIT_CERT, then the config's security.client_cert_file)")
    parser.add_argument("--client-key", default=None, help="client key, for mutual TLS (default: $LATENTEDIT_KEY, then "
                        "the config's security.client_key_file)")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, add in COMMANDS.items():
        if not only or name == only:
            add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 any error (bad arguments included: one line on stderr), 130 interrupted."""
    argv = sys.argv[1:] if argv is None else argv
    word = command_word(argv)
    try:
        args = build_parser(word if word in COMMANDS else "").parse_args(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except LatentEditError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        # UNAVAILABLE mid-command: the service (or one it calls) went away; say how to bring them up.
        hint = f"; {_start_hint(args)}" if exc.code() == grpc.StatusCode.UNAVAILABLE else ""
        print(f"error: {exc.code().name}: {exc.details()}{hint}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`latentedit models list | grep -q ...`, `| head`): stop quietly, as
        # Unix tools do, and keep Python from reporting the pipe again when it flushes at exit.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (AttributeError, OSError, ValueError):
            pass
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # a command's own one-line refusal: SystemExit("error: ...")
        if not isinstance(exc.code, str):
            raise
        print(exc.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

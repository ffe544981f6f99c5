"""Edit latency through the services vs the naive in-process loop, measured on equal terms (issue 16).

    .venv/bin/python bench/editor_latency.py [--repetitions 7] [--threads 2] [--no-record]

One 4-seed x 16-frame InterFaceGAN edit along a yaw boundary, scored with `pose`, raw images:
- in-process, the naive loop: the method's edit on a LocalWorld, one synthesize then one score per
  frame (`FrameRequest.chunk_rows = 0`), each frame's images encoded as the editor would;
- in-process, pipelined (chunk_rows = the editor's default), for reference;
- through the services (generator, scorer, editor as separate processes, as `latentedit serve`):
  the editor pipelined (its default), and a second editor with `chunk_rows: 0` (the old path).
Both sides are warmed, then measured interleaved (the order rotates every repetition), medians with
min-max, and per-repetition ratios to the naive loop. Torch (and ONNX Runtime) threads are the same
number on both sides: the services get it as `generator.threads` / `scorer.threads`, which they
pass to torch.set_num_threads (and ONNX Runtime), and this process calls torch.set_num_threads.

Then: a per-frame breakdown (compute in the generator's and scorer's batchers and their handlers,
from the services' Prometheus metrics; transport from direct calls; editor overhead the rest), and
concurrent edits per second at 1, 4 and 16 clients with p50 / p99 frame latency and the rows per
batch the generator and scorer ran (the batchers merge concurrent edits' calls).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import free_port, record, served  # noqa: E402
from latentedit import wire  # noqa: E402
from latentedit.api.v1 import (  # noqa: E402
    editor_pb2,
    editor_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    scorer_pb2,
    scorer_pb2_grpc,
    types_pb2,
)
from latentedit.config import load_config  # noqa: E402
from latentedit.install import link_or_copy  # noqa: E402
from latentedit.repository import ModelRepository  # noqa: E402
from latentedit.rpc.client import connect  # noqa: E402

BOUNDARY = "latency-yaw"
SEEDS, FRAMES, HEADS = 4, 16, ("pose",)


def load() -> str:
    """The 1-minute load average and the number of processes running, as `uptime` shows it."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def bench_repository(source: Path) -> ModelRepository:
    """A private copy (hard links) of the installed repository, with a yaw boundary fitted on 600 samples."""
    from latentedit.methods.interfacegan import boundary_artifact, boundary_from_scores
    from latentedit.world import LocalWorld

    target = Path(tempfile.mkdtemp(prefix="bench-editor-")) / "repo"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".cache", ".jobs"), copy_function=link_or_copy)
    repo = ModelRepository(target)
    world = LocalWorld(repo)
    generator = world.generator()
    latents = world.sample(generator, 600, 1)
    yaw = world.score(world.synthesize(generator, latents), ["pose"])["pose"]["yaw"]
    fit = boundary_from_scores(latents.values, yaw)
    boundary_artifact(BOUNDARY, fit.boundary, generator, "z", {"head": "pose", "output": "yaw"}).save(repo, {})
    return repo


def edit_request(seed: int = 5) -> editor_pb2.EditRequest:
    return editor_pb2.EditRequest(seed=editor_pb2.SeedStart(seed=seed, count=SEEDS), num_frames=FRAMES, score_heads=list(HEADS),
                                  interfacegan=editor_pb2.InterFaceGANEdit(boundary=BOUNDARY, start_distance=-3, end_distance=3))


class InProcess:
    """The same method's edit on a LocalWorld in this process; `chunk_rows` 0 is the naive loop."""

    def __init__(self, repo: ModelRepository, editor_config) -> None:
        from latentedit.methods.interfacegan import InterFaceGAN
        from latentedit.world import LocalWorld

        self.world = LocalWorld(repo)
        self.method = InterFaceGAN()
        self.generator = self.world.generator()
        self.options = self.method.edit_options(editor_pb2.InterFaceGANEdit(boundary=BOUNDARY, start_distance=-3, end_distance=3),
                                                FRAMES, editor_config)
        self.artifact = self.method.prepare(repo, self.generator, self.options)

    def run(self, chunk_rows: int) -> tuple[float, float]:
        from latentedit.methods.base import FrameRequest

        start = time.perf_counter()
        first = None
        for frame in self.method.edit(self.world, self.generator, self.artifact, self.world.sample(self.generator, SEEDS, 5, "z"),
                                      self.options, FrameRequest(HEADS, chunk_rows=chunk_rows)):
            wire.encode_images(frame.images, types_pb2.IMAGE_ENCODING_RAW_UINT8)
            first = first or time.perf_counter() - start
        assert first is not None
        return first, time.perf_counter() - start


def through(editor) -> Callable[[], tuple[float, float]]:
    def run() -> tuple[float, float]:
        start = time.perf_counter()
        first = None
        for _ in editor.Edit(edit_request(), timeout=600):
            first = first or time.perf_counter() - start
        assert first is not None
        return first, time.perf_counter() - start

    return run


def interleaved(sides: dict[str, Callable[[], tuple[float, float]]], repetitions: int, warmups: int = 2) -> dict[str, np.ndarray]:
    """[repetitions, 2] (first frame, total) seconds per side: every side warmed, then measured
    interleaved with the order rotated (and reversed every other repetition)."""
    for run in sides.values():
        for _ in range(warmups):
            run()
    names = list(sides)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for repetition in range(repetitions):
        order = names[repetition % len(names):] + names[:repetition % len(names)]
        if repetition % 2:
            order.reverse()
        for name in order:
            runs[name].append(sides[name]())
    return {name: np.array(values) for name, values in runs.items()}


def spread(values: np.ndarray, scale: float = 1.0, digits: int = 0) -> str:
    v = values * scale
    return f"{np.median(v):.{digits}f} ({v.min():.{digits}f}-{v.max():.{digits}f})"


# ---- the services' own metrics --------------------------------------------------------------------


class Metrics:
    """Sums of the services' Prometheus histograms (batch compute, handler time) between two scrapes."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.ports = ports

    def scrape(self) -> dict[tuple[str, str, tuple], float]:
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        out: dict[tuple[str, str, tuple], float] = {}
        for service, port in self.ports.items():
            text = urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=10).read().decode()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    # "latentedit.v1.GeneratorService/Synthesize" -> "Synthesize"
                    labels = {k: v.rsplit("/", 1)[-1] if k == "method" else v for k, v in sample.labels.items()}
                    out[(service, sample.name, tuple(sorted(labels.items())))] = sample.value
        return out

    @staticmethod
    def delta(before: dict, after: dict, process: str, name: str, **labels: str) -> float:
        key = (process, name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)


def breakdown(editors: dict[str, object], metrics: Metrics, addresses: dict[str, str], in_process: InProcess,
              repetitions: int) -> str:
    """Per-frame time of one 4 x 16 edit, from the services' metrics and timers here."""
    generator = generator_pb2_grpc.GeneratorServiceStub(connect(addresses["generator"]))
    scorer = scorer_pb2_grpc.ScorerServiceStub(connect(addresses["scorer"]))
    world = in_process.world
    g = in_process.generator
    latents = world.sample(g, SEEDS, 5, "z")
    images = world.synthesize(g, latents)
    encoded = wire.encode_images(images, types_pb2.IMAGE_ENCODING_RAW_UINT8)
    synth_request = generator_pb2.SynthesizeRequest(model=types_pb2.ModelRef(name=g.name), latents=wire.latents_to_proto(latents))
    score_request = scorer_pb2.ScoreRequest(images=encoded, heads=list(HEADS))

    def timed(fn: Callable[[], object], count: int = 30) -> float:
        fn()
        samples = []
        for _ in range(count):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return float(np.median(samples))

    direct = {
        "synthesize (in-process, 4 rows)": timed(lambda: world.synthesize(g, latents)),
        "score pose (in-process, 4 images)": timed(lambda: world.score(images, list(HEADS))),
        "encode raw (4 images)": timed(lambda: wire.encode_images(images, types_pb2.IMAGE_ENCODING_RAW_UINT8)),
        "Synthesize RPC (4 rows), from here": timed(lambda: generator.Synthesize(synth_request, timeout=60)),
        "Score RPC (pose, 4 images), from here": timed(lambda: scorer.Score(score_request, timeout=60)),
        "ListModels + ListHeads + Sample RPCs, from here": timed(lambda: (
            generator.ListModels(generator_pb2.ListModelsRequest(), timeout=60),
            scorer.ListHeads(scorer_pb2.ListHeadsRequest(), timeout=60),
            generator.Sample(generator_pb2.SampleRequest(model=types_pb2.ModelRef(name=g.name), count=SEEDS, seed=5), timeout=60))),
    }
    before = metrics.scrape()
    server_direct = {
        "Synthesize handler (4 rows)": ("generator", "Synthesize", "generator"),
        "Score handler (4 images)": ("scorer", "Score", "scorer"),
    }
    rows = ["| per frame (ms), median of 30 calls | |", "|---|---|"]
    rows += [f"| {name} | {seconds * 1000:.1f} |" for name, seconds in direct.items()]
    # Handler vs compute of the direct calls (the metrics count every call: take the 30 calls' sums).
    for _ in range(30):
        generator.Synthesize(synth_request, timeout=60)
        scorer.Score(score_request, timeout=60)
    after = metrics.scrape()
    for name, (service, method, batcher) in server_direct.items():
        handler = Metrics.delta(before, after, service, "latentedit_rpc_duration_seconds_sum", service=service, method=method) / 30
        compute = Metrics.delta(before, after, service, "latentedit_batch_duration_seconds_sum", batcher=batcher) / 30
        rows.append(f"| {name}: in the handler / of which batch compute | {handler * 1000:.1f} / {compute * 1000:.1f} |")

    table = ["| editor | generator batches (rows each) | generator compute | Synthesize handlers | scorer batches (rows) "
             "| scorer compute | Score handlers | Edit handler | client total | editor overhead + transport |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, editor in editors.items():
        run = through(editor)
        run()
        before = metrics.scrape()
        totals = [run()[1] for _ in range(repetitions)]
        after = metrics.scrape()

        def d(process: str, name: str, **labels: str) -> float:
            return Metrics.delta(before, after, process, name, **labels) / repetitions

        g_batches = d("generator", "latentedit_batch_size_rows_count", batcher="generator")
        g_rows = d("generator", "latentedit_batch_size_rows_sum", batcher="generator")
        s_batches = d("scorer", "latentedit_batch_size_rows_count", batcher="scorer")
        s_rows = d("scorer", "latentedit_batch_size_rows_sum", batcher="scorer")
        g_compute = d("generator", "latentedit_batch_duration_seconds_sum", batcher="generator")
        s_compute = d("scorer", "latentedit_batch_duration_seconds_sum", batcher="scorer")
        g_handler = d("generator", "latentedit_rpc_duration_seconds_sum", service="generator", method="Synthesize")
        s_handler = d("scorer", "latentedit_rpc_duration_seconds_sum", service="scorer", method="Score")
        e_handler = d("editor", "latentedit_rpc_duration_seconds_sum", service="editor", method="Edit")
        total = float(np.median(totals))
        busy = g_handler + s_handler
        table.append(
            f"| {label} | {g_batches:.0f} ({g_rows / max(g_batches, 1):.1f}) | {g_compute * 1000:.0f} | {g_handler * 1000:.0f} "
            f"| {s_batches:.0f} ({s_rows / max(s_batches, 1):.1f}) | {s_compute * 1000:.0f} | {s_handler * 1000:.0f} "
            f"| {e_handler * 1000:.0f} | {total * 1000:.0f} | {(total - busy) * 1000:.0f} |")
    return ("\n".join(rows) + "\n\nWhole 4 x 16 edit, ms per edit (means over " + str(repetitions) + " edits; generator and "
            "scorer figures from their Prometheus histograms; the handlers overlap when pipelined, so the last column "
            "(client total - both handlers' time) goes negative when the generator and scorer work at the same time):\n\n"
            + "\n".join(table))


# ---- concurrency -----------------------------------------------------------------------------------


def concurrency(editor, metrics: Metrics, clients: int, edits_per_client: int) -> str:
    """`clients` threads each running edits back to back: edits/s, frame latency, rows per batch."""
    gaps: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        barrier.wait()
        mine = []
        try:
            for n in range(edits_per_client):
                last = time.perf_counter()
                frames = 0
                for frame in editor.Edit(edit_request(seed=100 * index + n), timeout=600):
                    now = time.perf_counter()
                    mine.append(now - last)
                    last = now
                    assert frame.index == frames
                    frames += 1
                assert frames == FRAMES
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        with lock:
            gaps.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    before = metrics.scrape()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    after = metrics.scrape()
    if errors:
        raise errors[0]
    ms = np.array(gaps) * 1000

    def rows_per_batch(service: str) -> float:
        count = Metrics.delta(before, after, service, "latentedit_batch_size_rows_count", batcher=service)
        return Metrics.delta(before, after, service, "latentedit_batch_size_rows_sum", batcher=service) / max(count, 1)

    return (f"| {clients} | {clients * edits_per_client} | {clients * edits_per_client / seconds:.2f} "
            f"| {np.percentile(ms, 50):.0f} | {np.percentile(ms, 99):.0f} "
            f"| {rows_per_batch('generator'):.1f} | {rows_per_batch('scorer'):.1f} |")


# ---- SGF step and boundary job ---------------------------------------------------------------------


def sgf_step(in_process: InProcess, repetitions: int) -> str:
    """One SGF Euler step (Algorithm 1's dz: m+1 JVPs of F) vs one F forward + backward, same batch;
    and a whole step in-process (dz, synthesize, score) for scale. F at MappingSpec's defaults
    (untrained: the cost does not depend on the weights)."""
    from latentedit.methods.sgf import AuxiliaryMapping, MappingSpec, SGFOptions, surrogate_step

    fields = MappingSpec.__dataclass_fields__
    depth, hidden = fields["depth"].default, fields["hidden"].default
    order = SGFOptions.__dataclass_fields__["neumann_order"].default
    rows = ["| batch | condition dims | SGF step dz, ms | F forward + backward, ms | ratio | whole step in-process "
            "(dz + synthesize + score pose), ms |", "|---|---|---|---|---|---|"]
    world, g = in_process.world, in_process.generator
    for batch, condition_dim in ((SEEDS, 1), (SEEDS, 8), (64, 8)):
        torch.manual_seed(0)
        mapping = AuxiliaryMapping(g.space().size, condition_dim, depth, hidden).eval()
        z, c = torch.randn(batch, g.space().size), torch.randn(batch, condition_dim)
        dc = 0.1 * torch.randn(batch, condition_dim)

        def step() -> None:
            surrogate_step(mapping, z, c, dc, order)

        def forward_backward() -> None:
            zz, cc = z.clone().requires_grad_(True), c.clone().requires_grad_(True)
            mapping(zz, cc).square().sum().backward()

        latents = world.sample(g, batch, 3, "z")

        def whole() -> None:
            dz = surrogate_step(mapping, z, c, dc, order).detach()
            world.score(world.synthesize(g, latents.replace(latents.values + dz.numpy())), list(HEADS))

        times = interleaved({"step": lambda: (0.0, timed_s(step)), "fb": lambda: (0.0, timed_s(forward_backward)),
                             "whole": lambda: (0.0, timed_s(whole))}, max(repetitions, 5) * 3)
        step_ms, fb_ms, whole_ms = (times[k][:, 1] * 1000 for k in ("step", "fb", "whole"))
        rows.append(f"| {batch} | {condition_dim} | {spread(step_ms, digits=2)} | {spread(fb_ms, digits=2)} "
                    f"| {spread(step_ms / fb_ms, digits=2)} | {spread(whole_ms, digits=1)} |")
        print(rows[-1], flush=True)
    return ("\n".join(rows) + f"\n\nF: depth {depth}, hidden {hidden} (MappingSpec defaults), Neumann order {order} "
            f"(SGFOptions default: {order + 1} JVPs per step, torch.func.jvp); interleaved, medians (min-max).")


def timed_s(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def boundary_job(addresses: dict[str, str], num_samples: int, batch_size: int) -> str:
    """A yaw boundary job's samples/s through the trainer vs the pose head's own ceiling (Score calls
    of the job's batch size, the only head the job asks for) and the generator's (Synthesize calls)."""
    from latentedit.api.v1 import trainer_pb2, trainer_pb2_grpc

    trainer = trainer_pb2_grpc.TrainerServiceStub(connect(addresses["trainer"]))
    generator = generator_pb2_grpc.GeneratorServiceStub(connect(addresses["generator"]))
    scorer = scorer_pb2_grpc.ScorerServiceStub(connect(addresses["scorer"]))
    latents = generator.Sample(generator_pb2.SampleRequest(count=batch_size, seed=1), timeout=120).latents
    images = generator.Synthesize(generator_pb2.SynthesizeRequest(latents=latents), timeout=120).images
    score = scorer_pb2.ScoreRequest(images=images, heads=["pose"])

    def ceiling(call: Callable[[], object], calls: int = 4) -> float:
        call()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        return calls * batch_size / (time.perf_counter() - start)

    def job(key: str) -> float:
        request = trainer_pb2.StartJobRequest(idempotency_key=key, boundary=trainer_pb2.BoundaryJobSpec(
            attribute=types_pb2.AttributeRef(head="pose", output="yaw"), num_samples=num_samples, keep_fraction=0.1,
            options=trainer_pb2.TrainingOptions(artifact_name=key, seed=1, batch_size=batch_size)))
        started = time.perf_counter()
        sampled = None
        job_id = trainer.StartJob(request, timeout=120).id
        for update in trainer.WatchJob(trainer_pb2.WatchJobRequest(id=job_id), timeout=3600):
            if sampled is None and update.job.progress >= 0.85:  # sampling and scoring done (the SVM fit follows)
                sampled = time.perf_counter() - started
            final = update.job
        if final.state != trainer_pb2.JOB_STATE_SUCCEEDED:
            raise SystemExit(f"boundary job failed: {final.error}")
        return num_samples / (sampled or (time.perf_counter() - started))

    stamp = str(int(time.time()))
    rates = {"job": [], "pose": [], "generator": []}
    for i in range(3):  # interleaved: job, then both ceilings
        rates["job"].append(job(f"bench-latency-job-{stamp}-{i}"))
        rates["pose"].append(ceiling(lambda: scorer.Score(score, timeout=600)))
        rates["generator"].append(ceiling(lambda: generator.Synthesize(generator_pb2.SynthesizeRequest(latents=latents),
                                                                       timeout=600)))
    job_rate, pose, gen = (np.array(rates[k]) for k in ("job", "pose", "generator"))
    return ("| samples/s: boundary job (sampling and scoring phase) | pose head ceiling (Score, batch "
            f"{batch_size}) | generator ceiling (Synthesize, batch {batch_size}) | job / slowest head |\n|---|---|---|---|\n"
            f"| {spread(job_rate)} | {spread(pose)} | {spread(gen)} | {spread(job_rate / pose, digits=2)} |\n\n"
            f"Yaw boundary job (head pose only), {num_samples} samples in batches of {batch_size}, 3 runs interleaved with "
            "the ceilings, medians (min-max); the job's rate is taken until its progress reaches the end of sampling and "
            "scoring (0.85), before the SVM fit.")


@contextlib.contextmanager
def second_editor(repository: str, addresses: dict[str, str], sections: dict) -> Iterator[tuple[str, int]]:
    """Another editor process on the same generator and scorer, with its own editor settings."""
    import yaml

    from latentedit.rpc.client import wait_serving

    port, metrics_port = free_port(), free_port()
    config = Path(tempfile.mkdtemp()) / "editor.yaml"
    config.write_text(yaml.safe_dump({
        "repository": repository, "services": {"editor": {"port": port}}, "security": {"insecure": True},
        "addresses": {"generator": addresses["generator"], "scorer": addresses["scorer"]},
        "observability": {"metrics_ports": {"editor": metrics_port}}, **sections}))
    process = subprocess.Popen([sys.executable, "-m", "latentedit", "--config", str(config), "serve", "editor"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_serving(connect(f"localhost:{port}"), timeout_s=300, what="editor")
        yield f"localhost:{port}", metrics_port
    finally:
        process.terminate()
        process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch / ONNX Runtime intra-op threads, the same in this process and in each service")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--edits-per-client", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: latency, breakdown, concurrency, sgf, job")
    parser.add_argument("--job-samples", type=int, default=2048)
    parser.add_argument("--generator-backend", default="auto",
                        help="the generator service's backend (auto: ONNX Runtime on CPU; torch: the in-process loop's)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    torch.set_num_threads(args.threads)
    base = load_config(ROOT / "config" / "local.yaml")
    repo = bench_repository(Path(base.repository))
    metric_ports = {name: free_port() for name in ("generator", "scorer", "editor")}
    sections = {"generator": {"threads": args.threads, "backend": args.generator_backend}, "scorer": {"threads": args.threads},
                "observability": {"metrics_ports": metric_ports}}
    from latentedit.methods.base import DEFAULT_CHUNK_ROWS

    settings = (f"Settings: {SEEDS} seeds x {FRAMES} frames, InterFaceGAN along a yaw boundary (fitted on 600 samples), "
                f"d -3..3, scored with {', '.join(HEADS)}, raw images; {args.threads} torch / ONNX Runtime threads in this "
                f"process and in each service (config generator.threads, scorer.threads); services as separate processes "
                f"(`latentedit serve`, generator backend {args.generator_backend}{' = ONNX Runtime on CPU' if args.generator_backend == 'auto' else ''}; "
                f"the in-process loop runs the torch generator), plaintext loopback; editor chunk_rows {DEFAULT_CHUNK_ROWS} (pipelined) and 0 (sequential).")
    sections_out = []
    print(settings, flush=True)
    print("before:", load(), flush=True)
    with served(["generator", "scorer", "editor", "trainer"], str(repo.root), sections) as addresses, \
            second_editor(str(repo.root), addresses, {"editor": {"chunk_rows": 0}}) as (sequential_address, sequential_metrics):
        pipelined = editor_pb2_grpc.EditorServiceStub(connect(addresses["editor"]))
        sequential = editor_pb2_grpc.EditorServiceStub(connect(sequential_address))
        local = InProcess(repo, base.editor)
        load_before = load()
        if "latency" not in skip:
            sides = {
                "in-process, naive per-frame loop": lambda: local.run(0),
                f"in-process, pipelined (chunk_rows {DEFAULT_CHUNK_ROWS})": lambda: local.run(DEFAULT_CHUNK_ROWS),
                "services, editor pipelined (default)": through(pipelined),
                "services, editor sequential (chunk_rows 0)": through(sequential),
            }
            table = interleaved(sides, args.repetitions)
            naive = table["in-process, naive per-frame loop"]
            rows = ["| path | first frame, ms | 16 frames, ms | first frame / naive | total / naive |", "|---|---|---|---|---|"]
            for name, seconds in table.items():
                rows.append(f"| {name} | {spread(seconds[:, 0], 1000)} | {spread(seconds[:, 1], 1000)} "
                            f"| {spread(seconds[:, 0] / naive[:, 0], digits=2)} | {spread(seconds[:, 1] / naive[:, 1], digits=2)} |")
            text = ("\n".join(rows) + f"\n\nMedian (min-max) of {args.repetitions} interleaved repetitions after 2 warm-up "
                    "runs per side; ratios are per repetition (each run against the naive loop of the same repetition). "
                    f"Load: {load_before} before, {load()} after.")
            print(text, flush=True)
            sections_out.append("### 4 x 16 edit: services vs in-process\n\n" + text)
        metrics = Metrics({**metric_ports})
        if "breakdown" not in skip:
            both = Metrics({**metric_ports})
            text = breakdown({"pipelined": pipelined}, both, addresses, local, args.repetitions)
            seq_metrics = Metrics({"generator": metric_ports["generator"], "scorer": metric_ports["scorer"],
                                   "editor": sequential_metrics})
            text_seq = breakdown({"sequential": sequential}, seq_metrics, addresses, local, args.repetitions)
            text += "\n" + text_seq.split("\n")[-1]
            print(text, flush=True)
            sections_out.append(f"### Per-frame breakdown\n\n{text}\n\nLoad after: {load()}.")
        if "concurrency" not in skip:
            rows = ["| clients | edits | edits/s | frame latency p50, ms | p99, ms | generator rows per batch | scorer rows per batch |",
                    "|---|---|---|---|---|---|---|"]
            for clients in (int(c) for c in args.clients.split(",")):
                rows.append(concurrency(pipelined, metrics, clients, args.edits_per_client))
                print(rows[-1], flush=True)
            sections_out.append(
                "### Concurrent edits (pipelined editor)\n\n" + "\n".join(rows) + "\n\nEach client runs "
                f"{args.edits_per_client} edits of {SEEDS} x {FRAMES} back to back; frame latency is the time from the "
                "request (first frame) or the previous frame to each frame. Rows per batch: mean over the batches the "
                f"generator's and scorer's batchers ran meanwhile (one edit's call is {SEEDS} rows for the first frame, "
                f"then up to {DEFAULT_CHUNK_ROWS}). Load after: {load()}.")
        if "sgf" not in skip:
            text = sgf_step(local, args.repetitions)
            sections_out.append(f"### SGF step vs one F forward + backward (in-process, goal <= 3x)\n\n{text}\n\nLoad after: {load()}.")
        if "job" not in skip:
            text = boundary_job(addresses, args.job_samples, 256)
            print(text, flush=True)
            sections_out.append(f"### Boundary job vs the slowest head's ceiling (goal >= 0.8x)\n\n{text}\n\nLoad after: {load()}.")
    body = settings + "\n\n" + "\n\n".join(sections_out)
    if not args.no_record:
        title = "Editor latency (issue 16)" + ("" if args.generator_backend == "auto" else f", generator backend {args.generator_backend}")
        record(title, " ".join(["python bench/editor_latency.py", *sys.argv[1:]]), body)
        print("recorded in bench/RESULTS.md")
    shutil.rmtree(repo.root.parent, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Reliability of the four services as separate processes: the bad-input corpus, overload,
kill -9 of each service, a soak of edits, and cancellation latency. Rewrites the "Reliability"
section of bench/RESULTS.md.

    .venv/bin/python bench/reliability.py [--soak 2000] [--soak-clients 4] [--overload-callers 24]
                                          [--findings /tmp/corpus_findings.md] [--baseline COMMIT] [--skip corpus,overload,...]

Defaults run in under 15 minutes on 2 CPU cores. `--soak 10000` is the long soak.

- corpus: tests/corpus.py (the same cases as tests/test_bad_input_corpus.py), each followed by a
  valid call to the same service; the findings go to --findings. With --baseline COMMIT the same
  corpus also runs against the services of that commit (git archive), to list what was wrong
  before the fixes.
- overload: --overload-callers concurrent Synthesize calls of 1024 rows (PNG) at the generator,
  and as many Score calls of 256 images at the scorer, all released at once; the codes, how fast
  refusals and admissions are answered, and the service's RSS before, at its peak during the
  burst and after (from /proc/<pid>/status).
- faults: each service in turn killed with SIGKILL while an edit is streaming and (generator,
  scorer, trainer) while a training job runs; what the client sees, the job's final state and
  reason, whether every job record survived, whether the repository holds anything
  half-written, whether a queued job runs after the trainer's restart.
- soak: --soak edits (1 seed, 2 frames, raw images, pose scores) from --soak-clients clients;
  RSS and threads of every service after a warm-up and at the end; errors.
- cancellation: an in-process generator + scorer + editor (so the generator's batcher counts
  rows): a 64-seed, 200-frame edit cancelled after its 3rd frame; rows synthesized after the
  cancel, in frames of 64 rows, and the time until the editor and generator are idle.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import record  # noqa: E402
from latentedit.api.v1 import (  # noqa: E402
    editor_pb2,
    editor_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    scorer_pb2,
    scorer_pb2_grpc,
    trainer_pb2,
    types_pb2,
)
from latentedit.config import load_config  # noqa: E402
from latentedit.install import link_or_copy  # noqa: E402
from tests import corpus  # noqa: E402

BOUNDARY = "reliability-axis"
MIB = 1024 * 1024
RSS_BOUND_MIB = 2048  # the most a burst of overload may add to a service's RSS


def private_repo(work: Path) -> Path:
    source = Path(load_config(ROOT / "config" / "local.yaml").repository)
    target = work / "repo"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".cache", ".jobs", "dirs"), copy_function=link_or_copy)
    return target


def start_suite(work: Path, sections: dict | None = None, code_root: Path | None = None) -> corpus.ProcessSuite:
    work.mkdir(parents=True, exist_ok=True)
    suite = corpus.ProcessSuite(private_repo(work), work, sections=sections, code_root=code_root)
    suite.start()
    return suite


def train_axis(suite: corpus.ProcessSuite) -> None:
    z = corpus.z(60, seed=1)
    job = corpus.run_job(suite, trainer_pb2.StartJobRequest(idempotency_key=BOUNDARY, custom_boundary=trainer_pb2.CustomBoundaryJobSpec(
        latents=types_pb2.Latents(space=1, values=corpus.tensor(z)), labels=corpus.tensor((z[:, 0] > 0).astype(np.int64)),
        options=trainer_pb2.TrainingOptions(artifact_name=BOUNDARY))), timeout_s=300)
    assert job.state == trainer_pb2.JOB_STATE_SUCCEEDED, job.error


def edit_request(count=1, frames=2, seed=0, images=True, heads=("pose",)):
    return editor_pb2.EditRequest(seed=editor_pb2.SeedStart(seed=seed, count=count), num_frames=frames, omit_images=not images,
                                  score_heads=list(heads),
                                  interfacegan=editor_pb2.InterFaceGANEdit(boundary=BOUNDARY, start_distance=-1, end_distance=1))


def mib(value: float) -> str:
    return f"{value / MIB:.0f} MiB"


# ---- corpus -----------------------------------------------------------------------------------


def code_snapshot(ref: str, work: Path) -> Path:
    """The tree of commit `ref` (git archive), for running the services of that commit."""
    import io
    import subprocess
    import tarfile

    target = work / f"code-{ref}"
    target.mkdir(parents=True, exist_ok=True)
    data = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        archive.extractall(target, filter="data")
    return target


def corpus_rows(work: Path, code_root: Path | None = None) -> list[tuple]:
    suite = start_suite(work, code_root=code_root)
    rows = []
    try:
        corpus.prepare_artifacts(suite)
        for case in corpus.build_corpus():
            outcome, after = corpus.run_case(suite, case)
            rows.append((case, outcome, after))
    finally:
        suite.stop()
    return rows


def _wrong_by_kind(rows: list[tuple]) -> str:
    kinds: dict[str, int] = {}
    for case, outcome, after in rows:
        if corpus.wrong(case, outcome, after):
            key = f"expected {case.expected.name}, got {outcome.code.name}"
            kinds[key] = kinds.get(key, 0) + 1
    return "; ".join(f"{k}: {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])) or "none"


def run_corpus(work: Path, findings: Path, baseline: str) -> str:
    rows = corpus_rows(work / "corpus")
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = corpus.findings_markdown(rows, f"bench/reliability.py, services of the working tree, {stamp}")
    s = corpus.summary(rows)
    lines = [f"### Bad-input corpus: {s['cases']} cases", "",
             "Generated from the proto descriptors by tests/corpus.py (the cases of tests/test_bad_input_corpus.py); each case "
             "is followed by a valid call to the same service (after StartJob also to the generator and the scorer).", "",
             f"INTERNAL: **{s['internal']}**, UNKNOWN: **{s['unknown']}**, hangs (a deadline hit where another code was "
             f"expected): **{s['hangs']}**, a valid call failing right after a case: **{s['next_call_failed']}**; "
             f"cases answered other than their precise expected code: **{s['wrong']}** (each listed in `{findings}`).", "",
             "Cases per service: " + ", ".join(f"{k} {v}" for k, v in s["per_service"].items()) + ".", "",
             "| RPC | cases | codes seen |", "|---|---:|---|"]
    for rpc, codes in s["per_rpc"].items():
        lines.append(f"| {rpc} | {sum(codes.values())} | " + ", ".join(f"{k} {v}" for k, v in sorted(codes.items())) + " |")
    lines += ["", f"Still answered wrong, by expected -> got: {_wrong_by_kind(rows)}."]
    if baseline:
        before = corpus_rows(work / "corpus-before", code_snapshot(baseline, work))
        b = corpus.summary(before)
        places: dict[str, int] = {}
        for case, outcome, after in before:
            if corpus.wrong(case, outcome, after):
                place = corpus.where_to_fix(case, outcome).split(" ")[0]
                places[place] = places.get(place, 0) + 1
        lines += ["", f"**Before the fixes** (the same corpus against the services of commit `{baseline}`): "
                  f"{b['wrong']} of {b['cases']} cases answered wrong; INTERNAL {b['internal']}, UNKNOWN {b['unknown']}, "
                  f"hangs {b['hangs']}, a valid call failing right after a case {b['next_call_failed']}. "
                  f"By expected -> got: {_wrong_by_kind(before)}. By the file where the fix belongs: "
                  + "; ".join(f"{k} {v}" for k, v in sorted(places.items(), key=lambda kv: -kv[1])) + "."]
        text += "\n\n" + corpus.findings_markdown(before, f"BEFORE the fixes: services of commit {baseline}").replace("# ", "## ", 1)
    findings.write_text(text)
    return "\n".join(lines)


# ---- overload ---------------------------------------------------------------------------------


class RssSampler:
    """Samples a process's RSS every 50 ms on a thread until stopped: the peak during a burst."""

    def __init__(self, suite: corpus.ProcessSuite, name: str) -> None:
        self.suite, self.name, self.peak = suite, name, suite.rss_bytes(name)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, self.suite.rss_bytes(self.name))
            except (OSError, RuntimeError):
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


def burst(call, request, callers: int, timeout: float) -> list[tuple[grpc.StatusCode, float, str]]:
    go = threading.Barrier(callers)

    def one(_):
        go.wait(60)
        started = time.monotonic()
        try:
            call(request, timeout=timeout)
            return grpc.StatusCode.OK, time.monotonic() - started, ""
        except grpc.RpcError as exc:
            return exc.code(), time.monotonic() - started, exc.details() or ""

    with futures.ThreadPoolExecutor(callers) as pool:
        return list(pool.map(one, range(callers)))


def run_overload(work: Path, callers: int) -> str:
    suite = start_suite(work / "overload")
    lines = ["### Overload", "",
             f"{callers} callers released at once (deadline 120 s each), default limits from `config/local.yaml`'s defaults "
             "(generator queue 4096 rows, scorer queue 2048 rows, 64 concurrent RPCs per service). RSS from /proc/<pid>/status.", "",
             "| service | request | admitted | RESOURCE_EXHAUSTED | other | refusal answered in (median / max) | "
             "admitted answered in (median / max) | RSS before | RSS peak | RSS after |",
             "|---|---|---:|---:|---:|---|---|---|---|---|"]
    try:
        targets = [
            ("generator", generator_pb2_grpc.GeneratorServiceStub(suite.channel("generator")).Synthesize,
             generator_pb2.SynthesizeRequest(latents=types_pb2.Latents(space=1, values=corpus.tensor(corpus.z(1024))),
                                             image_encoding=types_pb2.IMAGE_ENCODING_PNG), "Synthesize 1024 rows, PNG"),
            ("scorer", scorer_pb2_grpc.ScorerServiceStub(suite.channel("scorer")).Score,
             scorer_pb2.ScoreRequest(images=corpus.raw_images(256), heads=["expression"]), "Score 256 images, expression"),
        ]
        verdicts: list[tuple[str, bool]] = []
        for name, call, request, what in targets:
            corpus.valid_call(suite.channels, name)  # warm
            before = suite.rss_bytes(name)
            sampler = RssSampler(suite, name)
            results = burst(call, request, callers, timeout=120)
            peak = sampler.stop()
            after_call = corpus.valid_call(suite.channels, name)
            after = suite.rss_bytes(name)
            refused = [t for c, t, _ in results if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
            admitted = [t for c, t, _ in results if c == grpc.StatusCode.OK]
            other = [(c.name, d[:100]) for c, _, d in results if c not in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)]

            def spread(values):
                return f"{statistics.median(values) * 1000:.0f} / {max(values) * 1000:.0f} ms" if values else "-"

            verdicts.append((name, peak - before <= RSS_BOUND_MIB * MIB))
            lines.append(f"| {name} | {what} | {len(admitted)} | {len(refused)} | {len(other)} {other[:2] if other else ''} | "
                         f"{spread(refused)} | {spread(admitted)} | {mib(before)} | {mib(peak)} | {mib(after)} |")
            if after_call.code != grpc.StatusCode.OK:
                lines.append(f"\n{name} failed a valid call after the burst: {after_call.code.name} {after_call.details[:200]}")
        lines += ["", f"Bound stated: during a burst a service's RSS stays under its RSS before the burst plus "
                  f"{RSS_BOUND_MIB} MiB (the generator's admitted queue of 4096 rows is about 1.2 GiB of activations, "
                  "images and PNGs at batch 256; the scorer's 2048 images less). "
                  + "; ".join(f"{name}: {'within' if ok else 'EXCEEDED'}" for name, ok in verdicts) + "."]
    finally:
        suite.stop()
    return "\n".join(lines)


# ---- faults -----------------------------------------------------------------------------------


def repository_problems(root: Path) -> list[str]:
    problems = []
    for folder in sorted(p for p in root.glob("*/*") if p.is_dir()):
        if folder.parts[-2].startswith(".") or folder.name.startswith("."):
            continue
        manifest = folder / "manifest.json"
        if not manifest.exists():
            problems.append(f"{folder.relative_to(root)}: no manifest")
            continue
        files = json.loads(manifest.read_text()).get("files", {})
        problems += [f"{folder.relative_to(root)}: {f} missing" for f in files.values() if not (folder / f).exists()]
    return problems


def _stream_then_kill(suite, victim: str, request) -> tuple[str, str]:
    """Start an edit, read one frame, kill `victim`, read on: (code, message) the client saw."""
    editor = editor_pb2_grpc.EditorServiceStub(suite.channel("editor"))
    call = editor.Edit(request, timeout=300)
    next(call)
    suite.kill(victim)
    try:
        for _ in call:
            pass
        return "OK", "(the edit completed)"
    except grpc.RpcError as exc:
        return exc.code().name, (exc.details() or "")[:200]


def _job_then_kill(suite, victim: str, key: str) -> tuple[str, str]:
    """Start a long boundary job, wait until it makes progress, kill `victim`: (final state, reason)."""
    stub = corpus.trainer_stub(suite)
    job = stub.StartJob(trainer_pb2.StartJobRequest(idempotency_key=key, boundary=trainer_pb2.BoundaryJobSpec(
        attribute=corpus.attribute("pose", "yaw"), num_samples=corpus.LONG_JOB_SAMPLES, keep_fraction=0.1,
        options=trainer_pb2.TrainingOptions(artifact_name=key, batch_size=64))), timeout=60)
    for event in stub.WatchJob(trainer_pb2.WatchJobRequest(id=job.id), timeout=300):
        if event.job.state == trainer_pb2.JOB_STATE_RUNNING and event.job.progress > 0:
            break
    suite.kill(victim)
    final = None
    deadline = time.monotonic() + 600
    while final is None and time.monotonic() < deadline:
        # The job's own downstream call fails within its call timeout; follow the record to its end.
        try:
            for event in stub.WatchJob(trainer_pb2.WatchJobRequest(id=job.id), timeout=deadline - time.monotonic()):
                final = event.job
        except grpc.RpcError as exc:
            return "watch failed", f"{exc.code().name}: {exc.details()}"[:200]
    if final is None or final.state in (trainer_pb2.JOB_STATE_RUNNING, trainer_pb2.JOB_STATE_QUEUED):
        stub.CancelJob(trainer_pb2.CancelJobRequest(id=job.id), timeout=30)
        return "still running after 600 s (cancelled)", ""
    return trainer_pb2.JobState.Name(final.state), final.error[:200]


def run_faults(work: Path) -> str:
    suite = start_suite(work / "faults")
    rows = []
    try:
        train_axis(suite)
        stub = corpus.trainer_stub(suite)
        long_edit = edit_request(count=16, frames=200, images=True, heads=("pose",))
        for victim in ("generator", "scorer", "editor"):
            code, message = _stream_then_kill(suite, victim, long_edit)
            suite.start(victim)
            after = corpus.valid_call(suite.channels, "editor", BOUNDARY)
            rows.append((victim, "mid-edit (Edit stream)", f"{code}: {message}", "-", after.code.name))
        for victim in ("generator", "scorer"):
            state, reason = _job_then_kill(suite, victim, f"killed-{victim}")
            suite.start(victim)
            after = corpus.valid_call(suite.channels, victim)
            rows.append((victim, "mid-job (boundary job)", "-", f"{state}: {reason}", after.code.name))

        # The trainer: one job running, one queued, a WatchJob open; kill -9; restart.
        jobs_before = {j.id for j in stub.ListJobs(trainer_pb2.ListJobsRequest(page_size=500), timeout=30).jobs}
        running = stub.StartJob(trainer_pb2.StartJobRequest(idempotency_key="trainer-killed", boundary=trainer_pb2.BoundaryJobSpec(
            attribute=corpus.attribute("pose", "yaw"), num_samples=corpus.LONG_JOB_SAMPLES, keep_fraction=0.1,
            options=trainer_pb2.TrainingOptions(artifact_name="trainer-killed"))), timeout=60)
        watch = stub.WatchJob(trainer_pb2.WatchJobRequest(id=running.id), timeout=300)
        for event in watch:
            if event.job.state == trainer_pb2.JOB_STATE_RUNNING and event.job.progress > 0:
                break
        z = corpus.z(60, seed=3)
        queued = stub.StartJob(trainer_pb2.StartJobRequest(idempotency_key="queued", custom_boundary=trainer_pb2.CustomBoundaryJobSpec(
            latents=types_pb2.Latents(space=1, values=corpus.tensor(z)), labels=corpus.tensor((z[:, 2] > 0).astype(np.int64)),
            options=trainer_pb2.TrainingOptions(artifact_name="queued-before-kill"))), timeout=60)
        suite.kill("trainer")
        try:
            for _ in watch:
                pass
            watch_seen = "the watch ended cleanly"
        except grpc.RpcError as exc:
            watch_seen = f"{exc.code().name}: {(exc.details() or '')[:120]}"
        suite.start("trainer")
        stub = corpus.trainer_stub(suite)
        interrupted = stub.GetJob(trainer_pb2.GetJobRequest(id=running.id), timeout=30)
        queued_final = list(stub.WatchJob(trainer_pb2.WatchJobRequest(id=queued.id), timeout=300))[-1].job
        jobs_after = {j.id for j in stub.ListJobs(trainer_pb2.ListJobsRequest(page_size=500), timeout=30).jobs}
        rows.append(("trainer", "mid-job, a WatchJob open, one job queued", watch_seen,
                     f"{trainer_pb2.JobState.Name(interrupted.state)}: {interrupted.error[:160]}; the queued job after the restart: "
                     f"{trainer_pb2.JobState.Name(queued_final.state)} ({queued_final.artifact.ref.name} "
                     f"v{queued_final.artifact.ref.version})", corpus.valid_call(suite.channels, "trainer").code.name))
        lost = sorted((jobs_before | {running.id, queued.id}) - jobs_after)
        problems = repository_problems(Path(suite.repository))
        edit_after = corpus.valid_call(suite.channels, "editor", BOUNDARY).code.name
    finally:
        suite.stop()
    lines = ["### Faults (kill -9)", "",
             "Each service killed with SIGKILL in turn, then restarted on its port; an edit of 16 seeds x 200 frames "
             "with pose scores streams while the generator, scorer or editor is killed; a 500,000-sample boundary job "
             "runs while the generator or scorer is killed (its downstream calls carry the trainer's call timeout).", "",
             "| killed | when | the client saw | the job | valid call after the restart |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
    lines += ["", f"Job records lost across the kills: {len(lost)} {lost if lost else ''}. Repository after all kills: "
              f"{'whole (every visible version has its manifest and files)' if not problems else problems}. "
              f"An edit after the last restart: {edit_after}."]
    return "\n".join(lines)


# ---- soak -------------------------------------------------------------------------------------


def run_soak(work: Path, edits: int, clients: int) -> tuple[str, dict]:
    suite = start_suite(work / "soak")
    try:
        train_axis(suite)
        editor = editor_pb2_grpc.EditorServiceStub(suite.channel("editor"))
        errors: list[str] = []
        lock = threading.Lock()

        def one(index: int) -> None:
            try:
                frames = list(editor.Edit(edit_request(seed=index), timeout=300))
                if [f.index for f in frames] != [0, 1]:
                    raise RuntimeError(f"frames {[f.index for f in frames]}")
            except (grpc.RpcError, RuntimeError) as exc:
                text = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
                with lock:
                    errors.append(f"edit {index}: {text}"[:200])

        def run(start: int, stop: int) -> float:
            began = time.monotonic()
            with futures.ThreadPoolExecutor(clients) as pool:
                list(pool.map(one, range(start, stop)))
            return time.monotonic() - began

        warmup = max(50, edits // 10)
        run(0, warmup)
        start_rss = {n: suite.rss_bytes(n) for n in suite.NAMES}
        start_threads = {n: suite.threads(n) for n in suite.NAMES}
        seconds = run(warmup, warmup + edits)
        end_rss = {n: suite.rss_bytes(n) for n in suite.NAMES}
        end_threads = {n: suite.threads(n) for n in suite.NAMES}
    finally:
        suite.stop()
    growth = {n: (end_rss[n] - start_rss[n]) / start_rss[n] * 100 for n in suite.NAMES}
    lines = [f"### Soak: {edits} edits", "",
             f"{edits} edits (1 seed, 2 frames, raw images, pose scores) from {clients} concurrent clients after a warm-up of "
             f"{warmup}; {edits / seconds:.1f} edits/s; errors: **{len(errors)}** {errors[:3] if errors else ''}.", "",
             "| service | RSS after warm-up | RSS at the end | growth | threads after warm-up | threads at the end |",
             "|---|---|---|---:|---:|---:|"]
    for n in suite.NAMES:
        lines.append(f"| {n} | {mib(start_rss[n])} | {mib(end_rss[n])} | {growth[n]:+.1f}% | {start_threads[n]} | {end_threads[n]} |")
    verdict = all(g < 5 for g in growth.values()) and not errors
    lines += ["", f"Target (growth < 5% after warm-up, zero errors): **{'met' if verdict else 'NOT met'}**."]
    return "\n".join(lines), {"errors": len(errors), "growth": growth}


# ---- cancellation latency ---------------------------------------------------------------------


def run_cancellation(work: Path, repeats: int = 3) -> str:
    from editor_svc.server import build as build_editor
    from generator_svc.server import build as build_generator
    from latentedit.config import Config
    from latentedit.methods.interfacegan import Boundary, boundary_artifact
    from latentedit.repository import ModelRepository
    from latentedit.rpc.client import connect
    from latentedit.rpc.launch import build_service
    from latentedit.world import LocalWorld

    repo = ModelRepository(private_repo(work / "cancel"))
    config = Config(repository=str(repo.root))
    if hasattr(config, "security"):
        config.security.insecure = True  # plaintext, no tokens: these services live in this process only
    for options in config.services.values():
        options.port = 0
    generator_host, pool = build_generator(config)
    config.services["generator"].port = generator_host.port
    scorer_host = build_service("scorer", config)
    config.services["scorer"].port = scorer_host.port
    editor_host, _ = build_editor(config)
    hosts = {"generator": generator_host, "scorer": scorer_host, "editor": editor_host}
    normal = np.zeros(100, np.float32)
    normal[0] = 1
    boundary_artifact(BOUNDARY, Boundary(normal, 0.0), LocalWorld(repo).generator("dcgan-faces"), "z",
                      {"head": "", "output": "axis0"}).save(repo, {})

    def rows() -> int:
        return sum(b.stats.rows for b in pool.get("dcgan-faces")._batchers.values())

    lines = ["### Cancellation latency", "",
             "In-process generator, scorer and editor (the generator's batcher counts the rows it synthesizes). "
             "An edit of 64 seeds x 200 frames (64 rows per frame) with pose scores, cancelled by the client after "
             "its 3rd frame; rows synthesized after the cancel (in frames), and the time until the editor's and the "
             "generator's handlers are idle.", "",
             "| run | frames received | rows after the cancel | = frames | editor + generator idle after |", "|---:|---:|---:|---:|---|"]
    try:
        editor = editor_pb2_grpc.EditorServiceStub(connect(f"localhost:{editor_host.port}"))
        request = edit_request(count=64, frames=200, images=False, heads=("pose",))
        worst = 0
        for run in range(repeats):
            call = editor.Edit(request, timeout=300)
            received = 0
            for _ in call:
                received += 1
                if received == 3:
                    break
            at_cancel = rows()
            cancelled = time.monotonic()
            call.cancel()
            for name in ("editor", "generator"):
                hosts[name].calls.wait_idle(60)
            idle = time.monotonic() - cancelled
            after = rows() - at_cancel
            lines.append(f"| {run + 1} | {received} | {after} | {after / 64:.1f} | {idle * 1000:.0f} ms |")
            worst = max(worst, after)
        lines += ["", "Target: downstream work stops within one step (at most one frame's 64 rows after the cancel): "
                  f"**{'met' if worst <= 64 else 'NOT met'}** (most rows after a cancel: {worst})."]
    finally:
        for host in hosts.values():
            host.stop(0)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--soak", type=int, default=2000, help="edits in the soak (10000 for the long one)")
    parser.add_argument("--soak-clients", type=int, default=4)
    parser.add_argument("--overload-callers", type=int, default=24)
    parser.add_argument("--findings", type=Path, default=Path("/tmp/corpus_findings.md"))
    parser.add_argument("--baseline", default="", help="also run the corpus against the services of this commit (before the fixes)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: corpus,overload,faults,soak,cancel")
    parser.add_argument("--no-record", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    # Plaintext without tokens for the in-process services too (the processes get `insecure: true`).
    os.environ.setdefault("LATENTEDIT_INSECURE", "1")
    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="reliability-"))
    parts, began = [], time.monotonic()
    timings = {}
    for name, fn in (("corpus", lambda: run_corpus(work, args.findings, args.baseline)),
                     ("overload", lambda: run_overload(work, args.overload_callers)),
                     ("faults", lambda: run_faults(work)),
                     ("soak", lambda: run_soak(work, args.soak, args.soak_clients)[0]),
                     ("cancel", lambda: run_cancellation(work))):
        if name in skip:
            continue
        t = time.monotonic()
        text = fn()
        timings[name] = time.monotonic() - t
        print(text, "\n", flush=True)
        parts.append(text)
    shutil.rmtree(work, ignore_errors=True)
    settings = (f"Settings: soak {args.soak} edits from {args.soak_clients} clients, {args.overload_callers} overload callers"
                f"{', skipped: ' + ', '.join(sorted(skip)) if skip else ''}. Parts took "
                + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
                + f" (total {(time.monotonic() - began) / 60:.1f} min). The services ran as separate `latentedit serve NAME` "
                "processes on a private hard-linked copy of the model repository.")
    command = "python bench/reliability.py" + "".join(f" {a}" for a in sys.argv[1:])
    if not args.no_record:
        record("Reliability", command, settings + "\n\n" + "\n\n".join(parts))


if __name__ == "__main__":
    main()

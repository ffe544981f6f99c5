"""InterFaceGAN on the default world, through the public API of the four services.

    .venv/bin/python bench/interfacegan.py [--samples 5000] [--keep 0.1]

Prints and records in bench/RESULTS.md:
- the paper's Table 1: validation and all-sample accuracy of each attribute's boundary at N;
- Tables 2-3: cosine of the boundary normals vs correlation of the attribute scores;
- monotonicity of yaw edits (share of seeds whose scored yaw has Spearman > 0.9 over 8 frames);
- conditional editing: yaw change of smile edits with and without yaw as the condition;
- artifact correction: garbled samples (face probability < 0.5) moved along the quality boundary;
- edit latency: first frame and a whole 16-frame edit through the services vs the same loop in-process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import record, served  # noqa: E402
from latentedit import wire  # noqa: E402
from latentedit.api.v1 import editor_pb2, editor_pb2_grpc, trainer_pb2, trainer_pb2_grpc, types_pb2  # noqa: E402
from latentedit.config import load_config  # noqa: E402
from latentedit.repository import ModelRepository  # noqa: E402
from latentedit.rpc.client import connect  # noqa: E402

ATTRIBUTES = {
    "yaw": ("pose", "yaw", ""),
    "pitch": ("pose", "pitch", ""),
    "mouth-open": ("pose", "mouth_openness", ""),
    "smile": ("expression", "probabilities", "happy"),
    "neutral": ("expression", "probabilities", "neutral"),
    "male": ("age_gender", "male_probability", ""),
    "age": ("age_gender", "age", ""),
    "quality": ("quality", "face_probability", ""),
}


def edit(editor, boundary, seed, count, start, end, frames, heads, conditions=(), from_boundary=False, images=False):
    request = editor_pb2.EditRequest(
        seed=editor_pb2.SeedStart(seed=seed, count=count), num_frames=frames, score_heads=list(heads), omit_images=not images,
        interfacegan=editor_pb2.InterFaceGANEdit(boundary=boundary, condition_boundaries=list(conditions),
                                                 start_distance=start, end_distance=end, from_boundary=from_boundary))
    return list(editor.Edit(request, timeout=600))


def score_of(frame, head, output, index=None):
    for h in frame.scores:
        if h.head == head:
            for o in h.outputs:
                if o.name == output:
                    value = wire.from_tensor(o.tensor, field=output)
                    return value if index is None else value[:, index]
    raise KeyError(f"{head}.{output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--keep", type=float, default=0.1)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    base = load_config(ROOT / "config" / "local.yaml")
    sections = []
    with served(["generator", "scorer", "trainer", "editor"], base.repository) as addresses:
        trainer = trainer_pb2_grpc.TrainerServiceStub(connect(addresses["trainer"]))
        editor = editor_pb2_grpc.EditorServiceStub(connect(addresses["editor"]))
        stamp = str(int(time.time()))

        # Table 1 --------------------------------------------------------------------------------
        rows, names = [], {}
        for label, (head, output, cls) in ATTRIBUTES.items():
            name = f"bench-{label}"
            request = trainer_pb2.StartJobRequest(idempotency_key=f"{name}-{stamp}", boundary=trainer_pb2.BoundaryJobSpec(
                attribute=types_pb2.AttributeRef(head=head, output=output, label=cls), num_samples=args.samples,
                keep_fraction=args.keep, options=trainer_pb2.TrainingOptions(artifact_name=name, seed=1)))
            started = time.perf_counter()
            job = trainer.StartJob(request, timeout=120)
            final = list(trainer.WatchJob(trainer_pb2.WatchJobRequest(id=job.id), timeout=3600))[-1].job
            if final.state != trainer_pb2.JOB_STATE_SUCCEEDED:
                raise SystemExit(f"{name}: {final.error}")
            names[label] = final.artifact.ref.name
            m = final.metrics
            rows.append((label, f"{head}.{output}{'.' + cls if cls else ''}", m["validation_accuracy"], m["all_samples_accuracy"],
                         time.perf_counter() - started))
            print(f"{label:10s} validation {m['validation_accuracy']:.3f}  all samples {m['all_samples_accuracy']:.3f}  "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
        table = [f"N = {args.samples} samples per attribute, top and bottom {args.keep:.0%} kept, 70/30 split, linear SVM "
                 "(paper: >95% validation, 75-90% all samples; all-sample labels = score above the median).", "",
                 "| attribute | scorer output | validation accuracy | all-sample accuracy | job time (s) |", "|---|---|---|---|---|"]
        table += [f"| {a} | {o} | {v:.3f} | {s:.3f} | {t:.0f} |" for a, o, v, s, t in rows]
        sections.append("### Table 1: boundary accuracy\n\n" + "\n".join(table))

        # Tables 2-3 -----------------------------------------------------------------------------
        labels = list(names)
        request = trainer_pb2.StartJobRequest(idempotency_key=f"bench-corr-{stamp}", correlation=trainer_pb2.CorrelationJobSpec(
            boundaries=[names[label] for label in labels], num_samples=2000,
            options=trainer_pb2.TrainingOptions(artifact_name="bench-correlation")))
        final = list(trainer.WatchJob(trainer_pb2.WatchJobRequest(id=trainer.StartJob(request, timeout=120).id), timeout=3600))[-1].job
        report = json.loads(ModelRepository(base.repository).resolve(final.artifact.ref.name, final.artifact.ref.version).file("report").read_text())
        header = "| | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels)
        cos = "\n".join(f"| {a} | " + " | ".join(f"{v:+.2f}" for v in row) + " |" for a, row in zip(labels, report["cosine"]))
        cor = "\n".join(f"| {a} | " + " | ".join(f"{v:+.2f}" for v in row) + " |" for a, row in zip(labels, report["correlation"]))
        sections.append(
            "### Tables 2-3: cosine of boundary normals (left) vs correlation of attribute scores (right), 2000 fresh samples\n\n"
            f"{header}\n{cos}\n\n{header}\n{cor}\n\n"
            f"Agreement of the off-diagonal entries (Pearson r): {final.metrics['cosine_correlation_agreement']:.2f}; "
            f"mean |cosine - correlation|: {final.metrics['mean_abs_difference']:.2f}.")

        # Monotonicity of yaw edits --------------------------------------------------------------
        from scipy.stats import spearmanr

        lines = ["| walk | seed sets (20 seeds each) | share of seeds with Spearman > 0.9, per set | mean | worst |", "|---|---|---|---|---|"]
        for start, end, from_boundary, text in ((-3, 3, False, "z + d n, d in [-3, 3]"), (-2, 2, True, "foot point + d n, d in [-2, 2]")):
            shares = []
            for seed in range(11, 19):
                frames = edit(editor, names["yaw"], seed, 20, start, end, 8, ["pose"], from_boundary=from_boundary)
                yaw = np.stack([score_of(f, "pose", "yaw") for f in frames])
                rho = np.array([spearmanr(np.arange(8), yaw[:, s]).statistic for s in range(20)])
                shares.append(float((rho > 0.9).mean()))
            lines.append(f"| {text} | 8 | {', '.join(f'{s:.2f}' for s in shares)} | {np.mean(shares):.3f} | {min(shares):.2f} |")
            print(lines[-1], flush=True)
        sections.append("### Monotonicity of yaw edits (8 frames)\n\n" + "\n".join(lines))

        # Conditional editing ---------------------------------------------------------------------
        plain = edit(editor, names["smile"], 21, 100, 0, 3, 2, ["pose", "expression"])
        conditioned = edit(editor, names["smile"], 21, 100, 0, 3, 2, ["pose", "expression"], conditions=[names["yaw"]])
        cond_lines = ["| smile edit, d = 0 -> 3, 100 seeds | mean |yaw change| (deg) | mean yaw change (deg) | mean P(happy) change |",
                      "|---|---|---|---|"]
        for text, frames in (("plain", plain), ("yaw as condition", conditioned)):
            dyaw = score_of(frames[-1], "pose", "yaw") - score_of(frames[0], "pose", "yaw")
            dhappy = score_of(frames[-1], "expression", "probabilities", 3) - score_of(frames[0], "expression", "probabilities", 3)
            cond_lines.append(f"| {text} | {np.abs(dyaw).mean():.2f} | {dyaw.mean():+.2f} | {dhappy.mean():+.3f} |")
        cosine = report["cosine"][labels.index("smile")][labels.index("yaw")]
        sections.append("### Conditional editing: smile with yaw as the condition\n\n" + "\n".join(cond_lines) +
                        f"\n\ncos(smile, yaw) = {cosine:+.2f}.")
        print("\n".join(cond_lines), flush=True)

        # Artifact correction ---------------------------------------------------------------------
        frames = edit(editor, names["quality"], 31, 256, 0, 3, 4, ["quality"])
        quality = np.stack([score_of(f, "quality", "face_probability") for f in frames])
        garbled = quality[0] < 0.5
        fix_lines = ["| distance along the quality boundary | garbled samples whose face probability rose | now > 0.9 |", "|---|---|---|"]
        for i, d in enumerate(np.linspace(0, 3, 4)[1:], start=1):
            fix_lines.append(f"| {d:.0f} | {(quality[i][garbled] > quality[0][garbled]).mean():.2f} | {(quality[i][garbled] > 0.9).mean():.2f} |")
        sections.append(f"### Artifact correction: {int(garbled.sum())} of 256 samples garbled (face probability < 0.5)\n\n" + "\n".join(fix_lines))
        print("\n".join(fix_lines), flush=True)

        # Latency ----------------------------------------------------------------------------------
        sections.append("### Edit latency: 16 frames of 4 seeds, scored with pose\n\n" + latency(editor, names["yaw"], base))
    if not args.no_record:
        record("InterFaceGAN", " ".join(["python bench/interfacegan.py", *sys.argv[1:]]), "\n\n".join(sections))
        print("recorded in bench/RESULTS.md")


def latency(editor, boundary_name: str, base) -> str:
    """First frame and total time through the editor vs the same loop in this process."""
    import torch

    from latentedit.methods.base import FrameRequest
    from latentedit.methods.interfacegan import InterFaceGAN
    from latentedit.world import LocalWorld

    # In-process: the same method's edit on a LocalWorld (torch generator and scorer in this process), as the
    # naive per-frame loop (chunk_rows 0), with the torch threads the services get (config generator.threads,
    # 0: torch's default, as in the served processes). bench/editor_latency.py measures the pipelined editor too.
    if base.generator.threads:
        torch.set_num_threads(base.generator.threads)
    world = LocalWorld(ModelRepository(base.repository), base.generator.default_model)
    method = InterFaceGAN()
    generator = world.generator()
    options = method.edit_options(editor_pb2.InterFaceGANEdit(boundary=boundary_name, start_distance=-3, end_distance=3), 16, base.editor)
    artifact = method.prepare(world.repo, generator, options)

    def in_process() -> tuple[float, float]:
        start = time.perf_counter()
        first = None
        for frame in method.edit(world, generator, artifact, world.sample(generator, 4, 5, artifact.space), options,
                                 FrameRequest(("pose",), chunk_rows=0)):
            wire.encode_images(frame.images, types_pb2.IMAGE_ENCODING_RAW_UINT8)
            first = first or time.perf_counter() - start
        return first, time.perf_counter() - start

    def through_services() -> tuple[float, float]:
        start = time.perf_counter()
        request = editor_pb2.EditRequest(seed=editor_pb2.SeedStart(seed=5, count=4), num_frames=16, score_heads=["pose"],
                                         interfacegan=editor_pb2.InterFaceGANEdit(boundary=boundary_name, start_distance=-3, end_distance=3))
        first = None
        for _ in editor.Edit(request, timeout=600):
            first = first or time.perf_counter() - start
        return first, time.perf_counter() - start

    sides = {"in-process": in_process, "through the services": through_services}
    for run in sides.values():  # both sides warmed (first calls load and trace models) before timing
        run()
        run()
    repetitions = 7
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for repetition in range(repetitions):
        # Interleaved, alternating which side goes first (A B, B A, ...), so drift hits both alike.
        order = list(sides) if repetition % 2 == 0 else list(reversed(sides))
        for name in order:
            runs[name].append(sides[name]())
    table = {k: np.array(v) * 1000 for k, v in runs.items()}
    rows = ["| path | first frame, ms: median (min-max) | 16 frames, ms: median (min-max) |", "|---|---|---|"]
    for name, ms in table.items():
        rows.append(f"| {name} | {np.median(ms[:, 0]):.0f} ({ms[:, 0].min():.0f}-{ms[:, 0].max():.0f}) "
                    f"| {np.median(ms[:, 1]):.0f} ({ms[:, 1].min():.0f}-{ms[:, 1].max():.0f}) |")
    # Ratios of the paired runs of one repetition, then their median and spread.
    total = table["through the services"][:, 1] / table["in-process"][:, 1]
    first = table["through the services"][:, 0] / table["in-process"][:, 0]
    rows.append(f"\n{repetitions} interleaved repetitions after 2 warm-up runs per side. Services / in-process, per "
                f"repetition: total time {np.median(total):.2f}x ({total.min():.2f}-{total.max():.2f}), first frame "
                f"{np.median(first):.2f}x ({first.min():.2f}-{first.max():.2f}); the services run as four processes on "
                "the same cores as this client.")
    print("\n".join(rows), flush=True)
    return "\n".join(rows)


if __name__ == "__main__":
    main()

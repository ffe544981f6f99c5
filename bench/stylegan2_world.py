"""The StyleGAN2 default world (issue 9): how good the distilled generator is, and whether its W
space is more disentangled than the DCGAN teacher's Z for yaw, measured through the trainer.

    .venv/bin/python bench/stylegan2_world.py [--samples 2000] [--keep 0.2] [--seeds 0 1 2]

Quality: the figures scripts/distill_stylegan2.py recorded for the shipped weights
(defaults/stylegan2-faces/record.json, held-out z): the quality head's acceptance at the
product's face-probability threshold (0.8) and at the teacher's 5th percentile, and the Frechet
distance on MTCNN O-Net features to the teacher's samples beside the teacher's own split-half
distance (the noise floor for that sample size).

Boundaries: one `latentedit serve generator scorer trainer` process; for each seed, a yaw
(pose.yaw) boundary job on every (generator, space) row with the same samples, keep fraction
and SVM settings, rows interleaved per seed. Reported: validation accuracy on the held-out part
of the kept extremes (the paper's figure) and accuracy on all samples against the median split,
as median (min-max) over the seeds. The samples differ per generator (each draws its own
latents), so this compares the spaces as a user would train them, not on identical images.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import record, served  # noqa: E402
from latentedit import wire  # noqa: E402
from latentedit.api.v1 import trainer_pb2, trainer_pb2_grpc, types_pb2  # noqa: E402
from latentedit.config import load_config  # noqa: E402
from latentedit.rpc.client import connect  # noqa: E402

ROWS = [("dcgan-faces", "z"), ("stylegan2-faces", "z"), ("stylegan2-faces", "w"), ("stylegan2-faces", "w+")]


def train(trainer, generator: str, space: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    name = f"bench-yaw-{generator}-{space.replace('+', 'plus')}-{seed}"
    request = trainer_pb2.StartJobRequest(boundary=trainer_pb2.BoundaryJobSpec(
        generator=types_pb2.ModelRef(name=generator), space=wire.space_code(space),
        attribute=types_pb2.AttributeRef(head="pose", output="yaw"), num_samples=args.samples, keep_fraction=args.keep,
        options=trainer_pb2.TrainingOptions(seed=seed, artifact_name=name)))
    job = trainer.StartJob(request, timeout=60)
    final = list(trainer.WatchJob(trainer_pb2.WatchJobRequest(id=job.id), timeout=3600))[-1].job
    if final.state != trainer_pb2.JOB_STATE_SUCCEEDED:
        raise SystemExit(f"{name}: {final.error}")
    return dict(final.metrics)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--keep", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    os.chdir(ROOT)
    shipped = json.loads((ROOT / "defaults" / "stylegan2-faces" / "record.json").read_text())
    figures = shipped["figures"]
    repository = load_config(ROOT / "config" / "local.yaml").repository
    results: dict[tuple[str, str], list[dict[str, float]]] = {row: [] for row in ROWS}
    with served(["generator", "scorer", "trainer"], repository, {"trainer": {"workers": 1}}) as addresses:
        trainer = trainer_pb2_grpc.TrainerServiceStub(connect(addresses["trainer"]))
        for seed in args.seeds:
            for generator, space in ROWS:
                metrics = train(trainer, generator, space, seed, args)
                results[(generator, space)].append(metrics)
                print(f"seed {seed} {generator:16s} {space:3s}: validation {metrics['validation_accuracy']:.3f}, "
                      f"all samples {metrics['all_samples_accuracy']:.3f}", flush=True)
    recipe = shipped["recipe"]
    lines = [
        f"Distilled generator: {shipped['parameters'] / 1e6:.2f} M parameters, {shipped['steps']} steps in "
        f"{shipped['train_seconds'] / 60:.0f} min on {shipped['device']} (batch {recipe['batch']}, lr {recipe['lr']}, "
        f"feature weight {recipe['feature_weight']}, adversarial weight {recipe['adv_weight']}); "
        f"{figures['eval_samples']} held-out z.",
        "",
        "| figure | student (stylegan2-faces) | teacher (dcgan-faces) |",
        "|---|---|---|",
        f"| quality head accepts (face probability >= 0.8) | {figures['accepted_student_p08']:.1%} | {figures['accepted_teacher_p08']:.1%} |",
        f"| accepts at the teacher's 5th percentile ({figures['quality_threshold_teacher_p5']:.3f}) | "
        f"{figures['accepted_student']:.1%} | {figures['accepted_teacher']:.1%} |",
        f"| Frechet distance, O-Net features, to the teacher's samples | {figures['frechet_onet_student_vs_teacher']:.3f} | "
        f"{figures['frechet_onet_teacher_split_half']:.3f} (split half) |",
        f"| pixel L1 to the teacher's image for the same z | {figures['pixel_l1']:.3f} | 0 |",
        "",
        f"Yaw boundaries through the trainer: {args.samples} samples, keep fraction {args.keep}, seeds "
        f"{', '.join(map(str, args.seeds))}; median (min-max) over seeds.",
        "",
        "| generator | space | validation accuracy | all-samples accuracy |",
        "|---|---|---|---|",
    ]
    for (generator, space), runs in results.items():
        lines.append(f"| {generator} | {space.upper()} | {spread([r['validation_accuracy'] for r in runs])} | "
                     f"{spread([r['all_samples_accuracy'] for r in runs])} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        record("StyleGAN2 default world (issue 9)", " ".join(["python bench/stylegan2_world.py", *sys.argv[1:]]), table)
        print("recorded in bench/RESULTS.md")


if __name__ == "__main__":
    main()

"""W*'s Table 1 and Fig. 5 on the default world (Hajjar et al., section 4 and the supplement).

    .venv/bin/python bench/wstar.py [--samples 2000] [--steps 1500] [--eval-samples 2000] [--identity-every 0]

Trains W* flows in-process through the same `WStar.train` the trainer runs (L_a + L_d; and with
L_ID when --identity-every > 0), then measures `latentedit.wstar_eval.table1` on fresh samples in
the original space and in each proxy space, writes the Fig. 5 scatter (bench/wstar_fig5.png) and
records the tables in bench/RESULTS.md next to the paper's figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import record  # noqa: E402
from latentedit.attributes import Attribute  # noqa: E402
from latentedit.methods.base import JobBasics, QuietProgress  # noqa: E402
from latentedit.methods.wstar import FlowOptions, FlowSpec, WStar  # noqa: E402
from latentedit.perceptual import PerceptualDistance  # noqa: E402
from latentedit.repository import ModelRepository  # noqa: E402
from latentedit.world import LocalWorld  # noqa: E402
from latentedit.wstar_eval import scatter_png, table1  # noqa: E402

ATTRIBUTES = (Attribute("pose", "yaw", None), Attribute("pose", "pitch", None), Attribute("pose", "mouth_openness", None),
              Attribute("expression", "probabilities", 3, "happy"), Attribute("expression", "probabilities", 6, "neutral"))
PAPER = {"original": {"min_accuracy": 0.635, "max_accuracy": 0.979, "avg_accuracy": 0.834, "D": 0.59, "C": 0.43, "I": 0.30,
                      "gap_mean": -1.185, "gap_std": 0.970, "2afc": 0.58},
         "proxy": {"min_accuracy": 0.822, "max_accuracy": 0.989, "avg_accuracy": 0.913, "D": 0.75, "C": 0.52, "I": 0.27,
                   "gap_mean": 0.035, "gap_std": 0.384, "2afc": 0.83}}
COLUMNS = ("min_accuracy", "max_accuracy", "avg_accuracy", "D", "C", "I", "gap_mean", "gap_std", "2afc",
           "latent_perceptual_correlation")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(ROOT / "model-repo"))
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--couplings", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=2000)
    parser.add_argument("--identity-seeds", type=int, default=100)
    parser.add_argument("--identity-every", type=int, default=0,
                        help="also train a flow with L_ID (lambda_ID 1, 4 rows) on every k-th of its steps (0: not)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repo = ModelRepository(args.repo)
    world = LocalWorld(repo)
    generator = world.generator()
    perceptual = PerceptualDistance.from_repository(repo)
    from latentedit.models.face_descriptor import load_face_descriptor

    descriptor = load_face_descriptor(repo)
    method = WStar()
    runs = {"L_a + L_d": FlowOptions(couplings=args.couplings, hidden=args.hidden, steps=args.steps)}
    if args.identity_every:
        runs["L_a + L_d + L_ID"] = FlowOptions(couplings=args.couplings, hidden=args.hidden, steps=args.steps,
                                              identity_weight=1.0, identity_batch=4, identity_every=args.identity_every)
    results, started = {}, time.time()
    for label, options in runs.items():
        spec = FlowSpec(JobBasics(generator, "bench-wstar", 0, 64), "z", ATTRIBUTES, args.samples, options, repo)
        t0 = time.time()
        trained = method.train(world, spec, QuietProgress(lambda phase: print(f"  [{label}] {phase}", flush=True)))
        train_s = time.time() - t0
        print(f"{label}: trained in {train_s:.0f} s", flush=True)
        table = table1(world, generator, trained.value, perceptual, descriptor, args.eval_samples,
                       identity_seeds=args.identity_seeds, log=lambda m: print("  " + m, flush=True))
        results[label] = {"train_s": train_s, "metrics": trained.metrics, "table": table}
    first = next(iter(results.values()))["table"]
    scatter_png(ROOT / "bench" / "wstar_fig5.png", first.scatter)
    body = report(args, results)
    print(body)
    (ROOT / "out").mkdir(exist_ok=True)
    (ROOT / "out" / "wstar_bench.json").write_text(json.dumps(
        {k: {"rows": v["table"].rows, "per_attribute": v["table"].per_attribute, "identity": v["table"].identity,
             "identity_summary": v["table"].identity_summary, "train_s": v["train_s"], "metrics": v["metrics"]}
         for k, v in results.items()}, indent=2))
    if not args.no_record:
        command = "python bench/wstar.py " + " ".join(sys.argv[1:])
        record("W* Table 1 on the default world", command, body)
    print(f"total {time.time() - started:.0f} s")
    return 0


def report(args, results) -> str:
    lines = [f"DCGAN Z (100-d); attributes: {', '.join(a.name for a in ATTRIBUTES)} (binary: above the training median). "
             f"Flows: {args.couplings} couplings x {args.hidden} hidden, {args.samples} training samples, "
             f"{args.steps} Adam steps, lambda_d 10; evaluated on {args.eval_samples} fresh samples (seed 12345): fresh "
             "LinearSVC 80/20 per attribute, DCI with Lasso alpha 0.02 (80/20), 600 random pairs for the gap "
             "(latent MSE - s * D_perceptual, s stored with the flow), 600 random triplets for 2AFC (judge: D_perceptual). "
             "Fig. 5: bench/wstar_fig5.png.", "",
             "| space | min acc | max acc | avg acc | D | C | I (RMSE) | gap mean | gap std | 2AFC | corr(latent, perceptual) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for space, row in PAPER.items():
        name = "W+ (paper)" if space == "original" else "W* (paper)"
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" if c in row else "-" for c in COLUMNS) + " |")
    for label, result in results.items():
        table = result["table"]
        for space, row in table.rows.items():
            name = "Z (ours)" if space == "original" else f"W* {label} (ours)"
            if space == "original" and label != next(iter(results)):
                continue
            lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in COLUMNS) + " |")
    lines.append("")
    for label, result in results.items():
        table = result["table"]
        lines.append(f"Per-attribute held-out accuracy ({label}): " + "; ".join(
            f"{a} {o:.3f} -> {p:.3f}" for a, o, p in zip(table.attributes, table.per_attribute["original"],
                                                          table.per_attribute["proxy"])) + f". Training took {result['train_s']:.0f} s.")
        if table.identity:
            curve = "; ".join(f"strength {w['strength']:g}: W* change {w['change']:+.2f} drift {w['drift']:.3f}, "
                              f"InterFaceGAN change {i['change']:+.2f} drift {i['drift']:.3f}"
                              for w, i in zip(table.identity["wstar"], table.identity["interfacegan"]))
            lines.append(f"Identity (torch dlib descriptor distance, {args.identity_seeds} seeds, edit {table.attributes[0]}; "
                         f"{label}): {curve}. W* drift / InterFaceGAN drift at equal mean change: "
                         f"{table.identity_summary.get('mean_ratio', float('nan')):.2f}.")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

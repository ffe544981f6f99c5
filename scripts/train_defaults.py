"""Train the shipped default artifacts for the default generator (dcgan-faces) into defaults/.

    .venv/bin/python scripts/train_defaults.py [--samples 1200] [--compare] [--cache /tmp/pairs.npz]

What it trains, all in-process on a LocalWorld and the method modules (no services):
- InterFaceGAN boundaries default-yaw (pose.yaw), default-smile (expression.happy),
  default-mouth-open (pose.mouth_openness), default-male (age_gender.male_probability);
- SGF mappings default-sgf-attributes (the same four attributes), default-sgf-keypoints
  (keypoints5) and default-sgf-caption (caption embedding);
- DP-LaSE directions default-dplase (block3).
One set of `--samples` latents (seed 0, batches of 256 as a trainer job draws them) is drawn and
scored once with every head these need; the boundaries and the three mappings are fitted on it.

Output: defaults/ is a model repository (defaults/<name>/1/manifest.json + files), rewritten on
every run, plus defaults/recipe.json: the recipe, each artifact's metrics, and check figures
on a fixed check set (CHECK_SEED, CHECK_COUNT samples) that tests/test_shipped_defaults.py
reproduces. `latentedit models install` (latentedit/install.py) installs them next to the
generator. `--compare` also trains format-1 F (F = R(z, c), before issue 13) on the same pairs
and records both in bench/RESULTS.md ("SGF shipped mappings: before / after").
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from latentedit.attributes import Attribute  # noqa: E402
from latentedit.conditions import ConditionSpec  # noqa: E402
from latentedit.install import DEFAULT_GENERATOR  # noqa: E402
from latentedit.methods import interfacegan as ifg  # noqa: E402
from latentedit.methods.base import JobBasics, QuietProgress, batch_seed  # noqa: E402
from latentedit.methods.dplase import DirectionSpec, DiscoveryOptions, DPLaSE  # noqa: E402
from latentedit.methods.sgf import (  # noqa: E402
    AuxiliaryMapping,
    MappingSpec,
    fit_mapping,
    mapping_artifact,
    surrogate_step,
    train_mapping,
)
from latentedit.repository import ModelRepository  # noqa: E402
from latentedit.world import GeneratorInfo, LocalWorld  # noqa: E402

BOUNDARIES = {
    "default-yaw": Attribute("pose", "yaw", None),
    "default-smile": Attribute("expression", "probabilities", 3, "happy"),
    "default-mouth-open": Attribute("pose", "mouth_openness", None),
    "default-male": Attribute("age_gender", "male_probability", None),
}
SGF_ATTRIBUTES = list(BOUNDARIES.values())
MAPPINGS = {
    "default-sgf-attributes": ConditionSpec("attributes", SGF_ATTRIBUTES),
    "default-sgf-keypoints": ConditionSpec("keypoints", keypoints_head="keypoints5"),
    "default-sgf-caption": ConditionSpec("caption"),
}
DIRECTIONS = "default-dplase"
STYLEGAN2 = "stylegan2-faces"  # the distilled W-space default (scripts/distill_stylegan2.py)
STYLEGAN2_BOUNDARIES = {"stylegan2-yaw": (Attribute("pose", "yaw", None), "w")}
HEADS = ["age_gender", "caption", "expression", "keypoints5", "pose"]
CHECK_SEED, CHECK_COUNT = 777_000, 64
BATCH = 256
RECIPE = {
    "samples_seed": 0,
    # keep 0.3, C 0.1: on these 1200 samples, fitted on one half, accuracy on the other half above the
    # median 0.79 / 0.68 / 0.57 / 0.64 (yaw, smile, mouth-open, male) vs 0.75 / 0.65 / 0.53 / 0.60 with keep 0.1, C 1.
    "boundary": {"keep_fraction": 0.3, "validation_fraction": 0.3, "svm_c": 0.1, "threshold": "median"},
    "mapping": {"depth": 6, "hidden": 128, "steps": 400, "learning_rate": 2e-3, "train_batch": 128, "skip": 0.5,
                "held_out": "first 10% of the pairs"},
    "dplase": {"layer": "block3", "num_directions": 10, "steps": 150, "batch_size": 8, "learning_rate": 3e-3,
               "max_stride": 10.0, "num_channel_subspaces": 0, "naming_samples": 2},
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def draw_and_score(world: LocalWorld, generator: GeneratorInfo, count: int, seed: int, batch: int = BATCH,
                   space: str = "z", heads: list[str] = HEADS) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]]]:
    """`count` latents of `space` (batch i drawn with batch_seed(seed, i), as trainer jobs do) and the heads' outputs."""
    latents, outputs = [], []
    for index, start in enumerate(range(0, count, batch)):
        z = world.sample(generator, min(batch, count - start), batch_seed(seed, index), space)
        latents.append(z.flat())
        outputs.append(world.score(world.synthesize(generator, z), heads))
        log(f"  scored {start + len(latents[-1])}/{count}")
    merged = {head: {name: np.concatenate([o[head][name] for o in outputs]) for name in outputs[0][head]} for head in heads}
    return np.concatenate(latents).astype(np.float32), merged


def ship_boundary(name: str, attribute: Attribute, space: str, samples, check, generator: GeneratorInfo,
                  shipped: ModelRepository, provenance: dict) -> dict:
    """Fit `name` on the scored samples with RECIPE's settings, write it into `shipped`, and return
    its record: metrics and the accuracy on the check set (which tests reproduce)."""
    rb = RECIPE["boundary"]
    latents, outputs = samples
    scores = attribute.extract(outputs)
    fit = ifg.boundary_from_scores(latents, scores, rb["keep_fraction"], rb["validation_fraction"], rb["svm_c"], seed=0)
    finite = np.isfinite(scores)
    threshold = float(np.median(scores[finite]))
    all_accuracy = ifg.accuracy(fit.boundary, latents[finite], scores[finite] > threshold)
    check_scores = attribute.extract(check[1])
    ok = np.isfinite(check_scores)
    check_accuracy = ifg.accuracy(fit.boundary, check[0][ok], check_scores[ok] > threshold)
    metrics = {"validation_accuracy": fit.validation_accuracy, "train_accuracy": fit.train_accuracy,
               "all_samples_accuracy": all_accuracy, "num_samples": float(len(latents))}
    ifg.boundary_artifact(name, fit.boundary, generator, space, attribute.to_dict(), metrics).save(
        shipped, {**provenance, "threshold": threshold})
    log(f"{name}: validation accuracy {fit.validation_accuracy:.3f}, all samples {all_accuracy:.3f}, check {check_accuracy:.3f}")
    return {"kind": "boundary", "attribute": attribute.name, "space": space, "generator": generator.name, "metrics": metrics,
            "check": {"accuracy": check_accuracy, "threshold": threshold}}


def shipped_provenance(repo: ModelRepository, generator: GeneratorInfo) -> dict:
    entry = repo.resolve(generator.name, generator.version)
    return {"provenance": {"shipped_default": True, "recipe": "scripts/train_defaults.py", "git_commit": git_commit(),
                           "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "generator_weights_sha256": entry.manifest["sha256"]["weights"]}}


def train_stylegan2_defaults(args: argparse.Namespace) -> None:
    """--stylegan2: the distilled StyleGAN2's own shipped artifacts (a W-space yaw boundary, which
    per-layer edits broadcast over a W+ row range), recorded in defaults/stylegan2-recipe.json."""
    repo = ModelRepository(args.repo)
    world = LocalWorld(repo, STYLEGAN2)
    generator = world.generator(STYLEGAN2)
    out = Path(args.out)
    shipped, provenance = ModelRepository(out), shipped_provenance(repo, generator)
    record: dict = {"recipe": {**RECIPE, "samples": args.samples, "check_seed": CHECK_SEED, "check_count": CHECK_COUNT,
                               "generator": STYLEGAN2}, "artifacts": {}}
    for name, (attribute, space) in STYLEGAN2_BOUNDARIES.items():
        log(f"{name}: drawing and scoring {args.samples} {space} samples of {STYLEGAN2} with {attribute.head}")
        samples = draw_and_score(world, generator, args.samples, RECIPE["samples_seed"], space=space, heads=[attribute.head])
        check = draw_and_score(world, generator, CHECK_COUNT, CHECK_SEED, space=space, heads=[attribute.head])
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        record["artifacts"][name] = ship_boundary(name, attribute, space, samples, check, generator, shipped, provenance)
    (out / "stylegan2-recipe.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    log(f"wrote {', '.join(STYLEGAN2_BOUNDARIES)} and {out / 'stylegan2-recipe.json'}")


def flatten(outputs: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Numeric outputs only (the caption head's sentences are strings, not needed here)."""
    return {f"{h}/{n}": v for h, d in outputs.items() for n, v in d.items() if np.asarray(v).dtype.kind in "fiub"}


def unflatten(data) -> dict[str, dict[str, np.ndarray]]:
    result: dict[str, dict[str, np.ndarray]] = {}
    for key in data.files:
        if "/" in key:
            head, name = key.split("/", 1)
            result.setdefault(head, {})[name] = data[key]
    return result


def relative_error(mapping: torch.nn.Module, z: np.ndarray, c: np.ndarray) -> float:
    zt, ct = torch.from_numpy(z), torch.from_numpy(c)
    with torch.no_grad():
        return float((mapping(zt, ct) - zt).pow(2).sum(1).mean() / zt.pow(2).sum(1).mean())


def field_cosine(mapping: torch.nn.Module, z_train: np.ndarray, c_train: np.ndarray, z_val: np.ndarray, c_val: np.ndarray,
                 first_axis: bool) -> float:
    """SGF's step (m = 1) for a unit change dc vs the linear regression's response dE[z|c]/dc:
    mean cosine over held-out points. dc: the first attribute (attributes) or the top principal
    direction of the standardised training conditions (keypoints, caption)."""
    design = np.c_[c_train, np.ones(len(c_train))]
    coef = np.linalg.lstsq(design, z_train, rcond=None)[0][:-1]  # [k, d]
    if first_axis:
        dc = np.eye(c_train.shape[1], dtype=np.float32)[0]
    else:
        dc = np.linalg.svd(c_train - c_train.mean(0), full_matrices=False)[2][0].astype(np.float32)
    reference = torch.from_numpy((dc @ coef).astype(np.float32))
    delta = torch.from_numpy(np.broadcast_to(dc, c_val.shape).copy())
    step = surrogate_step(mapping, torch.from_numpy(z_val), torch.from_numpy(c_val), delta, 1).detach()
    return float(torch.nn.functional.cosine_similarity(step, reference[None], dim=1).mean())


def train_format1(z: np.ndarray, c_std: np.ndarray, settings: dict, seed: int) -> tuple[AuxiliaryMapping, float]:
    """F as it was before issue 13 (format 1: F = R(z, c), every layer x0.97), same split and budget as fit_mapping."""
    held = max(1, len(z) // 10)
    torch.manual_seed(seed)
    mapping = AuxiliaryMapping(z.shape[1], c_std.shape[1], settings["depth"], settings["hidden"], coefficient=0.97, skip=0.0)
    began = time.perf_counter()
    train_mapping(mapping, torch.from_numpy(z[held:]), torch.from_numpy(c_std[held:]), settings["steps"],
                  settings["train_batch"], settings["learning_rate"], seed=seed)
    return mapping, time.perf_counter() - began


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(ROOT / "model-repo"), help="model repository holding the default generator")
    parser.add_argument("--out", default=str(ROOT / "defaults"))
    parser.add_argument("--samples", type=int, default=1200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    parser.add_argument("--steps", type=int, default=0, help="override the mapping and DP-LaSE steps (smoke tests only)")
    parser.add_argument("--cache", default="", help="an .npz to read/write the scored samples (saves re-scoring)")
    parser.add_argument("--compare", action="store_true", help="also train format-1 F on the same pairs (before/after)")
    parser.add_argument("--skip-dplase", action="store_true")
    parser.add_argument("--stylegan2", action="store_true",
                        help=f"train only {STYLEGAN2}'s shipped artifacts (it must be installed in --repo)")
    parser.add_argument("--results-only", action="store_true", help="rewrite the RESULTS.md section from defaults/recipe.json")
    args = parser.parse_args()
    if args.results_only:
        write_results(json.loads((ROOT / "defaults" / "recipe.json").read_text()), "--compare (section from defaults/recipe.json)")
        return
    torch.set_num_threads(args.threads)
    if args.stylegan2:
        train_stylegan2_defaults(args)
        return
    if args.steps:
        RECIPE["mapping"]["steps"] = RECIPE["dplase"]["steps"] = args.steps
    began = time.perf_counter()
    world = LocalWorld(ModelRepository(args.repo), DEFAULT_GENERATOR)
    generator = world.generator(DEFAULT_GENERATOR)
    seconds: dict[str, float] = {}

    # ---- one scored sample set ----
    t = time.perf_counter()
    if args.cache and Path(args.cache).exists():
        data = np.load(args.cache, allow_pickle=True)  # our own cache file (older ones hold the sentences)
        latents, outputs = data["z"], unflatten(data)
        if "seconds" in data.files:
            seconds["score samples (when cached)"] = float(data["seconds"])
        log(f"read {len(latents)} scored samples from {args.cache}")
    else:
        log(f"drawing and scoring {args.samples} samples with {', '.join(HEADS)}")
        latents, outputs = draw_and_score(world, generator, args.samples, RECIPE["samples_seed"])
        if args.cache:
            np.savez(args.cache, z=latents, seconds=np.float64(time.perf_counter() - t), **flatten(outputs))
    seconds["score samples"] = time.perf_counter() - t
    log(f"checking set: {CHECK_COUNT} samples, seed {CHECK_SEED}")
    t = time.perf_counter()
    check_z, check_outputs = draw_and_score(world, generator, CHECK_COUNT, CHECK_SEED)
    seconds["score check set"] = time.perf_counter() - t

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in [*BOUNDARIES, *MAPPINGS, DIRECTIONS]:  # every run writes version 1 of each name afresh
        if (out / name).is_dir():  # (only its own: the distilled StyleGAN2 and its artifacts stay)
            shutil.rmtree(out / name)
    shipped = ModelRepository(out)
    provenance = shipped_provenance(ModelRepository(args.repo), generator)
    record: dict = {"recipe": {**RECIPE, "samples": len(latents), "check_seed": CHECK_SEED, "check_count": CHECK_COUNT,
                               "heads": HEADS, "generator": DEFAULT_GENERATOR, "threads": args.threads},
                    "artifacts": {}}

    # ---- InterFaceGAN boundaries ----
    for name, attribute in BOUNDARIES.items():
        t = time.perf_counter()
        record["artifacts"][name] = ship_boundary(name, attribute, "z", (latents, outputs), (check_z, check_outputs),
                                                  generator, shipped, provenance)
        seconds[name] = time.perf_counter() - t

    # ---- SGF mappings ----
    rm = RECIPE["mapping"]
    comparison = []
    for name, template in MAPPINGS.items():
        condition = ConditionSpec.from_dict(template.to_dict())
        raw = condition.raw(outputs)
        spec = MappingSpec(JobBasics(generator, name, 0, BATCH), condition, "z", len(latents), rm["depth"], rm["hidden"],
                           rm["steps"], rm["learning_rate"], rm["train_batch"], rm["skip"])
        t = time.perf_counter()
        mapping, metrics = fit_mapping(latents, raw, spec, QuietProgress())  # fits condition's mean/std
        train_seconds = time.perf_counter() - t
        c_std = condition.standardise(raw)
        held = max(1, len(latents) // 10)
        first_axis = condition.kind == "attributes"
        cosine = field_cosine(mapping, latents[held:], c_std[held:], latents[:held], c_std[:held], first_axis)
        metrics = {**metrics, "field_cosine": cosine}
        check_error = relative_error(mapping, check_z, condition.standardise(condition.raw(check_outputs)))
        mapping_artifact(spec, mapping, metrics).save(shipped, provenance)
        seconds[name] = train_seconds
        record["artifacts"][name] = {"kind": "mapping", "condition": condition.kind, "metrics": metrics,
                                     "check": {"reconstruction_error": check_error}, "train_seconds": train_seconds}
        log(f"{name}: held-out error {metrics['reconstruction_error']:.3f}, field cosine {cosine:.2f}, "
            f"check {check_error:.3f}, Lip bound {metrics['lipschitz_bound']:.4f}, {train_seconds:.0f} s")
        if args.compare:
            old, old_seconds = train_format1(latents, c_std, rm, 0)
            old_error = relative_error(old, latents[:held], c_std[:held])
            old_cosine = field_cosine(old, latents[held:], c_std[held:], latents[:held], c_std[:held], first_axis)
            comparison.append((condition.kind, raw.shape[1], old_error, old_cosine, old_seconds, metrics["reconstruction_error"],
                               cosine, train_seconds))
            log(f"  format 1 on the same pairs: held-out error {old_error:.3f}, field cosine {old_cosine:.2f}, {old_seconds:.0f} s")

    # ---- DP-LaSE directions ----
    if not args.skip_dplase:
        rd = RECIPE["dplase"]
        t = time.perf_counter()
        discovery = DiscoveryOptions(num_directions=rd["num_directions"], max_stride=rd["max_stride"], steps=rd["steps"],
                                     batch_size=rd["batch_size"], learning_rate=rd["learning_rate"], seed=0)
        spec_d = DirectionSpec(JobBasics(generator, DIRECTIONS, 0, rd["batch_size"]), rd["layer"], "z", discovery,
                               num_channel_subspaces=rd["num_channel_subspaces"], naming_samples=rd["naming_samples"])
        trained = DPLaSE().train(world, spec_d, QuietProgress(log))
        trained.save(shipped, provenance)
        seconds[DIRECTIONS] = time.perf_counter() - t
        names = [n for n in trained.value.names]
        best = max(names, key=lambda n: abs(n.correlation)) if names else None
        record["artifacts"][DIRECTIONS] = {"kind": "directions", "metrics": trained.metrics,
                                           "check": {"best_named": None if best is None else
                                                     {"index": best.index, "attribute": best.attribute.name,
                                                      "correlation": best.correlation, "slope": best.slope}}}
        log(f"{DIRECTIONS}: {len(trained.value.directions)} directions, best named {best.summary() if best else '-'}, "
            f"{seconds[DIRECTIONS]:.0f} s")

    seconds["total"] = time.perf_counter() - began
    record["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    record["sizes_bytes"] = {p.parent.parent.name: p.stat().st_size for p in out.glob("*/1/*.safetensors")}
    record["comparison"] = [dict(zip(("condition", "condition_dim", "format1_error", "format1_field_cosine", "format1_seconds",
                                      "format2_error", "format2_field_cosine", "format2_seconds"), row)) for row in comparison]
    (out / "recipe.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    log(f"wrote {out} ({sum(record['sizes_bytes'].values()) / 1e6:.2f} MB of tensors) in {seconds['total']:.0f} s")
    if out.resolve() == (ROOT / "defaults").resolve():
        write_results(record, " ".join(sys.argv[1:]))


def write_results(record: dict, arguments: str) -> None:
    """bench/RESULTS.md, section "Shipped trained defaults", from a recipe.json record."""
    from bench.common import record as write_section

    recipe, artifacts = record["recipe"], record["artifacts"]
    rb, rm, rd = recipe["boundary"], recipe["mapping"], recipe["dplase"]
    lines = [
        f"Recipe: {recipe['samples']} samples of {recipe['generator']} (seed {recipe['samples_seed']}, batches of 256), each drawn and "
        f"scored once with {', '.join(recipe['heads'])}; {recipe['threads']} torch thread(s), nice, on the shared 2-core machine. "
        f"Boundaries: keep {rb['keep_fraction']}, {rb['validation_fraction']:.0%} validation, linear SVM C = {rb['svm_c']}, all-sample "
        f"labels above the median. SGF mappings: F = {rm['skip']} z + R(z, c), depth {rm['depth']}, width {rm['hidden']}, {rm['steps']} "
        f"Adam steps of batch {rm['train_batch']}, lr {rm['learning_rate']}, held out: {rm['held_out']}. DP-LaSE: {rd['num_directions']} "
        f"directions at {rd['layer']}, {rd['steps']} steps of batch {rd['batch_size']}, lr {rd['learning_rate']}, no subspace refinement, "
        f"named on {rd['naming_samples']} starts each. Check set (tests/test_shipped_defaults.py): {recipe['check_count']} samples, "
        f"seed {recipe['check_seed']}.",
        "",
        "| artifact | what | figures | check set |",
        "|---|---|---|---|",
    ]
    for name, info in artifacts.items():
        m, check = info["metrics"], info["check"]
        if info["kind"] == "boundary":
            lines.append(f"| {name} | boundary {info['attribute']} | validation accuracy {m['validation_accuracy']:.3f}, all samples "
                         f"{m['all_samples_accuracy']:.3f} | accuracy {check['accuracy']:.3f} |")
        elif info["kind"] == "mapping":
            lines.append(f"| {name} | SGF mapping, {info['condition']} (c dim {int(m['condition_dim'])}) | held-out error "
                         f"{m['reconstruction_error']:.3f}, field cosine {m['field_cosine']:.2f}, Lip_z bound {m['lipschitz_bound']:.4f}, "
                         f"{info['train_seconds']:.0f} s | error {check['reconstruction_error']:.3f} |")
        else:
            best = check["best_named"]
            lines.append(f"| {name} | DP-LaSE directions | {int(m['num_directions'])} directions, orthogonality error "
                         f"{m['orthogonality_error']:.1e}, {int(m['named_above_0.5'])} named with abs(r) > 0.5 | best named: "
                         f"{best['index']}: {best['attribute']} r = {best['correlation']:+.2f} |")
    seconds = record["seconds"]
    lines += ["", f"Seconds: {', '.join(f'{k} {v:.0f}' for k, v in seconds.items())}. Tensors: "
              f"{sum(record['sizes_bytes'].values()) / 1e6:.2f} MB."]
    if record.get("comparison"):
        lines += [
            "",
            "SGF F before / after issue 13, trained on the same pairs with the same budget (format 1: F = R(z, c), every layer "
            "x0.97; format 2: F = 0.5 z + R(z, c), Lip_z <= 0.99). err: held-out |F(z,c) - z|^2 / |z|^2 (0: perfect, 1: predicting "
            "0). field cos: SGF's step (m = 1) for a unit change of c vs the linear regression's dE[z|c]/dc, mean over held-out "
            "points (dc: the first attribute, pose.yaw; for keypoints and caption the top principal direction of c).",
            "",
            "| condition | c dim | format 1 err | format 1 field cos | format 1 s | format 2 err | format 2 field cos | format 2 s |",
            "|---|---|---|---|---|---|---|---|",
            *[f"| {r['condition']} | {r['condition_dim']} | {r['format1_error']:.3f} | {r['format1_field_cosine']:.2f} | "
              f"{r['format1_seconds']:.0f} | {r['format2_error']:.3f} | {r['format2_field_cosine']:.2f} | {r['format2_seconds']:.0f} |"
              for r in record["comparison"]],
        ]
        lines += [
            "",
            "Reading: format 2 brings the held-out error from about 1 (format 1 barely beats predicting 0) to near 0.25, the "
            "(1 - a)^2 floor of the fixed share a = 0.5 of z, for all three conditions, at the same budget (the seconds vary with the "
            "load of the shared machine). The field cosine is about "
            "the same for both: format 1's F is close to E[z|c] (its z-gain is ~0.01, bench/sgf_fit.py), so its SGF step is "
            "J_c dc, the regression direction itself; format 2's step is (I - J_z)^-1 J_c dc truncated at m = 1 and stays close "
            "to it for attributes. For keypoints and caption the linear regression direction is a weak reference (10 and 384 "
            "standardised conditions fitted on ~1080 pairs). So the fix makes F what the paper asks for (F(z, C(G(z))) ~ z with "
            "Lip_z(F) < 1) and keeps the direction SGF steps in; \"SGF trajectory quality (issue 13)\" compares the edits.",
        ]
    write_section("Shipped trained defaults", f"python scripts/train_defaults.py {arguments}".strip(), "\n".join(lines))


if __name__ == "__main__":
    main()

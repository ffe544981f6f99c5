"""The W* paper's Table 1 (and Fig. 5) on our world: the original space against a flow's proxy space.

`table1(world, generator, artifact, ...)` samples fresh latents, scores and renders them once, and
measures in both spaces:

- linear separability: held-out accuracy of fresh linear SVMs per attribute (80/20 split),
  min / max / average over the attributes;
- DCI (Eastwood and Williams): one Lasso (alpha 0.02) per attribute on 2000 samples (80/20),
  disentanglement and completeness from the |coefficient| importance matrix, informativeness as
  the held-out RMSE;
- distance unfolding: mean and std of D_latent - s D_perceptual over random pairs (600), and 2AFC
  over random triplets with D_perceptual as the judge;
- identity drift at equal target change: W* edits (proxy space) against InterFaceGAN edits in the
  original space along an SVM boundary fitted there, at several strengths, compared where both
  reach the same mean attribute change (linear interpolation), identity measured with the torch
  face descriptor.

`scatter_png` draws the paper's Fig. 5 (latent against perceptual distance, both spaces).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from latentedit.methods.interfacegan import boundary_from_scores
from latentedit.methods.wstar import FlowArtifact, apply_flow, invert_flow
from latentedit.perceptual import PerceptualDistance, from_uint8, uint8_distance
from latentedit.world import GeneratorInfo, World


def linear_accuracies(x: np.ndarray, labels: np.ndarray, seed: int = 0, train_fraction: float = 0.8) -> np.ndarray:
    """Held-out accuracy [K] of a fresh linear SVM per attribute column of labels [N, K]."""
    from sklearn.svm import LinearSVC

    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(len(x) * train_fraction)
    train, test = order[:cut], order[cut:]
    out = []
    for k in range(labels.shape[1]):
        svm = LinearSVC(C=1.0, dual="auto", max_iter=20000, random_state=seed).fit(x[train], labels[train, k])
        out.append(svm.score(x[test], labels[test, k]))
    return np.asarray(out)


def _entropy(p: np.ndarray, base: int) -> np.ndarray:
    p = np.clip(p, 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=0) / np.log(base)


def dci(x: np.ndarray, labels: np.ndarray, alpha: float = 0.02, seed: int = 0, train_fraction: float = 0.8
        ) -> tuple[float, float, float]:
    """(disentanglement, completeness, informativeness RMSE) with one Lasso per attribute.

    Importances R [d, K] = |coefficients| of each attribute's Lasso on the standardised codes.
    D = sum_i rho_i (1 - H_K(R_i. / sum_k R_ik)), rho_i = sum_k R_ik / sum R;
    C = mean_k (1 - H_d(R_.k / sum_i R_ik)); I = held-out RMSE averaged over the attributes."""
    from sklearn.linear_model import Lasso

    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(len(x) * train_fraction)
    train, test = order[:cut], order[cut:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-8
    z = (x - mean) / std
    importances, errors = [], []
    for k in range(labels.shape[1]):
        model = Lasso(alpha=alpha, max_iter=10000, random_state=seed).fit(z[train], labels[train, k])
        importances.append(np.abs(model.coef_))
        errors.append(float(np.sqrt(np.mean((model.predict(z[test]) - labels[test, k]) ** 2))))
    r = np.stack(importances, axis=1)  # [d, K]
    total = r.sum()
    if total <= 0:
        return 0.0, 0.0, float(np.mean(errors))
    k = r.shape[1]
    per_code = r / np.maximum(r.sum(1, keepdims=True), 1e-12)
    disentanglement = 1 - _entropy(per_code.T, k) if k > 1 else np.ones(len(r))
    rho = r.sum(1) / total
    per_factor = r / np.maximum(r.sum(0, keepdims=True), 1e-12)
    completeness = 1 - _entropy(per_factor, r.shape[0])
    return float((rho * disentanglement).sum()), float(completeness.mean()), float(np.mean(errors))


def random_pairs(n: int, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n, count)
    b = (a + rng.integers(1, n, count)) % n
    return np.stack([a, b], axis=1)


def latent_mse(x: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    return ((x[pairs[:, 0]] - x[pairs[:, 1]]) ** 2).mean(1)


def two_afc(x: np.ndarray, perceptual: Callable[[np.ndarray, np.ndarray], np.ndarray], triplets: np.ndarray) -> float:
    """Share of triplets (ref, a, b) where the latent distance picks the same closer image as
    D_perceptual (`perceptual(i, j)` gives distances of index pairs)."""
    ref_a = triplets[:, [0, 1]]
    ref_b = triplets[:, [0, 2]]
    latent_says = latent_mse(x, ref_a) < latent_mse(x, ref_b)
    judge = perceptual(ref_a, ref_b)
    return float(np.mean(latent_says == judge))


@dataclass
class Table1:
    rows: dict[str, dict[str, float]]  # space -> metric -> value
    attributes: list[str]
    per_attribute: dict[str, list[float]]  # space -> accuracies in attribute order
    scatter: dict[str, tuple[np.ndarray, np.ndarray]]  # space -> (latent, scaled perceptual)
    identity: dict[str, list[dict[str, float]]]  # method -> [{strength, change, drift}]
    identity_summary: dict[str, float]


def sample_world(world: World, generator: GeneratorInfo, space: str, count: int, seed: int, heads: Sequence[str],
                 batch: int = 256):
    """(latents flat [N, d], uint8 images, scores {head: {output: [N, ...]}}) of `count` fresh samples."""
    flats, images, scores = [], [], []
    for start in range(0, count, batch):
        latents = world.sample(generator, min(batch, count - start), seed * 7919 + start, space)
        pictures = world.synthesize(generator, latents)
        flats.append(latents.flat())
        images.append(pictures)
        scores.append(world.score(pictures, list(heads)))
    merged = {h: {o: np.concatenate([s[h][o] for s in scores]) for o in scores[0][h]} for h in scores[0]}
    return np.concatenate(flats), np.concatenate(images), merged


def identity_drift(world: World, generator: GeneratorInfo, artifact: FlowArtifact, attribute: int, starts: np.ndarray,
                   original_normal: np.ndarray, descriptor: torch.nn.Module, strengths: Sequence[float]
                   ) -> dict[str, list[dict[str, float]]]:
    """Mean attribute change and identity distance per strength, for W* and InterFaceGAN (original space)."""
    from latentedit.latents import Latents

    a = artifact.attributes[attribute]
    space = artifact.space

    def measure(flat: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        images = world.synthesize(generator, Latents(space, flat.reshape(len(flat), *space.shape)))
        value = a.extract(world.score(images, [a.head]))
        with torch.no_grad():
            return value, descriptor(from_uint8(images))

    base_value, base_id = measure(starts)
    proxy = apply_flow(artifact.flow, starts)
    n_star = artifact.classifiers.normal(attribute)
    out: dict[str, list[dict[str, float]]] = {"wstar": [], "interfacegan": []}
    for strength in strengths:
        for method, moved in (("wstar", invert_flow(artifact.flow, proxy + strength * n_star)),
                              ("interfacegan", starts + strength * original_normal)):
            value, ident = measure(moved)
            out[method].append({"strength": float(strength), "change": float(np.nanmean(value - base_value)),
                                "drift": float((ident - base_id).norm(dim=1).mean())})
    return out


def drift_at_equal_change(curves: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """InterFaceGAN's identity drift interpolated at each W* strength's target change."""
    ifg = sorted(curves["interfacegan"], key=lambda c: c["change"])
    changes = np.array([c["change"] for c in ifg])
    drifts = np.array([c["drift"] for c in ifg])
    summary: dict[str, float] = {}
    ratios = []
    for point in curves["wstar"]:
        if not changes.min() <= point["change"] <= changes.max():
            continue
        matched = float(np.interp(point["change"], changes, drifts))
        ratios.append(point["drift"] / max(matched, 1e-12))
        summary[f"strength {point['strength']:g}"] = point["drift"] / max(matched, 1e-12)
    summary["mean_ratio"] = float(np.mean(ratios)) if ratios else float("nan")
    return summary


def table1(world: World, generator: GeneratorInfo, artifact: FlowArtifact, perceptual: PerceptualDistance,
           descriptor: torch.nn.Module | None = None, num_samples: int = 2000, num_pairs: int = 600,
           num_triplets: int = 600, identity_seeds: int = 100, strengths: Sequence[float] = (1.0, 2.0, 3.0, 4.0),
           edit_attribute: int = 0, seed: int = 12345, log: Callable[[str], None] = lambda _m: None) -> Table1:
    heads = sorted({a.head for a in artifact.attributes})
    log(f"sampling and scoring {num_samples} fresh samples")
    x, images, scores = sample_world(world, generator, artifact.space.space, num_samples, seed, heads)
    values = np.stack([a.extract(scores) for a in artifact.attributes], axis=1)
    keep = np.isfinite(values).all(1)
    x, images, values = x[keep], images[keep], values[keep]
    labels = (values > np.asarray(artifact.thresholds or np.median(values, 0))).astype(np.int64)
    proxy = apply_flow(artifact.flow, x)
    pairs = random_pairs(len(x), num_pairs, seed)
    log(f"perceptual distances of {num_pairs} pairs and {num_triplets} triplets")
    scale = artifact.perceptual_scale
    d_pairs = scale * uint8_distance(perceptual, images[pairs[:, 0]], images[pairs[:, 1]])
    rng = np.random.default_rng(seed + 1)
    triplets = np.stack([rng.choice(len(x), 3, replace=False) for _ in range(num_triplets)])
    d_ref_a = uint8_distance(perceptual, images[triplets[:, 0]], images[triplets[:, 1]])
    d_ref_b = uint8_distance(perceptual, images[triplets[:, 0]], images[triplets[:, 2]])
    rows: dict[str, dict[str, float]] = {}
    per_attribute: dict[str, list[float]] = {}
    scatter = {}
    for space, data in (("original", x), ("proxy", proxy)):
        log(f"metrics in the {space} space")
        accuracy = linear_accuracies(data, labels, seed)
        d, c, i = dci(data, labels.astype(np.float64), 0.02, seed)
        lat = latent_mse(data, pairs)
        gap = lat - d_pairs
        afc = two_afc(data, lambda _a, _b: d_ref_a < d_ref_b, triplets)
        rows[space] = {"min_accuracy": float(accuracy.min()), "max_accuracy": float(accuracy.max()),
                       "avg_accuracy": float(accuracy.mean()), "D": d, "C": c, "I": i, "gap_mean": float(gap.mean()),
                       "gap_std": float(gap.std()), "2afc": afc,
                       "latent_perceptual_correlation": float(np.corrcoef(lat, d_pairs)[0, 1])}
        per_attribute[space] = [float(v) for v in accuracy]
        scatter[space] = (lat, d_pairs)
    identity: dict[str, list[dict[str, float]]] = {}
    summary: dict[str, float] = {}
    if descriptor is not None and identity_seeds > 0:
        log(f"identity drift at equal target change over {identity_seeds} seeds")
        fit = boundary_from_scores(x, values[:, edit_attribute], keep_fraction=0.1, seed=seed)
        identity = identity_drift(world, generator, artifact, edit_attribute, x[:identity_seeds], fit.boundary.normal,
                                  descriptor, strengths)
        summary = drift_at_equal_change(identity)
    return Table1(rows, [a.name for a in artifact.attributes], per_attribute, scatter, identity, summary)


TABLE1_COLUMNS = ("min_accuracy", "max_accuracy", "avg_accuracy", "D", "C", "I", "gap_mean", "gap_std", "2afc",
                  "latent_perceptual_correlation")


def table1_markdown(table: Table1, flow: str) -> str:
    """Table 1 of one flow as markdown: the original and the proxy space, per-attribute accuracy, identity drift."""
    lines = ["| space | " + " | ".join(TABLE1_COLUMNS) + " |", "|---|" + "---|" * len(TABLE1_COLUMNS)]
    for space, row in table.rows.items():
        name = "original" if space == "original" else f"proxy ({flow})"
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in TABLE1_COLUMNS) + " |")
    lines += ["", "Held-out linear accuracy per attribute (original -> proxy): " + "; ".join(
        f"{a} {o:.3f} -> {p:.3f}" for a, o, p in zip(table.attributes, table.per_attribute["original"],
                                                      table.per_attribute["proxy"]))]
    if table.identity:
        lines.append(f"Identity drift, W* / InterFaceGAN at equal mean change of {table.attributes[0]}: "
                     f"{table.identity_summary.get('mean_ratio', float('nan')):.2f} (below 1: W* keeps identity better)")
    return "\n".join(lines) + "\n"


def scatter_png(path: Path, scatter: dict[str, tuple[np.ndarray, np.ndarray]], size: int = 360) -> None:
    """Fig. 5: latent (y) against rescaled perceptual (x) distance, one panel per space, y = x dashed."""
    from PIL import Image, ImageDraw

    panels = list(scatter.items())
    canvas = Image.new("RGB", (size * len(panels), size + 30), "white")
    draw = ImageDraw.Draw(canvas)
    high = max(max(float(np.max(lat)), float(np.max(per))) for lat, per in scatter.values()) * 1.05
    margin = 30
    for p, (name, (lat, per)) in enumerate(panels):
        left = p * size + margin
        inner = size - 2 * margin
        draw.rectangle([left, margin, left + inner, margin + inner], outline="black")
        for t in range(0, 41):  # y = x dashed
            if t % 2 == 0:
                a, b = t / 40, (t + 1) / 40
                draw.line([left + a * inner, margin + inner - a * inner, left + b * inner, margin + inner - b * inner],
                          fill="gray")
        for xv, yv in zip(per, lat):
            cx, cy = left + xv / high * inner, margin + inner - yv / high * inner
            draw.ellipse([cx - 1.5, cy - 1.5, cx + 1.5, cy + 1.5], fill=(31, 119, 180))
        draw.text((left, 8), f"{name}: latent MSE (y) vs s*D_perceptual (x), 0..{high:.2f}", fill="black")
        draw.text((left, margin + inner + 6), f"corr {np.corrcoef(lat, per)[0, 1]:.2f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)

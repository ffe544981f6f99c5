"""Why SGF's auxiliary mapping F(z, c) does not fit (issue 13, part 1): held-out reconstruction error of variants.

    .venv/bin/python bench/sgf_fit.py [--pairs 2048] [--steps 200] [--threads 2] [--cache pairs.npz]

Builds (z, c) pairs in-process (LocalWorld on model-repo, default generator; attribute condition
pose.yaw + expression.happy, standardised as in `ConditionSpec`), holds out the first 10% as
`fit_mapping` does, and trains each variant for the same budget. Reported per variant:
- err: held-out |F(z, c) - z|^2 / |z|^2 (the `reconstruction_error` of a mapping job);
- err(shuf c): the same with c shuffled across the held-out pairs: err(shuf c) - err is how much F uses c;
- gain: mean |dF/dz v| / |v| over random directions v at held-out points (a JVP): how much of z F passes on;
- s: training seconds.
Closed-form references: the best c-only predictor of z (ridge) and the best c-blind contraction k*z.
Records the table in bench/RESULTS.md ("SGF mapping fit diagnosis").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import jvp
from torch.nn.utils.parametrizations import spectral_norm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import record  # noqa: E402
from latentedit.attributes import Attribute  # noqa: E402
from latentedit.conditions import ConditionSpec  # noqa: E402
from latentedit.methods.sgf import AuxiliaryMapping, refresh_spectral_estimates, surrogate_step  # noqa: E402
from latentedit.repository import ModelRepository  # noqa: E402
from latentedit.world import LocalWorld  # noqa: E402

ATTRIBUTES = [Attribute("pose", "yaw", None), Attribute("expression", "probabilities", 3, "happy")]


def build_pairs(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    world = LocalWorld(ModelRepository(str(ROOT / "model-repo")))
    generator = world.generator()
    condition = ConditionSpec("attributes", ATTRIBUTES)
    latents, raw = [], []
    for index, start in enumerate(range(0, count, 512)):
        z = world.sample(generator, min(512, count - start), seed + index)
        latents.append(z.flat())
        raw.append(condition.raw(world.score(world.synthesize(generator, z), condition.heads)))
    return np.concatenate(latents).astype(np.float32), np.concatenate(raw).astype(np.float32)


class Unconstrained(nn.Module):
    """AuxiliaryMapping's layout with plain linear layers and an unbounded AdaIN scale (1 + s(c)).
    `spectral`: spectral norm (x coefficient) on every linear layer, the scale still unbounded."""

    def __init__(self, latent_dim: int, condition_dim: int, depth: int, hidden: int, spectral: bool = False,
                 coefficient: float = 0.97) -> None:
        super().__init__()

        def linear(i: int, o: int) -> nn.Module:
            layer = nn.Linear(i, o)
            return nn.Sequential(spectral_norm(layer, n_power_iterations=3), _Scale(coefficient)) if spectral else layer

        self.inp, self.inp_style = linear(latent_dim, hidden), linear(condition_dim, hidden)
        self.blocks = nn.ModuleList([nn.ModuleList([linear(hidden, hidden), linear(condition_dim, 2 * hidden)]) for _ in range(depth - 2)])
        self.out, self.out_shift = linear(hidden, latent_dim), linear(condition_dim, latent_dim)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.act(self.inp(z) + self.inp_style(c))
        for layer, style in self.blocks:
            scale, shift = style(c).chunk(2, dim=-1)
            h = self.act((1 + scale) * layer(h) + shift)
        return self.out(h) + self.out_shift(c)


class _Scale(nn.Module):
    def __init__(self, coefficient: float) -> None:
        super().__init__()
        self.coefficient = coefficient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coefficient * x


class Residual(nn.Module):
    """F(z, c) = a z + R(z, c), R today's AuxiliaryMapping with a smaller coefficient so that
    Lip_z(F) <= a + coefficient**depth < 1: still a contraction (the Neumann series converges)."""

    def __init__(self, latent_dim: int, condition_dim: int, depth: int, hidden: int, a: float) -> None:
        super().__init__()
        self.a = a
        coefficient = (0.99 - a) ** (1 / depth)
        self.r = AuxiliaryMapping(latent_dim, condition_dim, depth, hidden, coefficient=coefficient)
        self.bound = a + coefficient ** depth

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.a * z + self.r(z, c)


def scale_bias_init(mapping: AuxiliaryMapping, value: float) -> AuxiliaryMapping:
    """Start every bounded scale sigmoid(s(c)) near 1 instead of 0.5 (bias of the scale half)."""
    with torch.no_grad():
        for block in mapping.blocks:
            block.style.linear.bias[: mapping.hidden].fill_(value)
    return mapping


def train(model: nn.Module, z: torch.Tensor, c: torch.Tensor, steps: int, lr: float, schedule: str, batch: int = 128) -> float:
    """train_mapping's loop (MSE, Adam, uniform batches, same seed) with an optional cosine schedule."""
    generator = torch.Generator().manual_seed(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps) if schedule == "cosine" else None
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(0, len(z), (batch,), generator=generator)
        loss = nn.functional.mse_loss(model(z[index], c[index]), z[index])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if scheduler is not None:
            scheduler.step()
    seconds = time.perf_counter() - start
    mappings = [model] if isinstance(model, AuxiliaryMapping) else [m for m in model.modules() if isinstance(m, AuxiliaryMapping)]
    for mapping in mappings:
        refresh_spectral_estimates(mapping, z[:batch], c[:batch])
    model.train()
    with torch.no_grad():  # one more power-iteration pass for the bench's own spectral layers
        model(z[:batch], c[:batch])
    model.eval()
    return seconds


def field(model: nn.Module, z: torch.Tensor, c: torch.Tensor, direction: torch.Tensor, order: int = 1) -> tuple[float, float]:
    """SGF's step for a unit change of yaw (Algorithm 1, m = `order`, as `surrogate_step`) vs the
    regression direction dE[z|c]/dc_yaw: mean cosine and mean length ratio."""
    delta = torch.zeros_like(c)
    delta[:, 0] = 1.0
    with torch.no_grad():
        step = surrogate_step(model, z, c, delta, order)
    cosine = float(nn.functional.cosine_similarity(step, direction[None], dim=1).mean())
    return cosine, float((step.norm(dim=1) / direction.norm()).mean())


def measure(model: nn.Module, z: torch.Tensor, c: torch.Tensor) -> tuple[float, float, float]:
    model.eval()
    with torch.no_grad():
        denominator = z.pow(2).sum(1).mean()
        error = float((model(z, c) - z).pow(2).sum(1).mean() / denominator)
        shuffled = c[torch.randperm(len(c), generator=torch.Generator().manual_seed(1))]
        error_shuffled = float((model(z, shuffled) - z).pow(2).sum(1).mean() / denominator)
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        jv = jvp(lambda zz: model(zz, c), (z,), (v,))[1]
    gain = float((jv.norm(dim=1) / v.norm(dim=1)).mean())
    return error, error_shuffled, gain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default="", help="an .npz to read/write the pairs (saves re-scoring)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    cached = bool(args.cache) and Path(args.cache).exists()
    if cached:
        data = np.load(args.cache)
        latents, raw = data["z"], data["c"]
    else:
        latents, raw = build_pairs(args.pairs, seed=100)
        if args.cache:
            np.savez(args.cache, z=latents, c=raw)
    pair_seconds = time.perf_counter() - began
    condition = ConditionSpec("attributes", ATTRIBUTES)
    condition.fit(raw)
    standard = condition.standardise(raw)
    held = len(latents) // 10
    z_all, c_all, c_raw = torch.from_numpy(latents), torch.from_numpy(standard), torch.from_numpy(raw)
    z_val, c_val, z_tr, c_tr = z_all[:held], c_all[:held], z_all[held:], c_all[held:]
    dim, k = latents.shape[1], c_all.shape[1]

    # Closed-form references.
    denominator = float(z_val.pow(2).sum(1).mean())
    design = np.c_[standard[held:], np.ones(len(latents) - held)]
    coef = np.linalg.lstsq(design, latents[held:], rcond=None)[0]
    ridge = np.c_[standard[:held], np.ones(held)] @ coef
    yaw_direction = torch.from_numpy(coef[0].astype(np.float32))  # dE[z|c]/d c_yaw (standardised yaw)
    ridge_error = float(((ridge - latents[:held]) ** 2).sum(1).mean() / denominator)
    bound = 0.97 ** 6
    blind = (1 - bound) ** 2
    mixed = float((((bound * latents[:held] + (1 - bound) * ridge) - latents[:held]) ** 2).sum(1).mean() / denominator)
    references = [
        ("zero / mean predictor", 1.0),
        ("best c-only predictor (linear regression z ~ c)", ridge_error),
        (f"F = k z, c ignored, k = 0.97^6 = {bound:.3f} (today's Lipschitz bound)", blind),
        ("F = k z + (1-k) * regression(c), same k", mixed),
        ("F = z (identity; not a contraction)", 0.0),
    ]

    steps = args.steps
    variants: list[tuple[str, str, callable, dict]] = []

    def today(depth: int = 6, hidden: int = 256) -> callable:
        return lambda: AuxiliaryMapping(dim, k, depth, hidden)

    add = lambda group, name, make, **kw: variants.append((group, name, make, kw))  # noqa: E731
    add("a", "today: SN x0.97, scale sigmoid in (0,1), depth 6, 256, lr 2e-3", today())
    add("b", "unconstrained MLP, same size (no SN, scale 1+s(c))", lambda: Unconstrained(dim, k, 6, 256))
    add("b", "SN x0.97, scale unbounded 1+s(c)", lambda: Unconstrained(dim, k, 6, 256, spectral=True))
    add("b", "today, scale bias init +4 (sigmoid ~0.98 at start)", lambda: scale_bias_init(AuxiliaryMapping(dim, k, 6, 256), 4.0))
    add("b", "contraction F = 0.50 z + R(z,c), Lip_z <= 0.99", lambda: Residual(dim, k, 6, 256, 0.50))
    add("b", "contraction F = 0.97 z + R(z,c), Lip_z <= 0.99", lambda: Residual(dim, k, 6, 256, 0.97))
    add("c", "today, c raw (not standardised)", today(), raw=True)
    add("d", "today, depth 2", today(2))
    add("e", "today, lr 2e-4 (paper)", today(), lr=2e-4)
    add("e", "today, lr 1e-2", today(), lr=1e-2)
    add("f", "today, 500 training pairs", today(), pairs=500)
    add("f", "contraction 0.50 z + R, 500 training pairs", lambda: Residual(dim, k, 6, 256, 0.50), pairs=500)

    rows = []
    for group, name, make, kw in variants:
        torch.manual_seed(0)
        model = make()
        n = kw.get("pairs", len(z_tr))
        c_train, c_eval = (c_raw[held:], c_raw[:held]) if kw.get("raw") else (c_tr, c_val)
        seconds = train(model, z_tr[:n], c_train[:n], kw.get("steps", steps), kw.get("lr", 2e-3), kw.get("schedule", "const"))
        error, shuffled, gain = measure(model, z_val, c_eval)
        cosine, length = field(model, z_val, c_eval, yaw_direction / (c_raw[held:, 0].std() if kw.get("raw") else 1.0))
        rows.append((group, name, kw.get("steps", steps), n, error, shuffled, gain, cosine, length, seconds))
        print(f"{group} {name:62s} err {error:.3f}  shuf-c {shuffled:.3f}  gain {gain:.3f}  field cos {cosine:.2f} "
              f"len {length:.2f}  {seconds:.0f}s", flush=True)

    lines = [
        f"Pairs: {len(latents)} (z: {dim}-d, std {latents.std():.3f}; c: pose.yaw + expression.happy, standardised), "
        f"first {held} held out; {len(z_tr)} for training unless stated; batch 128, Adam, {steps} steps unless stated. "
        + (f"Pairs read from {args.cache}" if cached else f"Pairs built in {pair_seconds:.0f} s") + f"; total {time.perf_counter() - began:.0f} s.",
        "",
        "Closed-form references (held-out error):",
        "",
        "| reference | err |",
        "|---|---|",
        *[f"| {name} | {value:.3f} |" for name, value in references],
        "",
        "err: held-out |F(z,c) - z|^2 / |z|^2; shuf c: the same with c shuffled (err(shuf c) - err = use of c); "
        "gain: mean |dF/dz v|/|v| over random v; field cos / len: SGF's step (m = 1) for a unit yaw change vs the "
        "regression direction dE[z|c]/dyaw (cosine, length ratio; raw-c rows rescaled to standardised units).",
        "",
        "| group | variant | steps | train pairs | err | err (shuf c) | gain | field cos | field len | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[f"| {g} | {name} | {s} | {n} | {e:.3f} | {sh:.3f} | {gain:.3f} | {cos:.2f} | {ln:.2f} | {sec:.0f} |"
          for g, name, s, n, e, sh, gain, cos, ln, sec in rows],
    ]
    body = "\n".join(lines)
    print(body)
    record("SGF mapping fit diagnosis", "python bench/sgf_fit.py " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()

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


def trajectories(args: argparse.Namespace) -> None:
    """Share of frames the quality head accepts along SGF trajectories vs InterFaceGAN's, binned by
    the yaw change reached (equal target change), with the shipped default artifacts; and SGF
    caption edits: accepted share and caption similarity reached. In-process (LocalWorld)."""
    from latentedit.methods.base import FrameRequest
    from latentedit.methods.interfacegan import InterFaceGAN, InterFaceGANOptions
    from latentedit.methods.sgf import SGF, AttributeGoal, CaptionGoal, SGFOptions

    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    repo = ModelRepository(str(ROOT / "model-repo"))
    world = LocalWorld(repo)
    generator = world.generator()
    fresh = world.sample(generator, 64, 31337)
    fresh_quality = world.score(world.synthesize(generator, fresh), ["quality"])["quality"]["face_probability"]
    # Fixed: ~14% of fresh faces here get face_probability 0 (MTCNN finds none), so the 5th percentile the
    # DP-LaSE table uses is 0 and would accept everything. 0.8 is that table's 5th percentile of detected-rich
    # 1000 fresh faces (0.801); the share of fresh faces passing it is reported as the reference.
    threshold = args.quality_threshold
    fresh_pass = float((fresh_quality >= threshold).mean())
    start = world.sample(generator, args.starts, 4040)
    heads = ("pose", "quality")

    def table(frames) -> tuple[np.ndarray, np.ndarray]:
        """[frames, N] yaw change from the start and acceptance."""
        yaw = np.stack([f.scores["pose"]["yaw"] for f in frames])
        accepted = np.stack([f.scores["quality"]["face_probability"] >= threshold for f in frames])
        return np.abs(yaw - yaw[0])[1:], accepted[1:]  # the start frame itself is not counted

    sgf = SGF()
    options = SGFOptions(args.mapping, (AttributeGoal("pose", "yaw", "", 0, args.yaw),), max_steps=args.max_steps)
    sgf_frames = list(sgf.edit(world, generator, sgf.prepare(repo, generator, options), start, options, FrameRequest(heads, False)))
    start_quality = sgf_frames[0].scores["quality"]["face_probability"]
    sgf_change, sgf_accepted = table(sgf_frames)
    final_yaw = sgf_frames[-1].scores["pose"]["yaw"]
    ifg = InterFaceGAN()
    changes, accepted = [], []
    for end in (-args.ifg_distance, args.ifg_distance):
        opts = InterFaceGANOptions(args.boundary, start_distance=0.0, end_distance=end, num_frames=args.ifg_frames)
        frames = list(ifg.edit(world, generator, ifg.prepare(repo, generator, opts), start, opts, FrameRequest(heads, False)))
        change, ok = table(frames)
        changes.append(change)
        accepted.append(ok)
    ifg_change, ifg_accepted = np.concatenate(changes, axis=1), np.concatenate(accepted, axis=1)
    bins = [0, 5, 10, 20, 40, 1e9]
    rows = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        cells = []
        for change, ok in ((sgf_change, sgf_accepted), (ifg_change, ifg_accepted)):
            inside = (change >= lo) & (change < hi)
            cells.append(f"{ok[inside].mean():.0%} ({int(inside.sum())})" if inside.any() else "-")
        rows.append(f"| {lo:g}-{hi:g} deg | {cells[0]} | {cells[1]} |" if hi < 1e9 else f"| >= {lo:g} deg | {cells[0]} | {cells[1]} |")

    caption_options = SGFOptions(args.caption_mapping, CaptionGoal(args.caption), max_steps=args.max_steps)
    caption_start = world.sample(generator, args.caption_starts, 5050)
    caption_frames = list(sgf.edit(world, generator, sgf.prepare(repo, generator, caption_options), caption_start, caption_options,
                                   FrameRequest(("caption", "quality"), False)))
    target = world.embed_text([args.caption])[0]
    target = target / np.linalg.norm(target)

    def cosine(frame) -> np.ndarray:
        e = frame.scores["caption"]["embedding"]
        return e @ target / np.linalg.norm(e, axis=1)

    caption_ok = np.stack([f.scores["quality"]["face_probability"] >= threshold for f in caption_frames])
    first, last = cosine(caption_frames[0]), cosine(caption_frames[-1])
    lines = [
        f"Starts: {args.starts} (seed 4040); accepted: quality head face_probability >= {threshold:.2f}, which {fresh_pass:.0%} of 64 "
        f"fresh faces pass (seed 31337; {(fresh_quality == 0).mean():.0%} of them get 0, no face found). SGF: mapping {args.mapping!r}, target pose.yaw = {args.yaw:g}, step size 0.2, m = 1, tolerance 0.1, "
        f"max {args.max_steps} steps: {len(sgf_frames) - 1} steps, stop {sgf_frames[-1].stop or 'step limit'}, final |yaw - target| "
        f"mean {np.abs(final_yaw - args.yaw).mean():.1f} deg (from {np.abs(sgf_frames[0].scores['pose']['yaw'] - args.yaw).mean():.1f}). "
        f"InterFaceGAN: boundary {args.boundary!r}, distances 0 to +-{args.ifg_distance:g} in {args.ifg_frames} frames, both "
        "directions from every start. Every (frame, sample) after the start counts once, binned by its |yaw change| from the start.",
        "",
        f"Starts accepted: {np.mean(start_quality >= threshold):.0%}.",
        "",
        "| yaw change | SGF accepted (frames) | InterFaceGAN accepted (frames) |",
        "|---|---|---|",
        *rows,
        "",
        f"SGF caption edits: mapping {args.caption_mapping!r}, target {args.caption!r}, {args.caption_starts} starts (seed 5050), "
        f"{len(caption_frames) - 1} steps: cosine to the target sentence {first.mean():.3f} -> {last.mean():.3f} "
        f"(rose for {(last > first).mean():.0%} of samples); frames accepted by the quality head {caption_ok[1:].mean():.0%} "
        f"(last frame {caption_ok[-1].mean():.0%}; starts {caption_ok[0].mean():.0%}).",
        "",
        f"CPU time: {time.perf_counter() - began:.0f} s ({args.threads} torch thread(s), shared 2-core machine).",
    ]
    if min(sgf_accepted.mean(), ifg_accepted.mean(), caption_ok[1:].mean()) >= 0.99:
        lines[-1:-1] = ["Reading: every frame of both methods passes, at every yaw change, and so do the caption edits' frames: "
                        "on these starts the quality head (MTCNN's face probability) does not separate SGF from InterFaceGAN. "
                        "It judges whether a face is found, not the artefacts issue 13 saw along format-1 caption edits "
                        "(glasses, colour cast); those need a person looking at the frames or a perceptual measure.", ""]
    body = "\n".join(lines)
    print(body)
    record("SGF trajectory quality (issue 13)", "python bench/sgf_fit.py --trajectories " + " ".join(a for a in sys.argv[1:] if a != "--trajectories"), body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", action="store_true", help="quality-head acceptance along SGF vs InterFaceGAN edits")
    parser.add_argument("--starts", type=int, default=16)
    parser.add_argument("--caption-starts", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=15)
    parser.add_argument("--yaw", type=float, default=20.0)
    parser.add_argument("--mapping", default="default-sgf-attributes")
    parser.add_argument("--caption-mapping", default="default-sgf-caption")
    parser.add_argument("--caption", default="a smiling young woman")
    parser.add_argument("--boundary", default="default-yaw")
    parser.add_argument("--ifg-distance", type=float, default=4.0)
    parser.add_argument("--ifg-frames", type=int, default=9)
    parser.add_argument("--quality-threshold", type=float, default=0.8)
    parser.add_argument("--pairs", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default="", help="an .npz to read/write the pairs (saves re-scoring)")
    args = parser.parse_args()
    if args.trajectories:
        trajectories(args)
        return
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

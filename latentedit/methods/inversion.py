"""Real-image editing: find the latent whose image matches a given image (GAN inversion).

Optimisation through the generator (the paper's section 4.4 uses an encoder plus this
refinement; we have no encoder for the default world, so optimisation alone): Adam on the
pixel MSE plus a small penalty that keeps z near the prior's typical shell, from seeded
prior samples. It runs next to the generator's weights, since no gradient crosses gRPC.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from latentedit.models.generator import StagedGenerator, sample_latents

# (step, per-image MSE) after each reporting interval; return False to stop early.
Progress = Callable[[int, np.ndarray], bool]


def invert(
    generator: StagedGenerator,
    targets: torch.Tensor,
    steps: int = 300,
    learning_rate: float = 0.1,
    seed: int = 0,
    prior_weight: float = 1e-3,
    report_every: int = 10,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """targets [N, C, H, W] in [-1, 1] -> (latents [N, dim], per-image MSE [N])."""
    space = generator.spec.latent_spaces[0]
    z = torch.from_numpy(sample_latents(space, len(targets), seed)).requires_grad_(True)
    optimiser = torch.optim.Adam([z], lr=learning_rate)
    dim = float(space.dim)
    errors = np.zeros(len(targets), np.float32)
    for step in range(1, steps + 1):
        optimiser.zero_grad(set_to_none=True)
        images = generator(z)
        per_image = ((images - targets) ** 2).mean(dim=(1, 2, 3))
        # |z|^2 concentrates at dim for N(0, I): penalise drifting off that shell.
        prior = ((z.pow(2).sum(dim=1) / dim - 1.0) ** 2)
        (per_image.sum() + prior_weight * prior.sum()).backward()
        optimiser.step()
        errors = per_image.detach().numpy()
        if progress is not None and (step % report_every == 0 or step == steps):
            if not progress(step, errors):
                break
    with torch.no_grad():
        final = ((generator(z) - targets) ** 2).mean(dim=(1, 2, 3)).numpy()
    return z.detach().numpy().astype(np.float32), final.astype(np.float32)

"""Real-image editing: find the latent whose image matches a given image (GAN inversion).

Optimisation through the generator (the paper's section 4.4 uses an encoder plus this
refinement; we have no encoder for the default world, so optimisation alone): Adam on the
pixel MSE, from seeded samples of the target space. In Z a small penalty keeps z near the
prior's typical shell; W and W+ have no known density, so they start from mapped samples and
are optimised freely (W+ per row). It runs next to the generator's weights, since no gradient
crosses gRPC.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from latentedit.latents import LatentSpaceSpec
from latentedit.models.generator import StagedGenerator

# (step, per-image MSE) after each reporting interval; return False to stop early.
Progress = Callable[[int, np.ndarray], bool]


def invert(
    generator: StagedGenerator,
    space: LatentSpaceSpec,
    targets: torch.Tensor,
    steps: int = 300,
    learning_rate: float = 0.1,
    seed: int = 0,
    prior_weight: float = 1e-3,
    report_every: int = 10,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """targets [N, C, H, W] in [-1, 1] -> (latents [N, *space.shape], per-image MSE [N])."""
    z = torch.from_numpy(generator.sample(space, len(targets), seed)).requires_grad_(True)
    optimiser = torch.optim.Adam([z], lr=learning_rate)
    dim = float(space.dim)
    errors = np.zeros(len(targets), np.float32)
    for step in range(1, steps + 1):
        optimiser.zero_grad(set_to_none=True)
        images = generator.synthesize(z, space.space)
        per_image = ((images - targets) ** 2).mean(dim=(1, 2, 3))
        loss = per_image.sum()
        if space.prior == "normal":
            # |z|^2 concentrates at dim for N(0, I): penalise drifting off that shell.
            loss = loss + prior_weight * ((z.pow(2).sum(dim=1) / dim - 1.0) ** 2).sum()
        loss.backward()
        optimiser.step()
        errors = per_image.detach().numpy()
        if progress is not None and (step % report_every == 0 or step == steps):
            if not progress(step, errors):
                break
    with torch.no_grad():
        final = ((generator.synthesize(z, space.space) - targets) ** 2).mean(dim=(1, 2, 3)).numpy()
    return z.detach().numpy().astype(np.float32), final.astype(np.float32)

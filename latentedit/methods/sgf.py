"""SGF (Li, Jin, Zhu, CVPR 2021): surrogate gradient field of an auxiliary mapping F(z, c).

F is trained so that F(z, C(G(z))) = z. Along a path whose condition moves linearly from c0
to c1, dz/dt = (I - dF/dz)^-1 dF/dc (c1 - c0) (the paper's Eq. 6); Algorithm 1 integrates it
with forward Euler steps, the inverse as an m-term Neumann series, and re-measures the
condition after every step (closed loop; each step aims at the remaining gap, see `sgf_edit`). Every product with a Jacobian is a Jacobian-vector
product (`torch.func.jvp`): no Jacobian is ever built.

The Neumann series needs the spectral radius of dF/dz below 1, which spectral normalisation
gives (Lip(F) < 1 in z). AdaIN's instance normalisation divides by the feature standard
deviation and so has no Lipschitz bound; we keep AdaIN's conditioning, a per-feature scale
and shift computed from c, with the scale bounded in (0, 1), so that every layer stays a
contraction in z: Lip_z(F) <= coefficient ** depth < 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import jvp
from torch.nn.utils.parametrizations import spectral_norm


class _ScaledSpectralLinear(nn.Module):
    """A linear layer with spectral norm `coefficient` < 1 (power-iteration estimate, as in SN-GAN)."""

    def __init__(self, fan_in: int, fan_out: int, coefficient: float) -> None:
        super().__init__()
        # Several power iterations per step keep the estimate close to the moving weights.
        self.linear = spectral_norm(nn.Linear(fan_in, fan_out), n_power_iterations=3)
        self.coefficient = coefficient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coefficient * self.linear(x)

    def spectral_norm(self) -> float:
        """The exact largest singular value of the layer as applied (not the running estimate)."""
        with torch.no_grad():
            return float(self.coefficient * torch.linalg.matrix_norm(self.linear.weight, ord=2))


class _ModulatedLayer(nn.Module):
    """h -> LeakyReLU(scale(c) * W h + shift(c)), scale in (0, 1): a contraction in h for any c."""

    def __init__(self, width: int, condition_dim: int, coefficient: float) -> None:
        super().__init__()
        self.linear = _ScaledSpectralLinear(width, width, coefficient)
        self.style = _ScaledSpectralLinear(condition_dim, 2 * width, coefficient)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.style(c).chunk(2, dim=-1)
        return self.act(torch.sigmoid(scale) * self.linear(h) + shift)


class AuxiliaryMapping(nn.Module):
    """F(z, c): an MLP of `depth` layers with spectral norm on every linear layer and
    AdaIN-style conditioning on c. Inputs and outputs are batches: z [N, latent_dim], c [N, condition_dim].
    """

    def __init__(self, latent_dim: int, condition_dim: int, depth: int = 6, hidden: int = 512, coefficient: float = 0.97) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError("depth must be at least 2 (input and output layers)")
        if not 0 < coefficient < 1:
            raise ValueError("coefficient must be in (0, 1) so that F is a contraction in z")
        self.latent_dim, self.condition_dim, self.depth, self.hidden = latent_dim, condition_dim, depth, hidden
        self.coefficient = coefficient
        self.inp = _ScaledSpectralLinear(latent_dim, hidden, coefficient)
        self.inp_style = _ScaledSpectralLinear(condition_dim, hidden, coefficient)
        self.blocks = nn.ModuleList([_ModulatedLayer(hidden, condition_dim, coefficient) for _ in range(depth - 2)])
        self.out = _ScaledSpectralLinear(hidden, latent_dim, coefficient)
        self.out_shift = _ScaledSpectralLinear(condition_dim, latent_dim, coefficient)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.act(self.inp(z) + self.inp_style(c))
        for block in self.blocks:
            h = block(h, c)
        return self.out(h) + self.out_shift(c)

    def layer_spectral_norms(self) -> list[float]:
        return [m.spectral_norm() for m in self.modules() if isinstance(m, _ScaledSpectralLinear)]

    def config(self) -> dict:
        return {"latent_dim": self.latent_dim, "condition_dim": self.condition_dim, "depth": self.depth, "hidden": self.hidden}


def train_mapping(
    mapping: AuxiliaryMapping,
    latents: torch.Tensor,
    conditions: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    learning_rate: float = 2e-4,
    seed: int = 0,
    progress: Callable[[int, float], bool] | None = None,
) -> float:
    """Reconstruction training, F(z, c) -> z (MSE, Adam); returns the last 100 steps' mean loss.

    `progress(step, loss)` is called every 50 steps; returning False stops training.
    """
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(mapping.parameters(), lr=learning_rate)
    mapping.train()
    recent: list[float] = []
    for step in range(1, steps + 1):
        index = torch.randint(0, len(latents), (batch_size,), generator=generator)
        loss = torch.nn.functional.mse_loss(mapping(latents[index], conditions[index]), latents[index])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        recent = (recent + [float(loss.detach())])[-100:]
        if progress is not None and step % 50 == 0 and not progress(step, sum(recent) / len(recent)):
            break
    refresh_spectral_estimates(mapping, latents[:batch_size], conditions[:batch_size])
    return sum(recent) / max(len(recent), 1)


def refresh_spectral_estimates(mapping: AuxiliaryMapping, z: torch.Tensor, c: torch.Tensor, iterations: int = 50) -> None:
    """Run power iterations without training: the last optimiser steps leave the singular
    vector estimates a step behind the weights, which lets a layer exceed its bound slightly."""
    mapping.train()
    with torch.no_grad():
        for _ in range(iterations):
            mapping(z, c)  # each training-mode forward performs one power iteration per layer
    mapping.eval()


def surrogate_step(mapping: AuxiliaryMapping, z: torch.Tensor, c: torch.Tensor, delta_c: torch.Tensor, order: int) -> torch.Tensor:
    """One Euler step of Algorithm 1: dz = sum_{j=0..m} (dF/dz)^j dF/dc delta_c, by JVPs only."""
    _, term = jvp(lambda cc: mapping(z, cc), (c,), (delta_c,))
    total = term
    for _ in range(order):
        _, term = jvp(lambda zz: mapping(zz, c), (z,), (term,))
        total = total + term
    return total


@dataclass
class SGFStep:
    index: int
    latents: torch.Tensor
    condition: torch.Tensor
    distance: torch.Tensor  # per sample, |c - c1| (Euclidean over the condition vector)
    done: bool
    reason: str  # "", "target_reached", "step_limit", "diverged"


def sgf_edit(
    mapping: AuxiliaryMapping,
    measure: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    target: torch.Tensor,
    step_size: float = 0.2,
    order: int = 1,
    max_steps: int = 20,
    tolerance: float = 0.05,
    condition_mask: torch.Tensor | None = None,
    initial_condition: torch.Tensor | None = None,
):
    """Algorithm 1 as a generator of steps (the editor streams each as a frame).

    `measure(z)` returns C(G(z)) [N, k] (through the services in the editor). `condition_mask`
    [k] (1 = targeted) limits the stopping test to the targeted entries; the others are held at
    their start values by the target itself. Samples that reached the target stop moving.
    `initial_condition` saves one measurement when the caller already has C(G(z0)).
    """
    mapping.eval()
    with torch.no_grad():
        z = z0.clone()
        c = measure(z) if initial_condition is None else initial_condition
    mask = torch.ones(c.shape[1]) if condition_mask is None else condition_mask.to(c)
    step_length = torch.linalg.vector_norm(step_size * (target - c), dim=1, keepdim=True)
    active = torch.ones(len(z), dtype=torch.bool)

    def distance(cond: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm((cond - target) * mask, dim=1)

    yield SGFStep(0, z.clone(), c.clone(), distance(c), False, "")
    for index in range(1, max_steps + 1):
        # Algorithm 1 steps by a fixed dc = lambda (c1 - c0) and stops once close to c1; with a
        # tolerance tighter than one step it can step over the target and go on forever. We
        # aim each step at the remaining gap c1 - c_i, capped at the paper's step length.
        gap_vector = target - c
        gap_length = torch.linalg.vector_norm(gap_vector, dim=1, keepdim=True).clamp(min=1e-12)
        delta_c = gap_vector * torch.clamp(step_length / gap_length, max=1.0)
        dz = surrogate_step(mapping, z, c, delta_c, order).detach()
        z = torch.where(active[:, None], z + dz, z)
        if not torch.isfinite(z).all() or z.abs().max() > 1e3:
            yield SGFStep(index, z, c, distance(c), True, "diverged")
            return
        with torch.no_grad():
            c = measure(z)
        gap = distance(c)
        active = active & (gap > tolerance)
        if not active.any():
            yield SGFStep(index, z.clone(), c.clone(), gap, True, "target_reached")
            return
        yield SGFStep(index, z.clone(), c.clone(), gap, index == max_steps, "step_limit" if index == max_steps else "")

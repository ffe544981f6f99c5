"""SGF math on a toy world with a known answer: a linear generator and a linear scorer."""

import pytest
import torch

from latentedit.methods.sgf import AuxiliaryMapping, sgf_edit, surrogate_step, train_mapping


@pytest.fixture(scope="module")
def toy():
    """z in R^8 -> image A z in R^16 -> condition B A z in R^2; F trained on 4000 (z, c) pairs."""
    torch.manual_seed(0)
    a, b = torch.randn(16, 8) / 4, torch.randn(2, 16) / 2
    measure = lambda z: z @ a.T @ b.T  # noqa: E731
    z = torch.randn(4000, 8)
    mapping = AuxiliaryMapping(8, 2, depth=3, hidden=64, coefficient=0.95)
    loss = train_mapping(mapping, z, measure(z), steps=2000, batch_size=128, learning_rate=3e-3)
    return mapping, measure, loss


def test_mapping_reconstructs_latents_from_their_condition(toy):
    mapping, measure, loss = toy
    z = torch.randn(500, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        error = (mapping(z, measure(z)) - z).pow(2).sum(1).mean() / z.pow(2).sum(1).mean()
    # Relative squared error; a contraction in z (Lip < 1) cannot pass z through exactly.
    assert loss < 0.1 and error < 0.1, (loss, float(error))


def test_every_layer_is_a_contraction_after_training(toy):
    mapping, measure, _ = toy
    norms = mapping.layer_spectral_norms()
    assert len(norms) == 2 + 2 * 1 + 2 and max(norms) < 1.0, norms  # input, 1 modulated block, output
    # What the layer norms promise, measured on F itself: dF/dz has spectral norm below 1 everywhere
    # we look, and F moves less than z does between any two latents with the same condition.
    z = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    c = measure(z)
    for i in range(8):
        jacobian = torch.autograd.functional.jacobian(lambda zz: mapping(zz[None], c[i : i + 1])[0], z[i])
        assert torch.linalg.matrix_norm(jacobian, ord=2) < 1.0
    with torch.no_grad():
        moved = (mapping(z[:32], c[:32]) - mapping(z[32:], c[:32])).norm(dim=1)
    assert (moved < (z[:32] - z[32:]).norm(dim=1)).all()


def test_surrogate_step_matches_the_closed_form_with_the_full_jacobian(toy):
    """The JVP-only Neumann step equals (I + J_z + J_z^2) J_c dc computed from explicit Jacobians."""
    mapping, measure, _ = toy
    z = torch.randn(1, 8)
    c = measure(z)
    dc = torch.tensor([[0.3, -0.2]])
    step = surrogate_step(mapping, z, c, dc, order=2)
    jz = torch.autograd.functional.jacobian(lambda zz: mapping(zz, c)[0], z)[:, 0]
    jc = torch.autograd.functional.jacobian(lambda cc: mapping(z, cc)[0], c)[:, 0]
    first = jc @ dc[0]
    expected = first + jz @ first + jz @ (jz @ first)
    torch.testing.assert_close(step[0], expected, atol=1e-5, rtol=1e-4)
    assert torch.linalg.eigvals(jz).abs().max() < 1  # the Neumann series converges


def test_edit_reaches_a_reachable_target_within_tolerance(toy):
    mapping, measure, _ = toy
    z0 = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    target = measure(z0) + torch.tensor([1.0, -0.5])
    steps = list(sgf_edit(mapping, measure, z0, target, step_size=0.2, order=1, max_steps=40, tolerance=0.05))
    final = steps[-1]
    assert final.done and final.reason == "target_reached", (final.reason, final.distance)
    assert (final.distance <= 0.05).all()
    assert len(steps) <= 12  # about 1 / step_size Euler steps, as the ODE intends
    distances = [float(s.distance.mean()) for s in steps]
    assert distances == sorted(distances, reverse=True)  # closer after every step

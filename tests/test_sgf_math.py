"""SGF math on a toy world with a known answer: a linear generator and a linear scorer."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from latentedit.errors import FailedPrecondition
from latentedit.methods.sgf import AuxiliaryMapping, fixed_point, load_mapping, sgf_edit, surrogate_step, train_mapping
from latentedit.repository import ModelRepository

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _linear_world():
    torch.manual_seed(0)
    a, b = torch.randn(16, 8) / 4, torch.randn(2, 16) / 2
    return lambda z: z @ a.T @ b.T  # noqa: E731


@pytest.fixture(scope="module")
def toy():
    """z in R^8 -> image A z in R^16 -> condition B A z in R^2; F (the default layout: depth 6,
    F = 0.5 z + R) trained on 4000 (z, c) pairs for 600 steps."""
    measure = _linear_world()
    z = torch.randn(4000, 8)
    mapping = AuxiliaryMapping(8, 2, depth=6, hidden=64)
    loss = train_mapping(mapping, z, measure(z), steps=600, batch_size=128, learning_rate=3e-3)
    return mapping, measure, loss


def _held_out_error(mapping, measure):
    z = torch.randn(500, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float((mapping(z, measure(z)) - z).pow(2).sum(1).mean() / z.pow(2).sum(1).mean())


def test_mapping_reconstructs_latents_from_their_condition(toy):
    mapping, measure, loss = toy
    # Relative squared error on held-out pairs; a contraction in z (Lip < 1) cannot pass z through
    # exactly. c = B A z explains 2 of z's 8 dimensions. Measured: 0.13 (format 1's F = R(z, c),
    # same depth, steps and seed: 0.52; its z path passes almost nothing through).
    error = _held_out_error(mapping, measure)
    assert loss < 0.25 and error < 0.25, (loss, error)


def test_f_is_a_contraction_in_z_after_training(toy):
    mapping, measure, _ = toy
    norms = mapping.layer_spectral_norms()
    assert len(norms) == 2 + 2 * 4 + 2 and max(norms) < 1.0, norms  # input, 4 modulated blocks, output
    assert mapping.skip == 0.5 and mapping.lipschitz_bound() < 1.0, mapping.lipschitz_bound()
    # What the bound promises, measured on F itself: dF/dz has spectral norm below 1 everywhere
    # we look, and F moves less than z does between any two latents with the same condition.
    z = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    c = measure(z)
    for i in range(8):
        jacobian = torch.autograd.functional.jacobian(lambda zz: mapping(zz[None], c[i : i + 1])[0], z[i])
        assert mapping.skip < torch.linalg.matrix_norm(jacobian, ord=2) < 1.0
    with torch.no_grad():
        moved = (mapping(z[:32], c[:32]) - mapping(z[32:], c[:32])).norm(dim=1)
    assert (moved < (z[:32] - z[32:]).norm(dim=1)).all()


def test_f_has_one_fixed_point_per_condition_and_the_neumann_series_inverts(toy):
    """Banach: z -> F(z, c) has exactly one fixed point, found from any start; and (I - dF/dz) is
    invertible, its Neumann series converging to the exact solve (Eq. 6 of the paper)."""
    mapping, measure, _ = toy
    c = measure(torch.randn(4, 8, generator=torch.Generator().manual_seed(5)))
    starts = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(6)) * 3
    first, second = fixed_point(mapping, c, z0=starts[0]), fixed_point(mapping, c, z0=starts[1])
    with torch.no_grad():
        assert (mapping(first, c) - first).abs().max() < 1e-5
    torch.testing.assert_close(first, second, atol=1e-5, rtol=0)

    z = torch.randn(1, 8, generator=torch.Generator().manual_seed(7))
    c = measure(z)
    dc = torch.tensor([[0.3, -0.2]])
    jz = torch.autograd.functional.jacobian(lambda zz: mapping(zz, c)[0], z)[:, 0]
    jc = torch.autograd.functional.jacobian(lambda cc: mapping(z, cc)[0], c)[:, 0]
    exact = torch.linalg.solve(torch.eye(8) - jz, jc @ dc[0])
    torch.testing.assert_close(surrogate_step(mapping, z, c, dc, order=60)[0], exact, atol=1e-4, rtol=1e-4)
    # The default order (m = 1) keeps the direction; its length is short by about a^2 (a = 0.5).
    short = surrogate_step(mapping, z, c, dc, order=1)[0]
    assert torch.nn.functional.cosine_similarity(short, exact, dim=0) > 0.9


def test_surrogate_step_matches_the_closed_form_with_the_full_jacobian(toy):
    """The JVP-only Neumann step equals (I + J_z + J_z^2) J_c dc computed from explicit Jacobians."""
    mapping, measure, _ = toy
    z = torch.randn(1, 8, generator=torch.Generator().manual_seed(8))
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


def _write_mapping(repo, mapping, manifest_extra):
    manifest = {"kind": "mapping", "files": {"mapping": "mapping.safetensors"}, "coefficient": mapping.coefficient,
                "condition": {"kind": "attributes", "attributes": [], "mean": [0.0, 0.0], "std": [1.0, 1.0]},
                "generator": {"name": "toy", "version": 1}, **manifest_extra}
    state = {k: v.detach().contiguous() for k, v in mapping.state_dict().items()}
    return repo.write("toy-map", manifest, lambda folder: save_file(state, str(folder / "mapping.safetensors")))


def test_artifacts_name_their_format_old_ones_load_and_unknown_ones_fail_clearly(tmp_path, toy):
    trained, measure, _ = toy
    repo = ModelRepository(tmp_path)
    z = torch.randn(5, 8, generator=torch.Generator().manual_seed(9))
    c = measure(z)
    # Format 1 (no format_version): F = R(z, c), no skip term, config without `skip`.
    old = AuxiliaryMapping(8, 2, depth=3, hidden=16, coefficient=0.97, skip=0.0)
    config = {k: v for k, v in old.config().items() if k != "skip"}
    _write_mapping(repo, old, {"config": config})
    loaded = load_mapping(repo, "toy-map").mapping
    assert loaded.skip == 0.0
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, c), old.eval()(z, c))
    # Format 2: the skip travels in the config.
    _write_mapping(repo, trained, {"format_version": 2, "config": trained.config()})
    loaded = load_mapping(repo, "toy-map").mapping
    assert loaded.skip == 0.5
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, c), trained(z, c))
    # A format this build does not know: one clear line, not a state-dict error.
    entry = _write_mapping(repo, trained, {"format_version": 3, "config": trained.config()})
    with pytest.raises(FailedPrecondition, match=rf"'toy-map' v{entry.version} has format_version 3; this build reads formats 1, 2"):
        load_mapping(repo, "toy-map")
    assert json.loads((entry.path / "manifest.json").read_text())["format_version"] == 3
    assert np.isfinite(trained.lipschitz_bound())

"""W* math against problems with known answers: exact inverse and log-determinant, a toy world
where an attribute is a radial (non-linear) function of the latent, a toy perceptual distance,
and eq. 4's identity loss with a small differentiable generator and descriptor."""

import math

import numpy as np
import pytest
import torch

from latentedit.methods import wstar

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _randomised(flow: wstar.RealNVP, seed: int = 0, scale: float = 0.3) -> wstar.RealNVP:
    """The flow with every parameter random (a fresh flow is the identity: its last layers are zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return flow


@pytest.mark.parametrize("shape", [(1, 6), (3, 4)], ids=["z", "w+"])
def test_inverse_is_exact_and_a_fresh_flow_is_the_identity(shape):
    x = torch.randn(64, shape[0] * shape[1], generator=torch.Generator().manual_seed(1))
    fresh = wstar.RealNVP(shape, couplings=5, hidden=16)
    y, logdet = fresh(x)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(64))
    flow = _randomised(wstar.RealNVP(shape, couplings=5, hidden=16))
    y, _ = flow(x)
    assert (y - x).abs().max() > 0.5, "the randomised flow must move the points"
    np.testing.assert_allclose(flow.inverse(y).detach(), x, atol=1e-5, rtol=0)
    np.testing.assert_allclose(flow(flow.inverse(x))[0].detach(), x, atol=1e-5, rtol=0)
    flow, x = flow.double(), x.double()  # in float64 the round trip is exact to float64 precision
    np.testing.assert_allclose(flow.inverse(flow(x)[0]).detach(), x, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(1, 5), (2, 3)], ids=["z", "w+"])
def test_log_determinant_matches_autograd_jacobian(shape):
    flow = _randomised(wstar.RealNVP(shape, couplings=4, hidden=8), seed=2).double()
    x = torch.randn(5, shape[0] * shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _, logdet = flow(x)
    for i in range(len(x)):
        jacobian = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], x[i])
        sign, expected = torch.linalg.slogdet(jacobian)
        assert float(sign) > 0
        assert float(logdet[i].detach()) == pytest.approx(float(expected), abs=1e-10)


def test_masks_alternate_and_mix_rows_in_w_plus():
    z_masks = [wstar.coupling_mask((1, 6), i) for i in range(4)]
    assert z_masks[0].tolist() == [1, 0, 1, 0, 1, 0] and torch.equal(z_masks[1], 1 - z_masks[0])
    w_masks = [wstar.coupling_mask((2, 4), i).reshape(2, 4) for i in range(4)]
    assert w_masks[0][0].tolist() == [1, 0, 1, 0] and w_masks[0][1].tolist() == [1, 0, 1, 0]  # within rows
    assert w_masks[2][0].tolist() == [1, 1, 1, 1] and w_masks[2][1].tolist() == [0, 0, 0, 0]  # across rows
    assert torch.equal(w_masks[3], 1 - w_masks[2])


def test_attribute_loss_is_summed_bce():
    proxy = torch.randn(10, 3)
    zero = wstar.LinearClassifiers(np.zeros((2, 3), np.float32), np.zeros(2, np.float32))
    labels = torch.randint(0, 2, (10, 2)).float()
    assert float(wstar.attribute_loss(proxy, zero, labels)) == pytest.approx(2 * math.log(2), rel=1e-6)
    w = wstar.LinearClassifiers(np.array([[1.0, 0, 0]], np.float32), np.array([0.5], np.float32))
    p = torch.sigmoid(proxy[:, 0] + 0.5)
    y = labels[:, :1]
    brute = -(y[:, 0] * torch.log(p) + (1 - y[:, 0]) * torch.log(1 - p)).mean()
    assert float(wstar.attribute_loss(proxy, w, y)) == pytest.approx(float(brute), rel=1e-5)


def test_distance_loss_and_scale_by_definition():
    x = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0))
    targets = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(1))
    brute = np.mean([(float(((x[b, i] - x[b, j]) ** 2).mean()) - float(targets[b, i, j])) ** 2
                     for b in range(2) for i in range(4) for j in range(i + 1, 4)])
    assert float(wstar.distance_loss(x, targets)) == pytest.approx(brute, rel=1e-5)
    assert wstar.perceptual_scale(np.array([2.0, 4.0]), np.array([0.1, 0.2])) == pytest.approx(20.0)


def _radial_world(n, dim, seed):
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    radius = x[:, 0] ** 2 + x[:, 1] ** 2
    labels = (radius > 2 * math.log(2)).float()[:, None]  # the median of a chi^2 with 2 degrees of freedom
    return x, labels


def test_flow_makes_a_radial_attribute_linearly_separable():
    """y = [z0^2 + z1^2 > median]: no hyperplane separates it in z; after T a fresh linear
    classifier does, on held-out samples (and so does the frozen one fitted in z)."""
    x, y = _radial_world(3000, 4, 0)
    test_x, test_y = _radial_world(1000, 4, 1)
    classifiers = wstar.fit_classifiers(x.numpy(), y.numpy())
    before = wstar.fresh_linear_accuracy(x.numpy(), y.numpy(), test_x.numpy(), test_y.numpy())[0]
    assert before < 0.6
    flow = wstar.RealNVP((1, 4), couplings=4, hidden=64)
    options = wstar.FlowOptions(distance_weight=0.0, steps=400, batch_size=128, learning_rate=5e-3)
    wstar.fit_flow(flow, classifiers, x, y, None, None, options)
    proxy, proxy_test = wstar.apply_flow(flow, x.numpy()), wstar.apply_flow(flow, test_x.numpy())
    after = wstar.fresh_linear_accuracy(proxy, y.numpy(), proxy_test, test_y.numpy())[0]
    print(f"held-out linear accuracy {before:.3f} -> {after:.3f}")
    assert after > 0.9, (before, after)
    assert classifiers.accuracy(proxy_test, test_y.numpy())[0] > 0.9
    # T pushes the classes far apart (|T(z)| ~ 1e2-1e3): the round trip is exact in float64.
    flow = flow.double()
    with torch.no_grad():
        np.testing.assert_allclose(flow.inverse(flow(test_x.double())[0]), test_x.double(), atol=1e-9)


def _toy_perceptual(x):
    """A known non-Euclidean 'perceptual' embedding: D = mean squared difference of f(z)."""
    return torch.stack([2.0 * x[:, 0], x[:, 1] + 0.5 * x[:, 0] ** 2, 0.5 * x[:, 2], x[:, 3]], dim=1)


def _block_targets(x, blocks):
    f = _toy_perceptual(x)
    return torch.stack([wstar.pairwise_latent_distance(f[b]) for b in blocks])


def test_distance_unfolding_drives_the_gap_down():
    x = torch.randn(1600, 4, generator=torch.Generator().manual_seed(0))
    blocks = torch.arange(1600).reshape(-1, 8)
    targets = _block_targets(x, blocks)
    test_x = torch.randn(800, 4, generator=torch.Generator().manual_seed(1))
    test_blocks = torch.arange(800).reshape(-1, 8)
    test_targets = _block_targets(test_x, test_blocks).numpy()
    zero = wstar.LinearClassifiers(np.zeros((1, 4), np.float32), np.zeros(1, np.float32))  # L_a constant
    labels = torch.zeros(1600, 1)

    def gap(points):
        lat, per = wstar.block_pairs(test_blocks.numpy(), points, test_targets)
        return float(np.mean((lat - per) ** 2))

    before = gap(test_x.numpy())
    flow = wstar.RealNVP((1, 4), couplings=4, hidden=64)
    options = wstar.FlowOptions(distance_weight=1.0, steps=300, batch_size=64, learning_rate=5e-3)
    wstar.fit_flow(flow, zero, x, labels, blocks, targets, options)
    after = gap(wstar.apply_flow(flow, test_x.numpy()))
    print(f"mean squared latent-perceptual gap {before:.3f} -> {after:.3f}")
    assert after < before / 5, (before, after)


class _TinyGenerator(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.weight = torch.randn(dim, 3 * 8 * 8, generator=g) * 0.3

    def forward(self, z):
        return torch.sigmoid(z @ self.weight).reshape(len(z), 3, 8, 8)


class _TinyDescriptor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 128)

    def forward(self, images):
        return self.fc(torch.tanh(self.conv(images)).flatten(1))


def test_identity_loss_is_eq_4_and_training_on_it_lowers_it():
    render, descriptor = _TinyGenerator(6), _TinyDescriptor()
    for p in descriptor.parameters():
        p.requires_grad_(False)
    z = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    flow = _randomised(wstar.RealNVP((1, 6), couplings=4, hidden=16), scale=0.1)
    assert float(wstar.identity_loss(flow, z, render, descriptor, 0.0).detach()) < 1e-8
    rng = torch.Generator().manual_seed(1)
    loss = wstar.identity_loss(flow, z, render, descriptor, 0.5, rng)
    eps = torch.randn(32, 6, generator=torch.Generator().manual_seed(1)) * 0.5
    moved = flow.inverse(flow(z)[0] + eps)
    brute = ((descriptor(render(moved)) - descriptor(render(z))) ** 2).sum(1).mean()
    assert loss.item() == pytest.approx(brute.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in flow.parameters()) and sum(float(p.grad.abs().sum()) for p in flow.parameters()) > 0

    def measure(f):
        with torch.no_grad():
            return float(np.mean([float(wstar.identity_loss(f, z, render, descriptor, 0.5, torch.Generator().manual_seed(s)))
                                  for s in range(5)]))

    before = measure(flow)
    zero = wstar.LinearClassifiers(np.zeros((1, 6), np.float32), np.zeros(1, np.float32))
    options = wstar.FlowOptions(distance_weight=0.0, identity_weight=1.0, identity_noise=0.5, identity_batch=32,
                                steps=120, batch_size=32, learning_rate=2e-2)
    wstar.fit_flow(flow, zero, z, torch.zeros(32, 1), None, None, options,
                   identity=lambda f, rows, g: wstar.identity_loss(f, rows, render, descriptor, 0.5, g))
    after = measure(flow)
    print(f"identity loss {before:.4f} -> {after:.4f}")
    assert after < before / 3

"""InterFaceGAN math on problems with a known answer."""

import numpy as np
import pytest

from latentedit.errors import InvalidArgument
from latentedit.latents import Latents, LatentSpaceSpec
from latentedit.methods import interfacegan as ifg


def _toy(n=4000, dim=20, seed=0):
    """Latents ~ N(0, I); the attribute is a noisy linear function along a known unit direction."""
    rng = np.random.default_rng(seed)
    truth = rng.standard_normal(dim)
    truth /= np.linalg.norm(truth)
    z = rng.standard_normal((n, dim)).astype(np.float32)
    score = z @ truth + 0.1 * rng.standard_normal(n)
    return z, score, truth


def test_protocol_recovers_the_true_direction():
    z, score, truth = _toy()
    keeper = ifg.ExtremeKeeper(keep=200)
    for start in range(0, len(z), 500):  # streamed in batches, as the trainer does
        keeper.add(score[start : start + 500], z[start : start + 500])
    latents, labels, kept_scores = keeper.dataset()
    assert len(latents) == 400 and labels.sum() == 200
    assert kept_scores[:200].min() >= np.sort(score)[-200] - 1e-9  # exactly the top 200
    fit = ifg.fit_boundary(latents, labels, validation_fraction=0.3)
    assert fit.num_train == 280 and fit.num_validation == 120
    assert fit.validation_accuracy > 0.97
    assert abs(np.linalg.norm(fit.boundary.normal) - 1) < 1e-6
    assert fit.boundary.normal @ truth > 0.95
    all_acc = ifg.accuracy(fit.boundary, z, score > np.median(score))
    assert 0.85 < all_acc <= 1.0


def test_editing_moves_the_attribute_linearly():
    z, score, truth = _toy()
    boundary = ifg.Boundary(truth.astype(np.float32), 0.0)
    start = Latents(LatentSpaceSpec("z", 20), z[:5])
    frames = np.stack([f.values for f in ifg.trajectory(start, boundary.normal, np.linspace(-2, 2, 5))])
    assert frames.shape == (5, 5, 20)
    np.testing.assert_allclose(frames[:, 0] @ truth - z[0] @ truth, np.linspace(-2, 2, 5), atol=1e-5)
    from_boundary = ifg.trajectory(start, boundary.normal, np.array([0.0, 1.5]), boundary=boundary)
    np.testing.assert_allclose(boundary.distance(from_boundary[1].values), 1.5, atol=1e-5)


def test_conditioning_projects_out_every_condition_exactly():
    rng = np.random.default_rng(1)
    n, c1, c2 = (rng.standard_normal(30) for _ in range(3))
    direction = ifg.conditioned_direction(n, [c1, c2])
    assert abs(direction @ c1) < 1e-5 and abs(direction @ c2) < 1e-5
    assert abs(np.linalg.norm(direction) - 1) < 1e-6
    assert direction @ n > 0  # still the primary attribute's way
    # Repeated subtraction would leave a component along c1 when c1, c2 are not orthogonal.
    with pytest.raises(InvalidArgument, match="span of the condition"):
        ifg.conditioned_direction(c1 + c2, [c1, c2])


def test_label_errors_are_precise():
    z = np.zeros((10, 3), np.float32)
    with pytest.raises(InvalidArgument, match="9 labels for 10 latents"):
        ifg.fit_boundary(z, np.zeros(9))
    with pytest.raises(InvalidArgument, match="both classes"):
        ifg.fit_boundary(z, np.ones(10))


def test_cosine_tracks_score_correlation():
    rng = np.random.default_rng(2)
    a = rng.standard_normal(10)
    b = a + 0.5 * rng.standard_normal(10)
    c = rng.standard_normal(10)
    z = rng.standard_normal((5000, 10))
    cos = ifg.cosine_matrix([a, b, c])
    corr = ifg.correlation_matrix(np.stack([z @ a, z @ b, z @ c], axis=1))
    # For linear attributes of an isotropic Gaussian, correlation equals the normals' cosine.
    np.testing.assert_allclose(cos, corr, atol=0.03)


def _identified(n, dim=4):
    """Latents whose entries are their row number, so that a kept latent tells which sample it was."""
    return np.repeat(np.arange(n, dtype=np.float32)[:, None], dim, axis=1)


def test_too_few_samples_for_both_ends_are_each_kept_once():
    """A quality filter can leave fewer than 2 * keep samples: each is kept once, the upper half as positives."""
    score = np.random.default_rng(3).standard_normal(150)
    keeper = ifg.ExtremeKeeper(keep=100)
    keeper.add(score, _identified(150))
    latents, labels, kept_scores = keeper.dataset()
    ids = latents[:, 0].astype(int)
    assert len(ids) == len(set(ids)) == len(keeper) == 150
    assert labels.sum() == 75
    assert kept_scores[labels == 1].min() > kept_scores[labels == 0].max()
    np.testing.assert_array_equal(kept_scores, score[ids])


def test_threshold_labels_the_kept_extremes_by_their_score():
    score = np.random.default_rng(4).permutation(100).astype(np.float64)
    keeper = ifg.ExtremeKeeper(keep=20)
    keeper.add(score, _identified(100))
    latents, labels = ifg.kept_labels(keeper, threshold=90.0)
    kept = score[latents[:, 0].astype(int)]
    assert sorted(kept) == list(range(20)) + list(range(80, 100))  # still the ranking's two ends
    np.testing.assert_array_equal(labels, kept > 90)  # 91..99: 9 positives, not the top 20
    assert labels.sum() == 9
    with pytest.raises(InvalidArgument, match="threshold 200: every kept sample scores on one side"):
        ifg.kept_labels(keeper, threshold=200.0)


def test_quality_filter_drops_low_and_unknown_quality():
    values = np.array([1.0, 2.0, 3.0, 4.0])
    filtered = ifg.quality_filtered(values, np.array([0.99, 0.5, np.nan, 0.9]), quality_min=0.9)
    np.testing.assert_array_equal(np.isnan(filtered), [False, True, True, False])
    np.testing.assert_array_equal(filtered[[0, 3]], [1.0, 4.0])

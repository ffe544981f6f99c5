"""D_perceptual (latentedit.perceptual) ranks known distortions of increasing strength in order."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from latentedit.perceptual import PerceptualDistance, from_uint8

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def distance(installed_repo):
    return PerceptualDistance.from_repository(installed_repo)


@pytest.fixture(scope="module")
def faces(face_latents_and_images):
    return from_uint8(face_latents_and_images[1][:24])


def _blur(images, sigma):
    radius = int(np.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _noise(images, std):
    return (images + std * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)


def _shift(images, pixels):
    # Shifted content with the border replicated (no wrap-around).
    padded = F.pad(images, (pixels, 0, pixels, 0), mode="replicate")
    return padded[..., : images.shape[2], : images.shape[3]]


@pytest.mark.parametrize("distort, strengths", [(_blur, (0.5, 1.0, 2.0, 3.0)), (_noise, (0.02, 0.05, 0.1, 0.2)),
                                                (_shift, (1, 2, 4, 8))], ids=["blur", "noise", "shift"])
def test_distortions_of_increasing_strength_rank_in_order(distance, faces, distort, strengths):
    with torch.no_grad():
        values = torch.stack([distance(faces, distort(faces, s)) for s in strengths])  # [S, N]
    means = values.mean(1)
    assert (means[1:] > means[:-1]).all(), means
    per_image = (values[1:] > values[:-1]).all(0).float().mean()
    assert per_image >= 0.9, f"only {per_image:.2f} of the faces rank every strength in order"
    assert float(values.min()) > 0


def test_pairwise_matches_pairs_and_is_a_semi_metric(distance, faces):
    images = faces[:6]
    with torch.no_grad():
        matrix = distance.pairwise(images)
        direct = distance(images[[0, 1, 2]], images[[3, 4, 5]])
    np.testing.assert_allclose(matrix[[0, 1, 2], [3, 4, 5]], direct, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-6)
    assert float(matrix.diagonal().abs().max()) < 1e-5 and 0 < float(matrix.max()) <= 4


def test_gradients_reach_the_images(distance, faces):
    a = faces[:2].clone().requires_grad_(True)
    distance(a, _blur(faces[:2], 1.0)).sum().backward()
    assert a.grad is not None and float(a.grad.abs().sum()) > 0

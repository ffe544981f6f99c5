"""The DCGAN port and its backends against known answers."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from generator_svc.backends import OnnxRuntimeBackend, TorchBackend, cached_onnx_export
from latentedit.models.generator import IMAGE_LAYER, INPUT_LAYER, sample_latents
from latentedit.models.registry import load_generator


@pytest.fixture(scope="module")
def model(installed_repo):
    return load_generator(installed_repo.resolve("dcgan-faces"))


def test_port_matches_the_packages_own_network(model):
    """The package's models.py with its checkpoint is the reference the port must reproduce."""
    from gan_face_generate.models import Generator

    package_dir = Path(importlib.util.find_spec("gan_face_generate").submodule_search_locations[0])
    reference = Generator(0, 3, 100, 64)
    state = torch.load(package_dir / "weights.tar", map_location="cpu", weights_only=True)["netG_state_dict"]
    reference.load_state_dict(state)
    reference.eval()
    z = torch.from_numpy(sample_latents(model.spec.latent_spaces[0], 8, seed=3))
    with torch.no_grad():
        np.testing.assert_allclose(model(z).numpy(), reference(z[:, :, None, None]).numpy(), atol=1e-6)


def test_partial_forward_composes(model):
    """G2(G1(z)) == G(z) for every split layer: features out and back in lose nothing."""
    z = torch.from_numpy(sample_latents(model.spec.latent_spaces[0], 4, seed=0))
    with torch.no_grad():
        full = model(z)
        for layer in [l.name for l in model.spec.layers[1:-1]]:
            features = model.run(z, INPUT_LAYER, [layer])[layer]
            assert tuple(features.shape[1:]) == model.spec.layers[model.spec.layer_index(layer)].shape
            rebuilt = model.run(features, layer, [IMAGE_LAYER])[IMAGE_LAYER]
            torch.testing.assert_close(rebuilt, full)


def test_sampling_is_seeded(model):
    space = model.spec.latent_spaces[0]
    np.testing.assert_array_equal(sample_latents(space, 5, 11), sample_latents(space, 5, 11))
    assert not np.array_equal(sample_latents(space, 5, 11), sample_latents(space, 5, 12))
    draws = sample_latents(space, 4000, 0)
    assert abs(draws.mean()) < 0.01 and abs(draws.std() - 1) < 0.01


def test_onnxruntime_matches_torch(model, installed_repo):
    weights_sha = installed_repo.resolve("dcgan-faces").manifest["sha256"]["weights"]
    path = cached_onnx_export(model, installed_repo, weights_sha, opset=17)
    assert cached_onnx_export(model, installed_repo, weights_sha, opset=17) == path  # cached
    onnx_backend, torch_backend = OnnxRuntimeBackend(path), TorchBackend(model)
    for batch in (1, 7, 64):
        z = sample_latents(model.spec.latent_spaces[0], batch, seed=batch)
        a = onnx_backend.run(z, INPUT_LAYER, [IMAGE_LAYER])[IMAGE_LAYER]
        b = torch_backend.run(z, INPUT_LAYER, [IMAGE_LAYER])[IMAGE_LAYER]
        assert a.shape == (batch, 3, 64, 64)
        assert np.abs(a - b).max() < 1e-3


@pytest.mark.gpu
def test_cuda_fp16_close_to_cpu_fp32(model):
    z = sample_latents(model.spec.latent_spaces[0], 16, seed=0)
    cpu = TorchBackend(model, "cpu").run(z, INPUT_LAYER, [IMAGE_LAYER])[IMAGE_LAYER]
    gpu32 = TorchBackend(load_generator_copy(model), "cuda", fp16=False).run(z, INPUT_LAYER, [IMAGE_LAYER])[IMAGE_LAYER]
    gpu16 = TorchBackend(load_generator_copy(model), "cuda", fp16=True).run(z, INPUT_LAYER, [IMAGE_LAYER])[IMAGE_LAYER]
    assert np.abs(gpu32 - cpu).max() < 1e-3
    assert np.abs(gpu16 - cpu).max() < 5e-2


def load_generator_copy(model):
    import copy

    return copy.deepcopy(model)

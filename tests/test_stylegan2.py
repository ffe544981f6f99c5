"""StyleGAN2: the model's spaces, truncation, noise and staged layers (known answers), its ONNX
export against torch in Z, W and W+, and serving through real gRPC stubs (a tiny randomly
initialised 64 px model installed in a fresh repository)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from generator_svc.backends import OnnxRuntimeBackend, TorchBackend, export_onnx
from latentedit import wire
from latentedit.api.v1 import generator_pb2, generator_pb2_grpc, types_pb2
from latentedit.errors import InvalidArgument
from latentedit.models.generator import IMAGE_LAYER, INPUT_LAYER
from latentedit.models.stylegan2 import StyleGAN2Generator, default_channels, install_stylegan2, random_stylegan2
from latentedit.rpc.serving import channel_options
from tests.conftest import make_config

TINY = dict(resolution=64, z_dim=24, w_dim=32, mapping_layers=2, max_channels=16)
Z, W, W_PLUS = (wire.space_code(s) for s in ("z", "w", "w+"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny():
    return random_stylegan2(seed=1, **TINY)


# ---- the model ---------------------------------------------------------------------------------


def test_architecture_for_every_resolution_and_channel_multiplier():
    assert default_channels(1024, 2) == [512, 512, 512, 512, 512, 256, 128, 64, 32]
    assert default_channels(256, 1) == [512, 512, 512, 512, 256, 128, 64]
    for resolution in (64, 128, 256, 512, 1024):
        model = StyleGAN2Generator(resolution=resolution, z_dim=8, w_dim=8, mapping_layers=1, max_channels=2)
        names = [layer.name for layer in model.spec.layers]
        assert model.num_ws == 2 * int(np.log2(resolution)) - 2
        assert names == ["input", *[f"b{2 ** k}" for k in range(2, int(np.log2(resolution)))], "image"]
        assert model.spec.space("w+").shape == (model.num_ws, 8) and model.spec.layers[-1].shape == (3, resolution, resolution)


def test_staged_split_at_every_layer_loses_nothing(tiny):
    ws = torch.randn(3, tiny.num_ws, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = tiny(ws)
        assert full.shape == (3, 3, 64, 64)
        for layer in tiny.spec.layers[1:-1]:
            features = tiny.run(ws, INPUT_LAYER, [layer.name])[layer.name]
            assert tuple(features.shape[1:]) == layer.shape
            torch.testing.assert_close(tiny.run(features, layer.name, [IMAGE_LAYER])[IMAGE_LAYER], full, rtol=0, atol=1e-5)


def test_w_plus_rows_each_drive_their_own_layers(tiny):
    w = tiny.map_latents(torch.randn(1, 24, generator=torch.Generator().manual_seed(2)), "w")
    with torch.no_grad():
        broadcast = tiny.synthesize(w, "w")
        torch.testing.assert_close(tiny.synthesize(w[:, None].expand(-1, tiny.num_ws, -1), "w+"), broadcast)
        # changing only the last row (the last toRGB's style) changes the image but not the b32 features
        ws = w[:, None].repeat(1, tiny.num_ws, 1)
        ws[:, -1] += 3.0
        assert (tiny.synthesize(ws, "w+") - broadcast).abs().max() > 1e-3
        before = tiny.run(tiny.latents_to_input(w, "w"), INPUT_LAYER, ["b32"])["b32"][:, :16]
        after = tiny.run(ws, INPUT_LAYER, ["b32"])["b32"][:, :16]
        torch.testing.assert_close(before, after)


def test_truncation_psi_zero_gives_w_avg_and_one_changes_nothing(tiny):
    w_space, plus = tiny.spec.space("w"), tiny.spec.space("w+")
    avg = tiny.mapping.w_avg.numpy()
    np.testing.assert_allclose(tiny.sample(w_space, 4, 3, truncation_psi=0.0), np.broadcast_to(avg, (4, 32)), atol=1e-6)
    np.testing.assert_allclose(tiny.sample(plus, 2, 3, truncation_psi=0.0), np.broadcast_to(avg, (2, tiny.num_ws, 32)),
                               atol=1e-6)
    free = tiny.sample(w_space, 4, 3)
    np.testing.assert_allclose(tiny.sample(w_space, 4, 3, truncation_psi=0.5), avg + 0.5 * (free - avg), atol=1e-5)
    cut = tiny.sample(plus, 2, 3, truncation_psi=0.0, truncation_cutoff=4)  # rows 0-3 truncated, the rest not
    np.testing.assert_allclose(cut[:, :4], np.broadcast_to(avg, (2, 4, 32)), atol=1e-6)
    np.testing.assert_allclose(cut[:, 4:], tiny.sample(plus, 2, 3)[:, 4:], atol=1e-6)
    with pytest.raises(InvalidArgument, match="W or W\\+"):
        tiny.sample(tiny.spec.space("z"), 2, 3, truncation_psi=0.5)
    # w_avg is the mean of W: tracked during training, estimated for a fresh model
    w = tiny.map_latents(torch.randn(4096, 24, generator=torch.Generator().manual_seed(9)), "w")
    assert (w.mean(0) - tiny.mapping.w_avg).norm() < 0.1 * w.std(0).norm()


def test_noise_is_fixed_per_seed_or_zero():
    a, b = random_stylegan2(seed=1, **TINY), random_stylegan2(seed=1, **TINY)
    ws = torch.randn(2, a.num_ws, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        const = a(ws)
        torch.testing.assert_close(a(ws), const)  # const noise: deterministic
        torch.testing.assert_close(b(ws), const)
        b.reset_noise(7)
        assert (b(ws) - const).abs().max() > 1e-3
        a.set_noise_mode("zero")
        zero = a(ws)
        for layer in a.noise_layers():
            layer.noise_strength.zero_()
        a.set_noise_mode("const")
        torch.testing.assert_close(a(ws), zero)  # "zero" equals no noise at all
    with pytest.raises(InvalidArgument, match="noise_mode"):
        a.set_noise_mode("random")


def test_onnx_export_matches_torch_in_z_w_and_w_plus(tiny, tmp_path):
    path = tmp_path / "tiny.onnx"
    path.write_bytes(export_onnx(tiny, opset=17))
    onnx_backend, torch_backend = OnnxRuntimeBackend(path, threads=1), TorchBackend(tiny)
    for space, batch in (("z", 1), ("w", 5), ("w+", 3)):
        latents = tiny.sample(tiny.spec.space(space), batch, seed=batch)
        if space == "w+":
            latents = latents + np.random.default_rng(0).normal(0, 0.5, latents.shape).astype(np.float32)  # rows differ
        with torch.no_grad():
            x = tiny.latents_to_input(torch.from_numpy(latents), space).numpy()
        a = onnx_backend.run(x, INPUT_LAYER, [IMAGE_LAYER])[IMAGE_LAYER]
        b = torch_backend.run(x, INPUT_LAYER, [IMAGE_LAYER])[IMAGE_LAYER]
        assert a.shape == (batch, 3, 64, 64)
        assert np.abs(a - b).max() < 1e-4, space


# ---- serving through real stubs -------------------------------------------------------------

SG2, NO_AVG = "sg2-tiny", "sg2-no-avg"


@pytest.fixture(scope="module")
def served(installed_repo, tmp_path_factory):
    """A generator service over a repository copy with two tiny StyleGAN2s installed."""
    import shutil

    from generator_svc.server import build
    from latentedit.install import link_or_copy
    from latentedit.repository import ModelRepository

    root = tmp_path_factory.mktemp("sg2") / "repo"
    shutil.copytree(installed_repo.root, root, ignore=shutil.ignore_patterns(".cache", ".jobs"), copy_function=link_or_copy)
    repo = ModelRepository(root)
    model = random_stylegan2(seed=1, **TINY)
    install_stylegan2(repo, SG2, model, {"note": "random test model"})
    no_avg = random_stylegan2(seed=2, **TINY, has_w_avg=False)
    install_stylegan2(repo, NO_AVG, no_avg, {"note": "random test model, no w_avg"})
    host, pool = build(make_config(repo, threads=1))
    channel = grpc.insecure_channel(f"localhost:{host.port}", options=channel_options())
    yield generator_pb2_grpc.GeneratorServiceStub(channel), model
    channel.close()
    host.stop(0)


def _ref(name=SG2):
    return types_pb2.ModelRef(name=name)


def _latents(space_code, values):
    return types_pb2.Latents(space=space_code, values=wire.to_tensor(np.asarray(values, np.float32)))


def _images(stub, space_code, values, backend=types_pb2.BACKEND_UNSPECIFIED, name=SG2):
    response = stub.Synthesize(generator_pb2.SynthesizeRequest(model=_ref(name), latents=_latents(space_code, values),
                                                               backend=backend), timeout=60)
    return wire.decode_images(response.images), response.backend


def test_list_models_reports_spaces_num_ws_truncation_and_layers(served):
    stub, model = served
    models = {m.ref.name: m for m in stub.ListModels(generator_pb2.ListModelsRequest(), timeout=60).models}
    info = models[SG2]
    assert info.architecture == "stylegan2" and info.resolution == 64 and info.supports_truncation
    spaces = [(s.space, s.dim, s.num_ws, s.prior) for s in info.latent_spaces]
    assert spaces == [(Z, 24, 1, "normal"), (W, 32, 1, ""), (W_PLUS, 32, 10, "")]
    assert [layer.name for layer in info.layers] == ["input", "b4", "b8", "b16", "b32", "image"]
    assert list(info.layers[0].shape) == [10, 32] and list(info.layers[-1].shape) == [3, 64, 64]
    assert types_pb2.BACKEND_ONNXRUNTIME in info.backends and types_pb2.BACKEND_TORCH in info.backends
    assert not models[NO_AVG].supports_truncation


def test_sample_z_w_and_w_plus_seeded_and_truncated(served):
    stub, model = served

    def sample(space, psi=0.0, seed=5):
        response = stub.Sample(generator_pb2.SampleRequest(model=_ref(), space=space, count=3, seed=seed,
                                                           truncation_psi=psi), timeout=60)
        assert response.latents.space == space
        return wire.from_tensor(response.latents.values, field="latents")

    z, w, plus = sample(Z), sample(W), sample(W_PLUS)
    assert z.shape == (3, 24) and w.shape == (3, 32) and plus.shape == (3, 10, 32)
    np.testing.assert_array_equal(sample(W), w)  # seeded
    assert not np.array_equal(sample(W, seed=6), w)
    with torch.no_grad():
        np.testing.assert_allclose(w, model.map_latents(torch.from_numpy(z), "w").numpy(), atol=1e-5)  # W = mapping(Z)
    np.testing.assert_allclose(plus, np.broadcast_to(w[:, None], plus.shape), atol=1e-6)
    avg = model.mapping.w_avg.numpy()
    np.testing.assert_allclose(sample(W, psi=0.5), avg + 0.5 * (w - avg), atol=1e-5)


def test_synthesize_accepts_z_w_and_w_plus_on_torch_and_onnxruntime(served):
    stub, model = served
    z = model.sample(model.spec.space("z"), 2, 3)
    with torch.no_grad():
        w = model.map_latents(torch.from_numpy(z), "w").numpy()
    rows = np.repeat(w[:, None], 10, axis=1)
    images = {}
    for backend in (types_pb2.BACKEND_TORCH, types_pb2.BACKEND_ONNXRUNTIME):
        for space, values in ((Z, z), (W, w), (W_PLUS, rows)):
            images[backend, space], used = _images(stub, space, values, backend)
            assert used == backend and images[backend, space].shape == (2, 64, 64, 3)
    reference = images[types_pb2.BACKEND_TORCH, W_PLUS].astype(int)
    for key, image in images.items():
        assert np.abs(image.astype(int) - reference).max() <= 1, key
    # the images are the model's own
    with torch.no_grad():
        expected = wire.float_to_uint8_images(model(torch.from_numpy(rows)).numpy()).astype(int)
    assert np.abs(reference - expected).max() <= 1


def test_features_at_a_block_and_back_give_the_same_image(served):
    stub, model = served
    w = model.sample(model.spec.space("w"), 2, 8)
    first = stub.Synthesize(generator_pb2.SynthesizeRequest(model=_ref(), latents=_latents(W, w), return_layers=["b16"]),
                            timeout=60)
    features = first.features[0]
    assert features.layer == "b16" and list(features.values.shape) == [2, *model.spec.layers[3].shape]
    second = stub.Synthesize(generator_pb2.SynthesizeRequest(model=_ref(), features=features), timeout=60)
    np.testing.assert_array_equal(wire.decode_images(second.images), wire.decode_images(first.images))


def _bad(stub, method, request, code, text):
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, method)(request, timeout=60)
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details(), info.value.details()
    # still serving
    ok = stub.Synthesize(generator_pb2.SynthesizeRequest(model=_ref(), latents=_latents(W, np.zeros((1, 32)))), timeout=60)
    assert wire.decode_images(ok.images).shape == (1, 64, 64, 3)


def test_bad_input_gets_precise_codes_and_the_service_keeps_serving(served):
    stub, _ = served
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    _bad(stub, "Synthesize", generator_pb2.SynthesizeRequest(model=_ref(), latents=_latents(W_PLUS, np.zeros((2, 8, 32)))),
         invalid, "have num_ws = 10 rows of 32; these have 8 rows")
    _bad(stub, "Synthesize", generator_pb2.SynthesizeRequest(model=_ref(), latents=_latents(W, np.zeros((2, 24)))),
         invalid, "shape [2, 24] is that of LATENT_SPACE_Z latents of sg2-tiny, but latents.space is LATENT_SPACE_W")
    _bad(stub, "Sample", generator_pb2.SampleRequest(model=_ref(), space=Z, count=2, truncation_psi=0.7),
         invalid, "truncation_psi acts in W or W+")
    _bad(stub, "Sample", generator_pb2.SampleRequest(model=_ref(NO_AVG), space=W, count=2, truncation_psi=0.7),
         invalid, "does not support truncation: its checkpoint has no w_avg")
    _bad(stub, "Sample", generator_pb2.SampleRequest(model=_ref(), space=W, count=2, truncation_psi=float("nan")),
         invalid, "must be finite")
    _bad(stub, "Synthesize", generator_pb2.SynthesizeRequest(model=_ref(), latents=_latents(W, np.zeros((1, 32))),
                                                             return_layers=["b64"]),
         not_found, "unknown layer 'b64'; layers: input, b4, b8, b16, b32, image")
    _bad(stub, "Synthesize", generator_pb2.SynthesizeRequest(
        model=_ref(), features=types_pb2.LayerFeatures(layer="conv3", values=wire.to_tensor(np.zeros((1, 4), np.float32)))),
         not_found, "unknown layer 'conv3'")

"""GeneratorService through real stubs on an in-process server."""

import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from latentedit import wire
from latentedit.api.v1 import generator_pb2, generator_pb2_grpc, types_pb2

MODEL = types_pb2.ModelRef(name="dcgan-faces")


@pytest.fixture(scope="module")
def stub(generator_channel):
    return generator_pb2_grpc.GeneratorServiceStub(generator_channel)


def _latents(array, space=types_pb2.LATENT_SPACE_Z):
    return types_pb2.Latents(space=space, values=wire.to_tensor(array))


def _synthesize(stub, array, **kwargs):
    return stub.Synthesize(generator_pb2.SynthesizeRequest(model=MODEL, latents=_latents(array), **kwargs), timeout=30)


def _assert_still_serving(stub):
    images = wire.decode_images(_synthesize(stub, np.zeros((2, 100), np.float32)).images)
    assert images.shape == (2, 64, 64, 3)


def test_health_reports_serving_once_warm(generator_channel):
    health = health_pb2_grpc.HealthStub(generator_channel)
    for service in ("", "latentedit.v1.GeneratorService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_list_models_describes_the_default_generator(stub):
    (info,) = stub.ListModels(generator_pb2.ListModelsRequest(), timeout=10).models
    assert info.ref.name == "dcgan-faces" and info.ref.version == 1 and info.architecture == "dcgan"
    assert [(s.space, s.dim, s.prior) for s in info.latent_spaces] == [(types_pb2.LATENT_SPACE_Z, 100, "normal")]
    assert [l.name for l in info.layers] == ["input", "block1", "block2", "block3", "block4", "image"]
    assert list(info.layers[2].shape) == [256, 8, 8]
    assert info.resolution == 64 and info.channels == 3
    assert set(info.backends) >= {types_pb2.BACKEND_TORCH, types_pb2.BACKEND_ONNXRUNTIME}
    assert "gan-face-generate" in info.provenance["source"]


def test_same_seed_same_latents_same_images(stub):
    first = stub.Sample(generator_pb2.SampleRequest(model=MODEL, count=6, seed=42), timeout=10)
    second = stub.Sample(generator_pb2.SampleRequest(model=MODEL, count=6, seed=42), timeout=10)
    other = stub.Sample(generator_pb2.SampleRequest(model=MODEL, count=6, seed=43), timeout=10)
    assert first.latents.values.raw_data == second.latents.values.raw_data != other.latents.values.raw_data
    assert first.model.version == 1 and first.latents.space == types_pb2.LATENT_SPACE_Z
    z = wire.from_tensor(first.latents.values, field="z")
    assert z.shape == (6, 100)
    a = _synthesize(stub, z).images.raw.raw_data
    b = _synthesize(stub, z).images.raw.raw_data
    assert a == b


def test_every_backend_gives_the_same_faces(stub):
    z = np.random.default_rng(0).standard_normal((5, 100)).astype(np.float32)
    outputs = {}
    for backend in (types_pb2.BACKEND_TORCH, types_pb2.BACKEND_ONNXRUNTIME):
        response = _synthesize(stub, z, backend=backend)
        assert response.backend == backend
        outputs[backend] = wire.decode_images(response.images).astype(int)
    # uint8 rounding of values within 1e-3 of each other differs by at most one level.
    assert np.abs(outputs[types_pb2.BACKEND_TORCH] - outputs[types_pb2.BACKEND_ONNXRUNTIME]).max() <= 1


def test_png_and_raw_encodings_decode_to_the_same_pixels(stub):
    z = np.random.default_rng(1).standard_normal((3, 100)).astype(np.float32)
    raw = _synthesize(stub, z, image_encoding=types_pb2.IMAGE_ENCODING_RAW_UINT8)
    png = _synthesize(stub, z, image_encoding=types_pb2.IMAGE_ENCODING_PNG)
    assert len(png.images.png) == 3 and png.images.png[0].startswith(b"\x89PNG")
    np.testing.assert_array_equal(wire.decode_images(raw.images), wire.decode_images(png.images))


def test_features_out_and_back_in(stub):
    z = np.random.default_rng(2).standard_normal((3, 100)).astype(np.float32)
    direct = _synthesize(stub, z, return_layers=["block2"], backend=types_pb2.BACKEND_ONNXRUNTIME)
    assert direct.backend == types_pb2.BACKEND_TORCH  # feature paths run on torch
    (features,) = direct.features
    assert features.layer == "block2" and list(features.values.shape) == [3, 256, 8, 8]
    again = stub.Synthesize(
        generator_pb2.SynthesizeRequest(model=MODEL, features=types_pb2.LayerFeatures(layer="block2", values=features.values)),
        timeout=30,
    )
    np.testing.assert_array_equal(wire.decode_images(again.images), wire.decode_images(direct.images))
    only = _synthesize(stub, z, return_layers=["block1"], omit_images=True)
    assert not only.images.raw.raw_data and only.features[0].layer == "block1"


def test_synthesize_stream_answers_each_request_in_order(stub):
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((n, 100)).astype(np.float32) for n in (1, 4, 2, 8)]
    requests = [
        generator_pb2.SynthesizeRequest(model=MODEL, latents=_latents(b), request_id=f"r{i}") for i, b in enumerate(batches)
    ]
    responses = list(stub.SynthesizeStream(iter(requests), timeout=30))
    assert [r.request_id for r in responses] == ["r0", "r1", "r2", "r3"]
    for batch, response in zip(batches, responses):
        expected = wire.decode_images(_synthesize(stub, batch).images)
        np.testing.assert_array_equal(wire.decode_images(response.images), expected)


def test_concurrent_callers_share_batches(stub, generator_server):
    _, pool = generator_server
    loaded = pool.get("dcgan-faces")
    errors = []

    def call(seed):
        try:
            z = np.random.default_rng(seed).standard_normal((2, 100)).astype(np.float32)
            _synthesize(stub, z, backend=types_pb2.BACKEND_TORCH)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = [b.stats for key, b in loaded._batchers.items() if key[0] == types_pb2.BACKEND_TORCH and key[1] == "input"]
    assert stats and max(s.largest_batch for s in stats) > 2


# ---- bad input: every class gets its status code and a precise message; serving goes on ----

BAD_SYNTHESIZE = [
    ("wrong latent dimension", lambda: _latents(np.zeros((2, 99), np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "expected [N, 100]"),
    ("wrong rank", lambda: _latents(np.zeros((2, 100, 1), np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "expected [N, 100]"),
    ("NaN", lambda: _latents(np.full((2, 100), np.nan, np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "NaN or infinite"),
    ("Inf", lambda: _latents(np.full((1, 100), np.inf, np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "NaN or infinite"),
    ("empty batch", lambda: _latents(np.zeros((0, 100), np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "batch is empty"),
    ("oversize batch", lambda: _latents(np.zeros((1025, 100), np.float32)), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than the limit 1024"),
    ("integer latents", lambda: _latents(np.zeros((1, 100), np.int32)), grpc.StatusCode.INVALID_ARGUMENT, "DATA_TYPE_INT32 not allowed"),
    ("truncated bytes", lambda: types_pb2.Latents(space=1, values=types_pb2.Tensor(dtype=1, shape=[1, 100], raw_data=b"\0" * 12)), grpc.StatusCode.INVALID_ARGUMENT, "needs 400"),
    ("wrong space", lambda: _latents(np.zeros((1, 100), np.float32), types_pb2.LATENT_SPACE_W), grpc.StatusCode.INVALID_ARGUMENT, "no latent space LATENT_SPACE_W"),
]


@pytest.mark.parametrize("label,make,code,text", BAD_SYNTHESIZE, ids=[b[0] for b in BAD_SYNTHESIZE])
def test_bad_latents(stub, label, make, code, text):
    with pytest.raises(grpc.RpcError) as info:
        stub.Synthesize(generator_pb2.SynthesizeRequest(model=MODEL, latents=make()), timeout=30)
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details()
    _assert_still_serving(stub)


def _bad(stub, method, request, code, text):
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, method)(request, timeout=30)
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details(), info.value.details()
    _assert_still_serving(stub)


def test_unknown_model(stub):
    z = _latents(np.zeros((1, 100), np.float32))
    _bad(stub, "Synthesize", generator_pb2.SynthesizeRequest(model=types_pb2.ModelRef(name="stylegan9"), latents=z),
         grpc.StatusCode.NOT_FOUND, "no generator named 'stylegan9'; available: dcgan-faces")
    _bad(stub, "Synthesize", generator_pb2.SynthesizeRequest(model=types_pb2.ModelRef(name="dcgan-faces", version=9), latents=z),
         grpc.StatusCode.NOT_FOUND, "has no version 9")
    _bad(stub, "Sample", generator_pb2.SampleRequest(model=types_pb2.ModelRef(name="nope"), count=1),
         grpc.StatusCode.NOT_FOUND, "no generator named 'nope'")


def test_unknown_layer(stub):
    z = _latents(np.zeros((1, 100), np.float32))
    _bad(stub, "Synthesize", generator_pb2.SynthesizeRequest(model=MODEL, latents=z, return_layers=["block9"]),
         grpc.StatusCode.NOT_FOUND, "unknown layer 'block9'; layers: input, block1")
    features = types_pb2.LayerFeatures(layer="conv7", values=wire.to_tensor(np.zeros((1, 4), np.float32)))
    _bad(stub, "Synthesize", generator_pb2.SynthesizeRequest(model=MODEL, features=features),
         grpc.StatusCode.NOT_FOUND, "unknown layer 'conv7'")
    wrong_shape = types_pb2.LayerFeatures(layer="block2", values=wire.to_tensor(np.zeros((1, 128, 8, 8), np.float32)))
    _bad(stub, "Synthesize", generator_pb2.SynthesizeRequest(model=MODEL, features=wrong_shape),
         grpc.StatusCode.INVALID_ARGUMENT, "expected [N, 256, 8, 8]")
    backwards = types_pb2.LayerFeatures(layer="block2", values=wire.to_tensor(np.zeros((1, 256, 8, 8), np.float32)))
    _bad(stub, "Synthesize", generator_pb2.SynthesizeRequest(model=MODEL, features=backwards, return_layers=["block1"]),
         grpc.StatusCode.INVALID_ARGUMENT, "does not come after")


def test_bad_image_encoding_and_enums(stub):
    z = _latents(np.zeros((1, 100), np.float32))
    _bad(stub, "Synthesize", generator_pb2.SynthesizeRequest(model=MODEL, latents=z, image_encoding=7),
         grpc.StatusCode.INVALID_ARGUMENT, "image_encoding 7 is unknown")
    _bad(stub, "Synthesize", generator_pb2.SynthesizeRequest(model=MODEL, latents=z, backend=9),
         grpc.StatusCode.INVALID_ARGUMENT, "backend 9 is unknown")
    _bad(stub, "Synthesize", generator_pb2.SynthesizeRequest(model=MODEL, latents=z, backend=types_pb2.BACKEND_TENSORRT),
         grpc.StatusCode.FAILED_PRECONDITION, "tensorrt is not available here")
    _bad(stub, "Synthesize", generator_pb2.SynthesizeRequest(model=MODEL),
         grpc.StatusCode.INVALID_ARGUMENT, "set either latents or features")
    _bad(stub, "Synthesize", generator_pb2.SynthesizeRequest(model=MODEL, latents=z, omit_images=True),
         grpc.StatusCode.INVALID_ARGUMENT, "nothing to return")


def test_bad_sample_requests(stub):
    _bad(stub, "Sample", generator_pb2.SampleRequest(model=MODEL, count=0), grpc.StatusCode.INVALID_ARGUMENT, "batch is empty")
    _bad(stub, "Sample", generator_pb2.SampleRequest(model=MODEL, count=5000), grpc.StatusCode.RESOURCE_EXHAUSTED, "limit 1024")
    _bad(stub, "Sample", generator_pb2.SampleRequest(model=MODEL, count=1, truncation_psi=0.7),
         grpc.StatusCode.INVALID_ARGUMENT, "does not support truncation")


def test_bad_request_inside_a_stream_ends_it_with_a_status(stub):
    good = generator_pb2.SynthesizeRequest(model=MODEL, latents=_latents(np.zeros((1, 100), np.float32)), request_id="ok")
    bad = generator_pb2.SynthesizeRequest(model=MODEL, latents=_latents(np.zeros((1, 3), np.float32)), request_id="bad")
    stream = stub.SynthesizeStream(iter([good, bad]), timeout=30)
    assert next(stream).request_id == "ok"
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "expected [N, 100]" in info.value.details()
    _assert_still_serving(stub)


def test_deadline_is_honoured(stub):
    z = _latents(np.zeros((1024, 100), np.float32))
    with pytest.raises(grpc.RpcError) as info:
        stub.Synthesize(generator_pb2.SynthesizeRequest(model=MODEL, latents=z, backend=types_pb2.BACKEND_TORCH), timeout=0.01)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _assert_still_serving(stub)


def test_full_queue_answers_resource_exhausted(fresh_repo):
    from generator_svc.server import build
    from tests.conftest import make_config

    # A tiny queue and a slow batch (long delay, big batch) so concurrent callers overflow it.
    host, _ = build(make_config(fresh_repo, max_queue_rows=4, max_batch_size=1024, max_queue_delay_ms=500))
    try:
        stub = generator_pb2_grpc.GeneratorServiceStub(grpc.insecure_channel(f"localhost:{host.port}"))
        codes = []

        def call():
            try:
                _synthesize(stub, np.zeros((3, 100), np.float32), backend=types_pb2.BACKEND_TORCH)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                assert "queue full" in exc.details()

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
        _assert_still_serving(stub)
    finally:
        host.stop(0)


def test_health_is_not_serving_until_a_model_is_loaded(tmp_path, installed_repo):
    from generator_svc.server import build
    from latentedit.install import install_defaults
    from latentedit.repository import ModelRepository
    from tests.conftest import make_config

    empty = ModelRepository(tmp_path / "empty")
    host, _ = build(make_config(empty))
    try:
        channel = grpc.insecure_channel(f"localhost:{host.port}")
        health = health_pb2_grpc.HealthStub(channel)
        check = lambda: health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status  # noqa: E731
        assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
        liveness = health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5).status
        assert liveness == health_pb2.HealthCheckResponse.SERVING
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Sample(generator_pb2.SampleRequest(count=1), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "models install" in info.value.details()
        install_defaults(empty, log=lambda _m: None)
        deadline = time.monotonic() + 30
        while check() != health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
            time.sleep(0.2)
        assert check() == health_pb2.HealthCheckResponse.SERVING
    finally:
        host.stop(0)


def test_new_versions_are_discovered_without_restart(fresh_repo):
    """A second version dropped into the repository is served (and becomes the default) live."""
    from generator_svc.server import build
    from latentedit.install import DEFAULT_GENERATOR
    from tests.conftest import make_config

    host, pool = build(make_config(fresh_repo))
    try:
        channel = grpc.insecure_channel(f"localhost:{host.port}")
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        assert stub.Sample(generator_pb2.SampleRequest(count=1), timeout=10).model.version == 1
        current = fresh_repo.resolve(DEFAULT_GENERATOR)
        weights = current.file("weights").read_bytes()
        manifest = {k: v for k, v in current.manifest.items() if k in ("kind", "architecture", "config", "files")}
        fresh_repo.write(DEFAULT_GENERATOR, manifest, lambda d: (d / "weights.safetensors").write_bytes(weights))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            models = stub.ListModels(generator_pb2.ListModelsRequest(), timeout=10).models
            if models[0].ref.version == 2:
                break
            time.sleep(0.2)
        assert list(models[0].versions) == [1, 2] and models[0].ref.version == 2
        assert stub.Sample(generator_pb2.SampleRequest(count=1), timeout=10).model.version == 2
        old = stub.Sample(generator_pb2.SampleRequest(model=types_pb2.ModelRef(name=DEFAULT_GENERATOR, version=1), count=1), timeout=10)
        assert old.model.version == 1
        channel.close()
    finally:
        host.stop(0)

"""GeneratorService through real stubs on an in-process server."""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from generator_svc.backends import GeneratorBackend
from generator_svc.service import STREAM_WINDOW
from latentedit import wire
from latentedit.api.v1 import generator_pb2, generator_pb2_grpc, types_pb2
from latentedit.models.generator import IMAGE_LAYER, INPUT_LAYER
from latentedit.rpc.serving import channel_options

MODEL = types_pb2.ModelRef(name="dcgan-faces")
READER_THREAD = "synth-stream-reader"


def wait_until(condition: Callable[[], bool], describe: Callable[[], str], timeout_s: float = 30.0,
               interval_s: float = 0.005) -> None:
    """Poll a server-side condition until it holds; fail with `describe()` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(describe())
        time.sleep(interval_s)


class HeldBackend(GeneratorBackend):
    """The real torch backend behind a gate: records each batch that reaches it and holds it
    until the test releases the gate, so what queues behind it is up to the test, not timing."""

    def __init__(self, inner: GeneratorBackend) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.released = threading.Event()
        self._changed = threading.Condition()
        self.batches: list[int] = []  # rows of every batch that reached the backend, in order
        self.finished = 0

    def supports(self, from_layer, to_layers):
        return self.inner.supports(from_layer, to_layers)

    def run(self, x, from_layer, to_layers):
        with self._changed:
            self.batches.append(len(x))
            self._changed.notify_all()
        if not self.released.wait(60):  # reaches the callers as an error, never hangs the worker
            raise TimeoutError("the test never released the backend")
        try:
            return self.inner.run(x, from_layer, to_layers)
        finally:
            with self._changed:
                self.finished += 1
                self._changed.notify_all()

    def wait_for_batches(self, count: int, timeout_s: float = 30.0) -> None:
        with self._changed:
            reached = self._changed.wait_for(lambda: len(self.batches) >= count, timeout_s)
        assert reached, f"{count} batch(es) should have reached the backend; saw {self.batches}"

    def wait_for_finished(self, count: int, timeout_s: float = 30.0) -> None:
        with self._changed:
            reached = self._changed.wait_for(lambda: self.finished >= count, timeout_s)
        assert reached, f"{count} batch(es) should have finished; {self.finished} did"


@dataclass
class HeldServer:
    stub: generator_pb2_grpc.GeneratorServiceStub
    backend: HeldBackend
    loaded: object
    servicer: object

    @property
    def batcher(self):
        """The torch latents -> image batcher (fresh with this server)."""
        batcher = self.loaded.batcher(types_pb2.BACKEND_TORCH, INPUT_LAYER, [IMAGE_LAYER])
        assert batcher is not None, "no request has reached the torch batcher yet"
        return batcher


@pytest.fixture
def held_server(installed_repo):
    """Makes fresh generator services whose torch backend holds every batch until released."""
    from generator_svc.server import start
    from tests.conftest import make_config

    started = []

    def make(**generator_overrides) -> HeldServer:
        server = start(make_config(installed_repo, **generator_overrides))
        loaded = server.pool.get("dcgan-faces")
        # Batchers bind their backend when first used: nothing has used torch since start-up.
        backend = loaded.backends[types_pb2.BACKEND_TORCH] = HeldBackend(loaded.backends[types_pb2.BACKEND_TORCH])
        channel = grpc.insecure_channel(f"localhost:{server.host.port}", options=channel_options())
        started.append((server, backend, channel))
        return HeldServer(generator_pb2_grpc.GeneratorServiceStub(channel), backend, loaded, server.servicer)

    yield make
    for server, backend, channel in started:
        backend.released.set()
        channel.close()
        server.host.stop(0)


def _torch_request(array, request_id=""):
    return generator_pb2.SynthesizeRequest(
        model=MODEL, latents=_latents(array), backend=types_pb2.BACKEND_TORCH, request_id=request_id
    )


def _z(seed, rows):
    return np.random.default_rng(seed).standard_normal((rows, 100)).astype(np.float32)


def _assert_images_of(held: HeldServer, z, response):
    """The response carries the images of exactly these latents (run alone, in this process)."""
    alone = wire.float_to_uint8_images(held.backend.inner.run(z, INPUT_LAYER, [IMAGE_LAYER])[IMAGE_LAYER])
    got = wire.decode_images(response.images)
    assert got.shape == alone.shape
    # Batched and lone runs may round a pixel differently by one level.
    assert np.abs(got.astype(int) - alone.astype(int)).max() <= 1


def _reader_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == READER_THREAD}


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
    response = stub.ListModels(generator_pb2.ListModelsRequest(), timeout=10)
    models = {m.ref.name: m for m in response.models}
    # The set-up installs the DCGAN (the default) and the distilled StyleGAN2 (W-space default world).
    assert response.default_model == "dcgan-faces" and set(models) == {"dcgan-faces", "stylegan2-faces"}
    info = models["dcgan-faces"]
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


def _counted_requests(count: int, pulled: list[int]):
    """A client's request stream of 1-row requests r0, r1, ...; `pulled[0]` counts what gRPC took."""
    for i in range(count):
        pulled[0] += 1
        yield _torch_request(_z(i, 1), f"r{i}")


def test_a_streams_requests_batch_together_and_answer_in_order(held_server):
    held = held_server()
    latents = [_z(seed, 2) for seed in range(6)]
    assert len(latents) <= STREAM_WINDOW
    requests = [_torch_request(z, f"r{i}") for i, z in enumerate(latents)]
    stream = held.stub.SynthesizeStream(iter(requests), timeout=60)
    held.backend.wait_for_batches(1)
    running = held.backend.batches[0]  # the first request, or more if they arrived together
    wait_until(lambda: held.batcher.queued_rows == 12 - running,
               lambda: f"the stream's later requests ({12 - running} rows) should be read ahead and queued while "
                       f"the first batch runs; {held.batcher.queued_rows} rows are")
    held.backend.released.set()
    responses = list(stream)
    assert [r.request_id for r in responses] == [f"r{i}" for i in range(6)]
    for z, response in zip(latents, responses):
        _assert_images_of(held, z, response)
    stats = held.batcher.stats
    assert stats.rows == 12 and stats.batches < len(requests), f"6 requests ran as {stats.batches} batches"
    assert held.backend.batches == ([running, 12 - running] if running < 12 else [12])


def test_a_client_that_does_not_read_holds_the_server_to_its_window(held_server):
    held = held_server()
    stats = held.servicer.stream_stats
    pulled = [0]
    stream = held.stub.SynthesizeStream(_counted_requests(3 * STREAM_WINDOW, pulled), timeout=60)
    held.backend.wait_for_batches(1)
    # Nothing can be answered while the backend is held, so the reader must stop at the window.
    wait_until(lambda: stats.readers_waiting == 1 or stats.requests_read > STREAM_WINDOW,
               lambda: f"the reader should wait for the client after {STREAM_WINDOW} requests; it has read "
                       f"{stats.requests_read} of the {pulled[0]} the client sent")
    assert stats.requests_read == STREAM_WINDOW, f"read {stats.requests_read} requests with none answered"
    assert held.batcher.queued_rows + held.backend.batches[0] == STREAM_WINDOW  # 1-row requests
    held.backend.released.set()
    responses = list(stream)  # the client reads at last: everything completes, in order
    assert [r.request_id for r in responses] == [f"r{i}" for i in range(3 * STREAM_WINDOW)]
    assert stats.requests_read == 3 * STREAM_WINDOW and held.batcher.stats.rows == 3 * STREAM_WINDOW
    assert stats.largest_read_ahead == STREAM_WINDOW


def test_cancelling_a_stream_stops_its_work_and_its_reader(held_server):
    held = held_server()
    stats = held.servicer.stream_stats
    before = _reader_threads()
    stream = held.stub.SynthesizeStream(_counted_requests(1000, [0]), timeout=60)
    held.backend.wait_for_batches(1)
    wait_until(lambda: stats.readers_waiting == 1, lambda: f"the stream's window should fill; read {stats.requests_read}")
    assert len(_reader_threads() - before) == 1, "the stream should have one reader thread"
    running = held.backend.batches[0]  # the first request, or more if they arrived together
    assert held.batcher.queued_rows == STREAM_WINDOW - running  # 1-row requests
    stream.cancel()
    # Both happen while the batch already running is still held: neither waits for it.
    wait_until(lambda: not (_reader_threads() - before), lambda: "the cancelled stream's reader thread is still running")
    wait_until(lambda: held.batcher.queued_rows == 0,
               lambda: f"the cancelled stream's requests are still queued: {held.batcher.queued_rows} rows")
    held.backend.released.set()
    held.backend.wait_for_finished(1)
    # FIFO: a later request runs after anything still queued, so this settles the backend's record.
    held.stub.Synthesize(_torch_request(_z(99, 1)), timeout=30)
    assert held.backend.batches == [running, 1], f"rows of the cancelled stream reached the backend: {held.backend.batches}"
    assert held.batcher.stats.dropped_rows == STREAM_WINDOW - running
    assert stats.requests_read == STREAM_WINDOW


def test_concurrent_callers_share_batches(held_server):
    held = held_server()
    latents = [_z(seed, 2) for seed in range(12)]
    calls = [held.stub.Synthesize.future(_torch_request(latents[0]), timeout=60)]
    held.backend.wait_for_batches(1)
    # While the first caller's batch runs, the other 11 arrive and wait together.
    calls += [held.stub.Synthesize.future(_torch_request(z), timeout=60) for z in latents[1:]]
    wait_until(lambda: held.batcher.queued_rows == 22,
               lambda: f"11 callers' 22 rows should be queued; {held.batcher.queued_rows} are")
    held.backend.released.set()
    responses = [call.result() for call in calls]
    for z, response in zip(latents, responses):
        _assert_images_of(held, z, response)
    stats = held.batcher.stats
    assert stats.rows == 24 and stats.batches < len(calls), f"12 calls ran as {stats.batches} batches"
    assert held.backend.batches == [2, 22]


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


def test_bad_request_inside_a_stream_ends_it_with_a_status_and_stops_reading(held_server):
    held = held_server()
    held.backend.released.set()
    stats = held.servicer.stream_stats
    before = _reader_threads()

    def requests():  # a good request, a bad one, then as many good ones as the server will take
        yield _torch_request(_z(0, 1), "ok")
        yield _torch_request(np.zeros((1, 3), np.float32), "bad")
        yield from _counted_requests(1000, [0])

    stream = held.stub.SynthesizeStream(requests(), timeout=30)
    assert next(stream).request_id == "ok"
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "expected [N, 100]" in info.value.details()
    wait_until(lambda: not (_reader_threads() - before), lambda: "the failed stream's reader thread is still running")
    assert stats.requests_read == 2, f"the server read {stats.requests_read} requests; it should stop at the bad one"
    _assert_still_serving(held.stub)


def test_deadline_is_honoured(held_server):
    """A request whose deadline passes while it is queued is dropped, never computed."""
    held = held_server()
    blocker = held.stub.Synthesize.future(_torch_request(_z(0, 1)), timeout=60)
    held.backend.wait_for_batches(1)
    expired = held.stub.Synthesize.future(_torch_request(_z(1, 5)), timeout=2)
    # The server's own deadline handling, not the client's timer, takes its rows out of the queue.
    wait_until(lambda: held.batcher.stats.dropped_rows == 5,
               lambda: f"the expired request should have been dropped from the queue; "
                       f"dropped {held.batcher.stats.dropped_rows} rows, {held.batcher.queued_rows} still queued")
    assert expired.exception(30).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    held.backend.released.set()
    blocker.result(30)
    # FIFO: a later request runs after anything still queued, so this settles the backend's record.
    held.stub.Synthesize(_torch_request(_z(2, 2)), timeout=30)
    assert held.backend.batches == [1, 2], f"the expired request's 5 rows reached the backend: {held.backend.batches}"
    _assert_still_serving(held.stub)


def test_full_queue_answers_resource_exhausted(held_server):
    held = held_server(max_queue_rows=4)
    running = held.stub.Synthesize.future(_torch_request(_z(0, 3)), timeout=60)
    held.backend.wait_for_batches(1)
    queued = held.stub.Synthesize.future(_torch_request(_z(1, 3)), timeout=60)
    wait_until(lambda: held.batcher.queued_rows == 3, lambda: f"3 rows should be queued; {held.batcher.queued_rows} are")
    with pytest.raises(grpc.RpcError) as refused:
        held.stub.Synthesize(_torch_request(_z(2, 3)), timeout=15)  # 3 + 3 rows > the limit of 4
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    assert "queue full: 3 rows waiting, limit 4" in refused.value.details()
    held.backend.released.set()
    running.result(30)
    queued.result(30)
    assert held.backend.batches == [3, 3], f"the refused request reached the backend: {held.backend.batches}"
    _assert_still_serving(held.stub)


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
        wait_until(lambda: check() == health_pb2.HealthCheckResponse.SERVING,
                   lambda: "readiness never turned SERVING after the models were installed", interval_s=0.1)
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
        newest = lambda: stub.ListModels(generator_pb2.ListModelsRequest(), timeout=10).models[0]  # noqa: E731
        wait_until(lambda: newest().ref.version == 2, lambda: f"version 2 was never served; models: {newest()}",
                   interval_s=0.1)
        assert list(newest().versions) == [1, 2]
        assert stub.Sample(generator_pb2.SampleRequest(count=1), timeout=10).model.version == 2
        old = stub.Sample(generator_pb2.SampleRequest(model=types_pb2.ModelRef(name=DEFAULT_GENERATOR, version=1), count=1), timeout=10)
        assert old.model.version == 1
        channel.close()
    finally:
        host.stop(0)


# ---- bounded memory: loaded versions are an LRU --------------------------------------------------


def _add_versions(repo, count: int) -> None:
    """`count` more versions of the default generator (same weights: the ONNX export is cached)."""
    from latentedit.install import DEFAULT_GENERATOR

    current = repo.resolve(DEFAULT_GENERATOR)
    weights = current.file("weights").read_bytes()
    manifest = {k: v for k, v in current.manifest.items() if k in ("kind", "architecture", "config", "files")}
    for _ in range(count):
        repo.write(DEFAULT_GENERATOR, manifest, lambda d: (d / "weights.safetensors").write_bytes(weights))


def _batcher_threads(version: int) -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(f"batch-dcgan-faces-v{version}-")}


def test_loading_many_versions_keeps_the_loaded_count_bounded(fresh_repo):
    from generator_svc.pool import GeneratorPool
    from latentedit.config import GeneratorConfig

    _add_versions(fresh_repo, 5)
    pool = GeneratorPool(fresh_repo, GeneratorConfig(), max_loaded=2)
    z = _z(0, 2)
    others = set(threading.enumerate())  # other servers of this module have v1 batchers too
    try:
        for version in range(1, 7):
            loaded = pool.get("dcgan-faces", version)
            torch_backend = loaded.backends[types_pb2.BACKEND_TORCH]
            out = loaded.run(torch_backend, z, INPUT_LAYER, [IMAGE_LAYER], timeout_s=60)
            assert out[IMAGE_LAYER].shape == (2, 3, 64, 64)
            assert len(pool.loaded_keys()) <= 2, pool.loaded_keys()
        assert pool.loaded_keys() == [("dcgan-faces", 5), ("dcgan-faces", 6)]
        assert pool.evictions == 4
        # Unloaded versions leave no batcher thread behind (idle ones are joined when unloaded).
        assert not set().union(*(_batcher_threads(v) for v in range(1, 5))) - others
        assert pool.get("dcgan-faces", 1).entry.version == 1  # unloaded versions load again on use
        assert pool.loaded_keys() == [("dcgan-faces", 6), ("dcgan-faces", 1)]
    finally:
        pool.close()


def test_unloading_a_version_answers_the_calls_it_holds(fresh_repo):
    """max_loaded=1: loading v2 unloads v1 while v1 computes one call and holds another queued;
    both are answered with their own images, and a caller still holding v1 is served unbatched."""
    from generator_svc.pool import GeneratorPool
    from latentedit.config import GeneratorConfig

    _add_versions(fresh_repo, 1)
    pool = GeneratorPool(fresh_repo, GeneratorConfig(), max_loaded=1)
    try:
        v1 = pool.get("dcgan-faces", 1)
        held = HeldBackend(v1.backends[types_pb2.BACKEND_TORCH])
        results: dict[int, np.ndarray] = {}

        def call(seed: int, rows: int) -> None:
            results[seed] = v1.run(held, _z(seed, rows), INPUT_LAYER, [IMAGE_LAYER], timeout_s=60)[IMAGE_LAYER]

        running = threading.Thread(target=call, args=(0, 1))
        running.start()
        held.wait_for_batches(1)
        queued = threading.Thread(target=call, args=(1, 3))
        queued.start()
        batcher = v1.batcher(types_pb2.BACKEND_TORCH, INPUT_LAYER, [IMAGE_LAYER])
        wait_until(lambda: batcher.queued_rows == 3, lambda: f"3 rows should be queued; {batcher.queued_rows} are")
        pool.get("dcgan-faces", 2)
        assert pool.loaded_keys() == [("dcgan-faces", 2)]
        held.released.set()
        running.join(60)
        queued.join(60)
        assert held.batches == [1, 3]
        for seed, rows in ((0, 1), (1, 3)):
            np.testing.assert_allclose(results[seed], held.inner.run(_z(seed, rows), INPUT_LAYER, [IMAGE_LAYER])[IMAGE_LAYER],
                                       atol=1e-5)
        assert batcher.join(30), "the unloaded version's batcher thread did not end after its queue emptied"
        late = v1.run(held, _z(2, 2), INPUT_LAYER, [IMAGE_LAYER], timeout_s=60)[IMAGE_LAYER]  # a caller still holding v1
        assert late.shape == (2, 3, 64, 64) and held.batches == [1, 3, 2]
        assert v1.batcher(types_pb2.BACKEND_TORCH, INPUT_LAYER, [IMAGE_LAYER]) is None  # served without a new batcher
    finally:
        pool.close()


def test_finite_latents_far_beyond_the_prior_are_invalid(stub):
    """Corpus finding: float32 latents of 2e4 passed the finiteness check and were computed."""
    from latentedit.limits import LIMITS

    with pytest.raises(grpc.RpcError) as info:
        _synthesize(stub, np.full((1, 100), 2 * LIMITS.latent_abs, np.float32))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "latent_abs" in info.value.details()
    edge = wire.decode_images(_synthesize(stub, np.full((1, 100), LIMITS.latent_abs, np.float32)).images)
    assert edge.shape == (1, 64, 64, 3)  # the limit itself is allowed
    _assert_still_serving(stub)


def test_a_deadline_shorter_than_the_queued_work_is_refused_at_once(held_server):
    """Overload: admission weighs the work ahead against the caller's deadline (RESOURCE_EXHAUSTED
    at once), instead of queueing a call that can only time out while the server computes."""
    held = held_server()
    blocker = held.stub.Synthesize.future(_torch_request(_z(0, 1)), timeout=120)
    held.backend.wait_for_batches(1)
    # The batcher measures rows/s on the batches it runs; set a slow machine's figure so the
    # work ahead is long whatever this machine's speed: 1 row/s.
    held.batcher._rows_per_s = 1.0
    queued = held.stub.Synthesize.future(_torch_request(_z(1, 20)), timeout=120)
    wait_until(lambda: held.batcher.queued_rows == 20, lambda: f"20 rows should be queued; {held.batcher.queued_rows} are")
    refused_before = held.batcher.stats.refused_requests
    with pytest.raises(grpc.RpcError) as refused:
        held.stub.Synthesize(_torch_request(_z(2, 1)), timeout=10)  # 21 rows ahead at 1 row/s: about 21 s
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    assert "21 rows are ahead of this request, about 21.0 s of work" in refused.value.details()
    assert held.batcher.stats.refused_requests == refused_before + 1
    patient = held.stub.Synthesize.future(_torch_request(_z(3, 2)), timeout=120)  # 21 s fits in 120 s: admitted
    wait_until(lambda: held.batcher.queued_rows == 22, lambda: f"22 rows should be queued; {held.batcher.queued_rows} are")
    held.backend.released.set()
    for call in (blocker, queued, patient):
        call.result(60)
    assert held.backend.batches[0] == 1 and sum(held.backend.batches) == 1 + 20 + 2, held.backend.batches
    _assert_still_serving(held.stub)

"""Shared server scaffolding: error mapping, reflection, graceful shutdown."""

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from latentedit import wire
from latentedit.api.v1 import editor_pb2, editor_pb2_grpc, generator_pb2, generator_pb2_grpc, types_pb2
from latentedit.config import ServingOptions
from latentedit.errors import FailedPrecondition
from latentedit.rpc.client import connect, synthesize_request
from latentedit.rpc.serving import ServiceHost, channel_options


class _Flaky(generator_pb2_grpc.GeneratorServiceServicer):
    def ListModels(self, request, context):
        raise ZeroDivisionError("a bug")

    def Sample(self, request, context):
        raise FailedPrecondition("boundary 'smile' is not trained yet")

    def SynthesizeStream(self, request_iterator, context):
        yield generator_pb2.SynthesizeResponse(request_id="first")
        raise FailedPrecondition("stream broke after one answer")


@pytest.fixture
def flaky_stub():
    host = ServiceHost(ServingOptions(port=0))
    host.add(generator_pb2_grpc.add_GeneratorServiceServicer_to_server, _Flaky(), "latentedit.v1.GeneratorService")
    host.start()
    channel = grpc.insecure_channel(f"localhost:{host.port}")
    yield generator_pb2_grpc.GeneratorServiceStub(channel)
    channel.close()
    host.stop(0)


def test_unexpected_exceptions_become_internal_without_leaking_details(flaky_stub):
    with pytest.raises(grpc.RpcError) as info:
        flaky_stub.ListModels(generator_pb2.ListModelsRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "ZeroDivisionError" in info.value.details() and "a bug" not in info.value.details()


def test_typed_errors_keep_their_code_in_unary_and_streaming_calls(flaky_stub):
    with pytest.raises(grpc.RpcError) as info:
        flaky_stub.Sample(generator_pb2.SampleRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == "boundary 'smile' is not trained yet"
    stream = flaky_stub.SynthesizeStream(iter([generator_pb2.SynthesizeRequest()]), timeout=5)
    assert next(stream).request_id == "first"
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_status_the_servicer_set_itself_is_kept_not_turned_into_internal(flaky_stub):
    # grpcio's generated base class sets UNIMPLEMENTED and then raises NotImplementedError: our
    # error interceptor must pass that status through rather than report an internal error.
    with pytest.raises(grpc.RpcError) as info:
        flaky_stub.Synthesize(generator_pb2.SynthesizeRequest(), timeout=5)
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")


def test_reflection_serves_the_full_generator_api(generator_channel):
    database = ProtoReflectionDescriptorDatabase(generator_channel)
    services = set(database.get_services())
    assert {"latentedit.v1.GeneratorService", "grpc.health.v1.Health"} <= services
    service = descriptor_pool.DescriptorPool(database).FindServiceByName("latentedit.v1.GeneratorService")
    assert {m.name for m in service.methods} == {"ListModels", "Sample", "Synthesize", "SynthesizeStream"}


class _Blocking(generator_pb2_grpc.GeneratorServiceServicer):
    """ListModels blocks until released; `entered` counts the calls inside it."""

    def __init__(self):
        import threading

        self.release = threading.Event()
        self._entered = threading.Condition()
        self.entered = 0

    def ListModels(self, request, context):
        with self._entered:
            self.entered += 1
            self._entered.notify_all()
        self.release.wait(30)
        return generator_pb2.ListModelsResponse()

    def wait_entered(self, count, timeout_s):
        with self._entered:
            return self._entered.wait_for(lambda: self.entered >= count, timeout_s)


def test_concurrency_is_bounded_with_resource_exhausted():
    servicer = _Blocking()
    host = ServiceHost(ServingOptions(port=0, max_concurrent_rpcs=2))
    host.add(generator_pb2_grpc.add_GeneratorServiceServicer_to_server, servicer, "latentedit.v1.GeneratorService")
    host.start()
    channel = grpc.insecure_channel(f"localhost:{host.port}")
    try:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        in_flight = [stub.ListModels.future(generator_pb2.ListModelsRequest(), timeout=60) for _ in range(2)]
        assert servicer.wait_entered(2, 30), f"only {servicer.entered} of 2 calls reached the servicer"
        with pytest.raises(grpc.RpcError) as info:
            stub.ListModels(generator_pb2.ListModelsRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert servicer.entered == 2, "the refused call reached the servicer"
        servicer.release.set()
        for call in in_flight:
            call.result()
        stub.ListModels(generator_pb2.ListModelsRequest(), timeout=10)  # served again once a slot frees
        assert servicer.entered == 3
    finally:
        servicer.release.set()
        channel.close()
        host.stop(0)


# ---- message size limits ----------------------------------------------------------------------

MIB = 1024 * 1024
GRPC_DEFAULT_RECEIVE_LIMIT = 4 * MIB


def _synthesize_request_of_size(total_bytes):
    """A SynthesizeRequest that serializes to exactly `total_bytes`; its tensor's shape does not
    match its data, so a service that receives it answers INVALID_ARGUMENT at once."""
    request = generator_pb2.SynthesizeRequest()
    request.latents.values.dtype = types_pb2.DATA_TYPE_FP32
    request.latents.values.shape.extend([1, 100])
    padding = total_bytes
    for _ in range(3):  # the length prefixes grow with the padding: converge in a few rounds
        request.latents.values.raw_data = bytes(padding)
        padding += total_bytes - request.ByteSize()
    request.latents.values.raw_data = bytes(padding)
    assert request.ByteSize() == total_bytes
    return request


def _invert_request_of_size(total_bytes):
    request = editor_pb2.InvertRequest()
    request.images.raw.dtype = types_pb2.DATA_TYPE_UINT8
    request.images.raw.shape.extend([1, 64, 64, 3])
    padding = total_bytes
    for _ in range(3):
        request.images.raw.raw_data = bytes(padding)
        padding += total_bytes - request.ByteSize()
    request.images.raw.raw_data = bytes(padding)
    assert request.ByteSize() == total_bytes
    return request


def _code_and_details(call, request):
    try:
        call(request, timeout=60)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def test_the_default_message_limit_is_64_mib_on_services_and_their_clients(generator_server):
    assert ServingOptions().max_message_bytes == 64 * MIB
    limit = 64 * MIB
    # A client allowed more than the service, so that only the service's limit can refuse.
    roomy = grpc.insecure_channel(generator_server[0], options=channel_options(2 * limit))
    client = connect(generator_server[0])  # the clients' channel, as the CLI and the services build it
    try:
        roomy_stub, stub = generator_pb2_grpc.GeneratorServiceStub(roomy), generator_pb2_grpc.GeneratorServiceStub(client)
        code, details = _code_and_details(roomy_stub.Synthesize, _synthesize_request_of_size(limit + 1))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
        # Just under the limit (and far over gRPC's 4 MiB default) it reaches the service, which checks it.
        code, details = _code_and_details(stub.Synthesize, _synthesize_request_of_size(limit - 1024))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "raw_data has" in details, (code, details)
        # The client's channel refuses to send more than the limit.
        code, details = _code_and_details(stub.Synthesize, _synthesize_request_of_size(limit + 1))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
        # ... and receives answers over gRPC's 4 MiB default: 400 raw 64x64 faces are 4.9 MB.
        latents = np.random.default_rng(0).standard_normal((400, 100)).astype(np.float32)
        response = stub.Synthesize(synthesize_request(types_pb2.ModelRef(), latents), timeout=120)
        assert response.ByteSize() > GRPC_DEFAULT_RECEIVE_LIMIT
        assert wire.decode_images(response.images).shape == (400, 64, 64, 3)
    finally:
        roomy.close()
        client.close()


def test_a_configured_message_limit_refuses_larger_requests_and_the_service_keeps_serving(installed_repo):
    from latentedit.rpc.launch import build_service
    from tests.conftest import make_config

    limit = 5 * MIB  # over gRPC's 4 MiB default, so a request between the two shows the option applied
    config = make_config(installed_repo)
    config.services["editor"].max_message_bytes = limit
    host = build_service("editor", config)
    channel = grpc.insecure_channel(f"localhost:{host.port}", options=channel_options(2 * limit))
    try:
        invert = editor_pb2_grpc.EditorServiceStub(channel).Invert
        code, details = _code_and_details(lambda r, timeout: list(invert(r, timeout=timeout)), _invert_request_of_size(limit + 1))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
        code, details = _code_and_details(lambda r, timeout: list(invert(r, timeout=timeout)), _invert_request_of_size(limit - 1024))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "images.raw: raw_data has" in details, (code, details)
        request = editor_pb2.InvertRequest(images=wire.encode_images(np.zeros((1, 64, 64, 3), np.uint8), types_pb2.IMAGE_ENCODING_RAW_UINT8),
                                           steps=1)
        assert list(invert(request, timeout=60))[-1].done  # still serving
    finally:
        channel.close()
        host.stop(0)


def test_health_watch_streams_readiness_changes():
    host = ServiceHost(ServingOptions(port=0))
    host.add(generator_pb2_grpc.add_GeneratorServiceServicer_to_server, _Flaky(), "latentedit.v1.GeneratorService")
    host.start()
    channel = grpc.insecure_channel(f"localhost:{host.port}")
    try:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING  # not warm yet
        host.set_serving(True)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        host.set_serving(False)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
    finally:
        channel.close()
        host.stop(0)


def test_free_port_never_hands_out_a_port_twice(monkeypatch):
    """The test helper behind every multi-service config: the kernel may return a just-closed port
    again, and two services given one port both bind it (SO_REUSEPORT) and answer each other's
    calls. Here the kernel is made to repeat itself; the helper must still give distinct ports."""
    import socket

    from bench import common
    from tests import conftest

    real_socket = socket.socket
    repeats = iter([50001, 50001, 50001, 50002])

    class RepeatingSocket(real_socket):
        def getsockname(self):
            return ("127.0.0.1", next(repeats))

    monkeypatch.setattr(common, "_HANDED_OUT_PORTS", set())
    monkeypatch.setattr(socket, "socket", RepeatingSocket)
    assert [conftest.free_port(), conftest.free_port()] == [50001, 50002]

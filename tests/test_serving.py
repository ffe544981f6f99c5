"""Shared server scaffolding: error mapping, reflection, graceful shutdown."""

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from latentedit.api.v1 import generator_pb2, generator_pb2_grpc
from latentedit.config import ServingOptions
from latentedit.errors import FailedPrecondition
from latentedit.rpc.serving import ServiceHost


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


def test_unimplemented_methods_say_so(flaky_stub):
    with pytest.raises(grpc.RpcError) as info:
        flaky_stub.Synthesize(generator_pb2.SynthesizeRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_reflection_serves_the_full_generator_api(generator_channel):
    database = ProtoReflectionDescriptorDatabase(generator_channel)
    services = set(database.get_services())
    assert {"latentedit.v1.GeneratorService", "grpc.health.v1.Health"} <= services
    service = descriptor_pool.DescriptorPool(database).FindServiceByName("latentedit.v1.GeneratorService")
    assert {m.name for m in service.methods} == {"ListModels", "Sample", "Synthesize", "SynthesizeStream"}


class _Blocking(generator_pb2_grpc.GeneratorServiceServicer):
    def __init__(self):
        import threading

        self.release = threading.Event()

    def ListModels(self, request, context):
        self.release.wait(10)
        return generator_pb2.ListModelsResponse()


def test_concurrency_is_bounded_with_resource_exhausted():
    import time

    servicer = _Blocking()
    host = ServiceHost(ServingOptions(port=0, max_concurrent_rpcs=2))
    host.add(generator_pb2_grpc.add_GeneratorServiceServicer_to_server, servicer, "latentedit.v1.GeneratorService")
    host.start()
    try:
        stub = generator_pb2_grpc.GeneratorServiceStub(grpc.insecure_channel(f"localhost:{host.port}"))
        in_flight = [stub.ListModels.future(generator_pb2.ListModelsRequest(), timeout=10) for _ in range(2)]
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as info:
            stub.ListModels(generator_pb2.ListModelsRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        servicer.release.set()
        for call in in_flight:
            call.result()
        stub.ListModels(generator_pb2.ListModelsRequest(), timeout=5)  # served again once a slot frees
    finally:
        servicer.release.set()
        host.stop(0)

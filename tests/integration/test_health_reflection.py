"""grpc.health.v1.Health and server reflection, so that `grpcurl list` / `describe` and load
balancers work out of the box."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from casledger.service.server import RunningServer

LEDGER = "casledger.v1.Ledger"
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"


@pytest.fixture
async def channel(server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.target) as opened:
        yield opened


@pytest.mark.parametrize("service", ["", LEDGER])
async def test_health_check_is_serving(channel: grpc.aio.Channel, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_check_of_an_unknown_service_is_not_found(
    channel: grpc.aio.Channel,
) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_watch_reports_serving(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    call = stub.Watch(health_pb2.HealthCheckRequest(service=LEDGER))
    try:
        first = await anext(aiter(call))
    finally:
        call.cancel()
    assert first.status == health_pb2.HealthCheckResponse.SERVING


async def reflect(channel: grpc.aio.Channel, request: reflection_pb2.ServerReflectionRequest
                  ) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = [response async for response in stub.ServerReflectionInfo(iter([request]),
                                                                          timeout=5)]
    assert len(responses) == 1
    return responses[0]


async def test_reflection_lists_the_services(channel: grpc.aio.Channel) -> None:
    """What `grpcurl list` asks."""
    response = await reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))

    names = {service.name for service in response.list_services_response.service}
    assert names == {LEDGER, HEALTH, REFLECTION}


async def test_reflection_describes_the_ledger(channel: grpc.aio.Channel) -> None:
    """What `grpcurl describe casledger.v1.Ledger` asks."""
    response = await reflect(channel, reflection_pb2.ServerReflectionRequest(
        file_containing_symbol=LEDGER))

    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in response.file_descriptor_response.file_descriptor_proto]
    by_name = {f.name: f for f in files}
    ledger_file = next(f for f in files if f.package == "casledger.v1")
    assert ledger_file.name == "casledger/v1/ledger.proto"
    (service,) = ledger_file.service
    assert service.name == "Ledger"
    methods = {m.name: (m.input_type, m.output_type, m.server_streaming) for m in service.method}
    assert methods == {
        "GetResource": (".casledger.v1.GetResourceRequest", ".casledger.v1.Resource", False),
        "ListResources": (".casledger.v1.ListResourcesRequest",
                          ".casledger.v1.ListResourcesResponse", False),
        "CreateResource": (".casledger.v1.CreateResourceRequest", ".casledger.v1.Resource",
                           False),
        "UpdateResource": (".casledger.v1.UpdateResourceRequest", ".casledger.v1.Resource",
                           False),
        "DeleteResource": (".casledger.v1.DeleteResourceRequest", ".casledger.v1.Resource",
                           False),
        "ListVersions": (".casledger.v1.ListVersionsRequest",
                         ".casledger.v1.ListVersionsResponse", False),
        "Watch": (".casledger.v1.WatchRequest", ".casledger.v1.WatchEvent", True),
        "GetRevision": (".casledger.v1.GetRevisionRequest", ".casledger.v1.GetRevisionResponse",
                        False),
        "Batch": (".casledger.v1.BatchRequest", ".casledger.v1.BatchResponse", False),
        "BatchStream": (".casledger.v1.BatchStreamRequest", ".casledger.v1.BatchStreamResponse",
                        True),
    }
    assert [m.name for m in service.method if m.client_streaming] == ["BatchStream"]
    messages = {m.name for m in ledger_file.message_type}
    assert {"Resource", "Precondition", "WatchEvent", "UpdateResourceRequest"} <= messages
    # Its import comes along too, so the client can resolve every type.
    assert "google/protobuf/timestamp.proto" in ledger_file.dependency
    assert "google/protobuf/timestamp.proto" in by_name


async def test_reflection_resolves_a_message_symbol(channel: grpc.aio.Channel) -> None:
    """What `grpcurl describe casledger.v1.Precondition` asks."""
    response = await reflect(channel, reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="casledger.v1.Precondition"))
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in response.file_descriptor_response.file_descriptor_proto]
    assert any(f.name == "casledger/v1/ledger.proto" for f in files)


async def test_reflection_of_an_unknown_symbol_is_not_found(channel: grpc.aio.Channel) -> None:
    response = await reflect(channel, reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="casledger.v1.Nope"))
    assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]

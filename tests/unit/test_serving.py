"""The gRPC server's pieces: method tables from xds-protos' descriptors, the message limit, health."""

from __future__ import annotations

import asyncio

import pytest
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ratelimit.v3 import rls_pb2
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from extproc.envoy import serving
from extproc.envoy.ratelimit import RateLimits
from extproc.envoy.server import Processor
from extproc.envoy.xds import Discovery, LongStreams
from extproc.local.stack import free_port
from extproc.ops.access_log import AccessLog
from extproc.ops.metrics import Metrics

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


class Echo:
    """An ext_proc servicer that answers each message with the headers' continue."""

    def __mapping__(self):
        return serving.methods(pb.DESCRIPTOR.services_by_name["ExternalProcessor"], self)

    async def Process(self, stream):
        async for _ in stream:
            await stream.send_message(pb.ProcessingResponse(request_headers=pb.HeadersResponse()))


def table(servicer) -> dict[str, tuple]:
    return {path: (h.func.__name__, h.cardinality, h.request_type, h.reply_type)
            for path, h in servicer.__mapping__().items()}


def test_each_service_is_served_at_envoys_paths_with_its_messages():
    metrics = Metrics()
    assert table(Processor.__new__(Processor)) == {
        PROCESS: ("Process", Cardinality.STREAM_STREAM, pb.ProcessingRequest, pb.ProcessingResponse)}
    # ADS's delta variant is not defined: left out, so grpclib answers it UNIMPLEMENTED
    assert table(Discovery(LongStreams())) == {
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources":
            ("StreamAggregatedResources", Cardinality.STREAM_STREAM, discovery_pb2.DiscoveryRequest,
             discovery_pb2.DiscoveryResponse)}
    assert table(AccessLog(metrics, LongStreams(), lambda m: "m")) == {
        "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs":
            ("StreamAccessLogs", Cardinality.STREAM_UNARY, als_pb2.StreamAccessLogsMessage,
             als_pb2.StreamAccessLogsResponse)}
    assert table(RateLimits(lambda: None, None, metrics)) == {
        "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit":
            ("ShouldRateLimit", Cardinality.UNARY_UNARY, rls_pb2.RateLimitRequest, rls_pb2.RateLimitResponse)}


def test_a_message_over_128_mib_is_refused_either_way():
    codec = serving._Codec()
    limit = 128 * 1024 * 1024
    big = pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(
        body_mutation=pb.BodyMutation(body=b"x" * limit))))
    with pytest.raises(GRPCError) as sent:
        codec.encode(big, pb.ProcessingResponse)
    assert sent.value.status is Status.RESOURCE_EXHAUSTED
    with pytest.raises(GRPCError) as received:
        codec.decode(b"\0" * (limit + 1), pb.ProcessingRequest)
    assert received.value.status is Status.RESOURCE_EXHAUSTED
    small = pb.ProcessingRequest(request_body=pb.HttpBody(body=b"x" * 1000))
    assert codec.decode(codec.encode(small, pb.ProcessingRequest), pb.ProcessingRequest) == small


def test_served_calls_and_health_until_the_stop():
    async def run() -> None:
        echo = Echo()
        server = serving.GrpcServer([echo], checked=echo)
        port = free_port()
        await server.start(f"127.0.0.1:{port}", None)
        channel = Channel("127.0.0.1", port)
        try:
            async with channel.request(PROCESS, Cardinality.STREAM_STREAM, pb.ProcessingRequest,
                                       pb.ProcessingResponse) as call:
                await call.send_message(pb.ProcessingRequest(request_headers=pb.HttpHeaders()), end=True)
                assert await call.recv_message() == pb.ProcessingResponse(request_headers=pb.HeadersResponse())
            health = HealthStub(channel)
            for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
                assert (await health.Check(HealthCheckRequest(service=service))).status == HealthCheckResponse.SERVING
            with pytest.raises(GRPCError) as unknown:
                await health.Check(HealthCheckRequest(service="grpc.health.v1.Health"))
            assert unknown.value.status is Status.NOT_FOUND
            server.drain()
            assert server.status.__status__() is False  # what Check answers now: NOT_SERVING
            with pytest.raises(OSError):  # no new connections
                await asyncio.open_connection("127.0.0.1", port)
            await asyncio.wait_for(server.finish(30), 5)  # nothing in flight: no wait for the grace
        finally:
            channel.close()

    asyncio.run(run())

"""The sidecar's gRPC services on grpclib instead of grpc.aio: the measured prototype (benchmarks/README.md,
"Fewer messages or less work per chunk"), not the product.

grpclib (pure-Python gRPC on asyncio and h2) has no poller thread, so a message costs no hand-off
between threads: about 2 system calls per streamed chunk instead of grpc.aio's 12, 20-30% less CPU.
`stream_load.py --grpclib` copies the package, puts this module beside `extproc/envoy/server.py` and
makes `serve()` use it. The servicers are today's: an adapter gives them the three things they use of
grpc.aio's context. Left out (a real switch needs them, each with its e2e tests): health, TLS, `unix:`
listeners, message size limits, the shutdown's grace period, the statuses of failed calls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ratelimit.v3 import rls_pb2
from grpclib.const import Cardinality, Handler
from grpclib.server import Server, Stream

from extproc.envoy import xds
from extproc.envoy.ratelimit import RateLimits, TenantMeter
from extproc.envoy.running import Sidecar
from extproc.ops import access_log
from extproc.routing.group_routes import member_at


class Context:
    """What the servicers use of grpc.aio's context, over a grpclib stream."""

    def __init__(self, stream: Stream[Any, Any]):
        self.stream = stream

    async def read(self) -> Any:
        message = await self.stream.recv_message()
        return grpc.aio.EOF if message is None else message

    async def write(self, message: Any) -> None:
        await self.stream.send_message(message)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple(self.stream.metadata.items()) if self.stream.metadata else ()


async def _requests(stream: Stream[Any, Any]) -> AsyncIterator[Any]:
    async for message in stream:
        yield message


class Services:
    """`extproc.envoy.server._Services` on grpclib: ext_proc, ADS, the access log, rate limits."""

    def __init__(self, sidecar: Sidecar):
        from extproc.envoy.server import Processor

        holder = sidecar.holder
        tenants = TenantMeter(lambda: holder.gateway.config.clients, sidecar.store, sidecar.metrics)
        self.processor = Processor(holder, sidecar.store, sidecar.metrics, tenants)
        self.long_streams = xds.LongStreams()
        self.discovery = xds.Discovery(self.long_streams)
        self.access_log = access_log.AccessLog(
            sidecar.metrics, self.long_streams, lambda model: holder.gateway.classifier.label_for(model), tenants,
            lambda label, address: member_at(holder.gateway.config, label, address))
        self.limits = RateLimits(lambda: holder.gateway.config.clients, sidecar.store, sidecar.metrics)
        self.server = Server([self])

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/envoy.service.ext_proc.v3.ExternalProcessor/Process": Handler(
                self._process, Cardinality.STREAM_STREAM, pb.ProcessingRequest, pb.ProcessingResponse),
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources": Handler(
                self._discovery, Cardinality.STREAM_STREAM, discovery_pb2.DiscoveryRequest,
                discovery_pb2.DiscoveryResponse),
            "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs": Handler(
                self._access_log, Cardinality.STREAM_UNARY, als_pb2.StreamAccessLogsMessage,
                als_pb2.StreamAccessLogsResponse),
            "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit": Handler(
                self._limit, Cardinality.UNARY_UNARY, rls_pb2.RateLimitRequest, rls_pb2.RateLimitResponse),
        }

    async def _process(self, stream: Stream[Any, Any]) -> None:
        await self.processor.Process(_requests(stream), Context(stream))

    async def _discovery(self, stream: Stream[Any, Any]) -> None:
        await self.discovery.StreamAggregatedResources(_requests(stream), Context(stream))

    async def _access_log(self, stream: Stream[Any, Any]) -> None:
        await stream.send_message(await self.access_log.StreamAccessLogs(_requests(stream), Context(stream)))

    async def _limit(self, stream: Stream[Any, Any]) -> None:
        await stream.send_message(await self.limits.ShouldRateLimit(await stream.recv_message(), Context(stream)))

    async def start(self, listen: str, tls: object) -> None:
        host, _, port = listen.rpartition(":")
        await self.server.start(host, int(port), reuse_port=True)

    async def stop(self, grace: float) -> None:
        self.long_streams.end()
        self.server.close()
        await self.server.wait_closed()
        await self.processor.runs.close()

"""The gRPC server Envoy dials (ext_proc, ADS, the access log, rate limits, health), on grpclib.

grpclib is gRPC in Python on asyncio and h2: each message is read and written on the event loop,
where grpc.aio handed every completed read and write between its poller thread and the loop (12
system calls per streamed chunk against about 2, and a quarter less CPU per chunk; benchmarks/README.md).

The servicers keep xds-protos' message classes; their method tables (`methods`) are read from the
same package's service descriptors: the RPC paths, cardinalities and message classes Envoy uses,
with no generated `_grpc` module (xds-protos ships no .proto files to generate one from, and the
table is all such a module would add). What grpc.aio did on its own and grpclib does not is here:
the 128 MiB message limit, SO_REUSEPORT, TLS from `listen_tls`, and a stop that lets the streams in
flight finish within a grace period. Beside: the replies of one event-loop turn leave in one write
(`_Batched`), where grpclib made a system call per frame.
"""

from __future__ import annotations

import asyncio
import ssl
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from grpclib.config import Configuration
from grpclib.const import Cardinality, Handler, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError
from grpclib.health.check import ServiceStatus
from grpclib.health.service import Health
from grpclib.protocol import H2Protocol
from grpclib.server import Server, Stream
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame

from extproc.config import ListenTLS
from extproc.ops.admin import split_listen

MAX_MESSAGE = 128 * 1024 * 1024  # either way: Envoy sends whole buffered bodies, the sidecar rewritten ones
# All of Envoy's streams to the sidecar share one connection: a window as large as the one Envoy's side
# grants (deploy/envoy.yaml's extproc cluster), so streams whose data waits unread do not stall the rest.
_CONNECTION_WINDOW = 64 * 1024 * 1024
# RFC 9113 6.8: a graceful shutdown's first GOAWAY names the highest stream id, NO_ERROR; the client
# opens no new streams and those in flight go on.
_GOAWAY = GoAwayFrame(0, last_stream_id=2**31 - 1).serialize()
# Writes sent as one at most (`_Batched`): a reply made first in a burst waits for at most 15 more (about
# 1 ms of the sidecar's work under load), where waiting for the whole burst of 100 streams held it 6-8 ms.
_BATCH = 16
_CARDINALITY = {(c.client_streaming, c.server_streaming): c for c in Cardinality}


class Servable(Protocol):
    def __mapping__(self) -> Mapping[str, Handler]: ...


def methods(service: ServiceDescriptor, servicer: object) -> dict[str, Handler]:
    """grpclib's method table of `servicer`: for each RPC of `service`, the servicer's method of the
    same name, called with the call's grpclib `Stream`. An RPC it does not define (ADS's delta variant)
    is left out: grpclib answers it UNIMPLEMENTED, as grpc's generated base classes did."""
    return {f"/{service.full_name}/{m.name}": Handler(
                getattr(servicer, m.name), _CARDINALITY[m.client_streaming, m.server_streaming],
                message_factory.GetMessageClass(m.input_type), message_factory.GetMessageClass(m.output_type))
            for m in service.methods if hasattr(servicer, m.name)}


class _Codec(ProtoCodec):
    """Protobuf with the size limit grpc.aio was given; grpclib has none."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        data = super().encode(message, message_type)
        _check_size(len(data))
        return data

    def decode(self, data: bytes, message_type: Any) -> Any:
        _check_size(len(data))
        return super().decode(data, message_type)


def _check_size(size: int) -> None:
    if size > MAX_MESSAGE:
        raise GRPCError(Status.RESOURCE_EXHAUSTED, f"a message of {size} bytes, over the limit of {MAX_MESSAGE}")


def tls_context(tls: ListenTLS) -> ssl.SSLContext:
    """The listener's TLS: its certificate, and with `client_ca_file` a client certificate that CA signed
    (only that CA: not the system's)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file:
        context.load_verify_locations(tls.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    return context


class _Batched:
    """A connection's transport whose writes within one turn of the event loop go out as one.

    grpclib writes every frame as it is made: a reply per system call, and on loopback each call also
    runs Envoy's side of TCP. Envoy's messages come in bursts (one read holds many streams' chunks), so
    the replies made for one read are sent together at the end of the turn that made them, or as soon as
    `_BATCH` of them are made: the first reply of a large burst waits for the next few, not for them all."""

    def __init__(self, transport: Any):
        self.transport = transport
        self.pending: list[bytes] = []
        self.loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        pending = self.pending
        if not pending:
            self.loop.call_soon(self.flush)
        pending.append(data)
        if len(pending) >= _BATCH:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            data = b"".join(self.pending)
            self.pending.clear()
            self.transport.write(data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class _Streams(H2Protocol):
    """grpclib's connection without h2's own limit of 100 streams open at once (its local
    MAX_CONCURRENT_STREAMS, which grpclib keeps): Envoy opens one ext_proc stream per request in flight,
    so the 101st concurrent request on a connection was refused (a 503 from Envoy). As grpc.aio had it,
    the bound is Envoy's (the extproc cluster's `max_concurrent_streams`)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(_Batched(transport))  # type: ignore[arg-type]
        self.connection._connection.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 2**31 - 1})
        self.connection.flush()


class _Server(Server):
    """grpclib's server with the two steps of a graceful stop, which grpclib's `close()` (every call
    cancelled at once) lacks, and its connections as `_Streams`. Uses grpclib's own names
    (`_protocol_factory`, `_server`, `Connection._connection`): the version is pinned."""

    def __init__(self, handlers: Iterable[Servable]):
        super().__init__(list(handlers), codec=_Codec(),
                         config=Configuration(http2_connection_window_size=_CONNECTION_WINDOW))
        self.connections: weakref.WeakSet[H2Protocol] = weakref.WeakSet()

    def _protocol_factory(self) -> H2Protocol:
        made = super()._protocol_factory()
        protocol = _Streams(made.handler, made.config, made.h2_config)
        self.connections.add(protocol)
        return protocol

    def drain(self) -> None:
        """No new connections, and no new streams on the open ones; the streams in flight go on."""
        if self._server is not None:
            self._server.close()
        for protocol in self.connections:
            connection = getattr(protocol, "connection", None)  # set once the connection is made
            if connection is not None and not connection.is_closing():
                connection._transport.write(_GOAWAY)

    def end(self) -> None:
        """Every call left cancelled and every connection closed (asyncio waits for them otherwise)."""
        self.close()
        for protocol in self.connections:
            connection = getattr(protocol, "connection", None)
            if connection is not None:
                connection.close()


class GrpcServer:
    """The services on one listener, with gRPC health checking (grpc.health.v1) for `checked` and for
    the server as a whole (service ""): SERVING once listening, NOT_SERVING once the stop begins."""

    def __init__(self, services: Iterable[Servable], checked: Servable):
        self.status = ServiceStatus()
        self.calls: set[asyncio.Task[Any]] = set()  # the services' calls in flight (health's not: a Watch never ends)
        table = {path: handler._replace(func=self._tracked(handler.func))
                 for service in services for path, handler in service.__mapping__().items()}
        self.server = _Server([_Table(table), Health({checked: [self.status]})])

    def _tracked(self, func: Any) -> Any:
        async def call(stream: Stream[Any, Any]) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.calls.add(task)
            try:
                await func(stream)
            finally:
                self.calls.discard(task)
        return call

    async def start(self, listen: str, tls: ListenTLS | None) -> None:
        """`host:port`, or `unix:/path/to.sock` (also `unix:///path`) for Envoy on the same host without
        a TCP port. SO_REUSEPORT on TCP, as grpc.aio set it."""
        context = None if tls is None else tls_context(tls)
        if listen.startswith("unix:"):
            path = listen.removeprefix("unix:")
            await self.server.start(path=path[2:] if path.startswith("//") else path, ssl=context)
        else:
            host, port = split_listen(listen)
            # `[::]` is every interface, IPv4 too, as grpc bound it (asyncio's `::` would be IPv6 alone)
            await self.server.start(None if host == "::" else host, port, ssl=context, reuse_port=True)
        self.status.set(True)

    def drain(self) -> None:
        """The stop's first step: health NOT_SERVING, no new connections or streams."""
        self.status.set(False)
        self.server.drain()

    async def finish(self, grace: float) -> None:
        """The stop's second: `grace` seconds for the calls in flight, then the rest cancelled."""
        if self.calls:
            await asyncio.wait(set(self.calls), timeout=grace)
        self.server.end()
        await self.server.wait_closed()


class _Table:
    def __init__(self, table: dict[str, Handler]):
        self.table = table

    def __mapping__(self) -> dict[str, Handler]:
        return self.table

"""Envoy's routes, backend clusters and keys (SDS secrets), served live over ADS on the sidecar's gRPC port.

State of the world: every stream gets the whole current set of each type it subscribed to (secrets,
clusters, then the route configuration, so routes never name a cluster Envoy lacks), again whenever
the compiled result changes or Envoy asks for other names (a new cluster asks for its secret). Why ADS rather than files: Envoy already dials this port (the `extproc`
cluster), so docker compose and Kubernetes need no shared volume, and a change is pushed at once.

`follow()` recompiles when the config is reloaded, when discovery or learning changes a fact
(`Knowledge.version`), and every few seconds from the state store's learned facts (what other
replicas learned), and publishes only real changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from envoy.service.discovery.v3 import ads_pb2
from envoy.service.discovery.v3 import discovery_pb2 as pb
from google.protobuf import any_pb2
from google.protobuf.message import Message
from grpclib.const import Handler
from grpclib.server import Stream

from extproc.envoy.serving import methods
from extproc.routing.compile import Compiled, compile_routes
from extproc.routing.gateway import Gateway
from extproc.routing.modes import Learned, LearnedStore, list_learned

log = logging.getLogger("extproc")

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
# Make before break: keys (asked for by the clusters that use them) and clusters reach Envoy before the
# routes naming them.
ORDER = (SECRET_TYPE, CLUSTER_TYPE, ROUTE_TYPE)
T = TypeVar("T")
POLL_SECONDS = 0.1  # how often a reload or a new fact is looked for (cheap: two comparisons)
STORE_SECONDS = 5.0  # how often the store's learned facts (other replicas') are read


def _pack(msg: Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


class LongStreams:
    """Streams Envoy keeps open for good (ADS, access log): they end first at shutdown, which would
    otherwise wait its whole grace period for them. Envoy keeps its last routes meanwhile."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()

    async def messages(self, stream: AsyncIterator[T]) -> AsyncIterator[T]:
        """The stream's messages, until it ends or the server shuts down."""
        closing = asyncio.create_task(self.closing.wait())
        try:
            while True:
                message = asyncio.ensure_future(anext(stream))
                await asyncio.wait((message, closing), return_when=asyncio.FIRST_COMPLETED)
                if not message.done():
                    message.cancel()
                    return
                try:
                    yield message.result()
                except StopAsyncIteration:
                    return
        finally:
            closing.cancel()

    def end(self) -> None:
        self.closing.set()


class Snapshot:
    """The resources of each type, and a version that changes exactly when they do."""

    def __init__(self, compiled: Compiled):
        self.resources = {SECRET_TYPE: [_pack(s) for s in compiled.secrets],
                          CLUSTER_TYPE: [_pack(c) for c in compiled.clusters], ROUTE_TYPE: [_pack(compiled.routes)]}
        digest = hashlib.sha256()
        for kind in ORDER:
            for res in self.resources[kind]:
                digest.update(res.SerializeToString(deterministic=True))
        self.version = digest.hexdigest()[:16]


class Discovery:
    def __init__(self, streams: LongStreams) -> None:
        self.long = streams
        self.snapshot: Snapshot | None = None
        self.streams: set[asyncio.Event] = set()  # one per connected Envoy: set when there is news

    def __mapping__(self) -> dict[str, Handler]:
        return methods(ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"], self)

    def publish(self, compiled: Compiled) -> bool:
        """Install a compiled result; True when it differs from what Envoy has."""
        snap = Snapshot(compiled)
        if self.snapshot is not None and snap.version == self.snapshot.version:
            return False
        self.snapshot = snap
        for wake in self.streams:
            wake.set()
        return True

    async def StreamAggregatedResources(self, stream: Stream[pb.DiscoveryRequest, pb.DiscoveryResponse]) -> None:
        subscribed: dict[str, tuple[str, ...]] = {}  # type -> the resource names Envoy asked for
        sent: dict[str, str] = {}
        wake = asyncio.Event()

        async def read() -> None:
            async for req in self.long.messages(stream):
                if req.HasField("error_detail"):
                    log.error("xds: Envoy rejected %s version %s: %s", req.type_url.rsplit(".", 1)[-1],
                              req.response_nonce, req.error_detail.message)
                names = tuple(sorted(req.resource_names))
                if req.type_url in ORDER and subscribed.get(req.type_url) != names:
                    # A new subscription, or other names (a new cluster asks for its key): answer it again.
                    subscribed[req.type_url] = names
                    sent.pop(req.type_url, None)
                    wake.set()
            wake.set()

        reader = asyncio.create_task(read())
        self.streams.add(wake)
        try:
            while not reader.done():
                await wake.wait()
                wake.clear()
                if self.snapshot is not None:
                    await self._send(stream, self.snapshot, subscribed, sent)
        finally:
            self.streams.discard(wake)
            reader.cancel()

    @staticmethod
    async def _send(stream: Stream[pb.DiscoveryRequest, pb.DiscoveryResponse], snap: Snapshot,
                    subscribed: dict[str, tuple[str, ...]], sent: dict[str, str]) -> None:
        for kind in ORDER:
            if kind in subscribed and sent.get(kind) != snap.version:
                await stream.send_message(pb.DiscoveryResponse(version_info=snap.version, type_url=kind,
                                                         resources=snap.resources[kind], nonce=snap.version))
                sent[kind] = snap.version


async def follow(discovery: Discovery, current: Callable[[], Gateway], store: LearnedStore) -> None:
    """Keep Envoy's routes equal to what the current gateway would decide, within POLL_SECONDS."""
    seen: tuple[int, int] | None = None
    next_scan = 0.0
    learned: dict[tuple[str, str], Learned] = {}
    while True:
        gateway = current()
        mark = (id(gateway), gateway.knowledge.version)
        now = time.monotonic()
        if mark != seen or now >= next_scan:
            try:
                facts = await list_learned(store)
                learned = {(k.partition(":")[0], k.partition(":")[2]): v for k, v in facts.items()}
            except Exception as e:  # the store is down: keep the facts last read
                log.warning("xds: learned facts unavailable, routes keep the last ones read: %s", e)
            next_scan = now + STORE_SECONDS
            seen = mark
            try:
                if discovery.publish(compile_routes(gateway.config, gateway.knowledge, learned)):
                    log.info("xds: routes updated to version %s", discovery.snapshot.version if discovery.snapshot else "")
            except Exception:
                log.exception("xds: could not compile routes; Envoy keeps the last ones")
        await asyncio.sleep(POLL_SECONDS)

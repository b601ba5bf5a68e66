"""The gRPC shell: Envoy's ext_proc stream in, `Exchange` decisions out as ProcessingResponses.

All decisions live in `extproc.exchange.Exchange`; this module only converts messages and runs the
server (`running` holds what the sidecar does beside: reloads, `dns:` names, the admin pages).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from grpclib.const import Handler
from grpclib.server import Stream

from extproc.api import api_of
from extproc.config import load_config
from extproc.envoy import xds
from extproc.envoy.names import (
    FAILOVER_ROLE,
    FIRST_CONTACT_ROLE,
    H_ANSWERED,
    HOLD_ROLE,
    JUDGE_ROLE,
    NAMESPACE,
    ROLE_METADATA,
    TENANT_HEADER,
)
from extproc.envoy.ratelimit import RateLimits, TenantMeter
from extproc.envoy.running import GatewayHolder, Sidecar, every, tenant_secret, watch_files, watched_files
from extproc.envoy.serving import GrpcServer, methods
from extproc.errors import GatewayError
from extproc.exchange import Action, Exchange, Lookup, Step, error_action
from extproc.exchange.failover import FastJudge, GroupAttempt, Hold
from extproc.exchange.first_contact import FirstContact
from extproc.front.background import BackgroundRuns
from extproc.front.follow import Follower
from extproc.front.websocket import FrontDoor
from extproc.ops import access_log
from extproc.ops.admin import TOKEN_ENV, start_admin
from extproc.ops.attempt_log import AttemptLog
from extproc.ops.logs import configure_logging
from extproc.ops.metrics import ExchangeTimer, Metrics
from extproc.ops.record import record
from extproc.routing.discovery import discover_forever
from extproc.routing.gateway import Gateway
from extproc.routing.group_routes import ADDRESS_ATTRIBUTE, HOST_METADATA_ATTRIBUTE, member_at, named_member
from extproc.state.store import Store, StoreUnavailable, open_store

log = logging.getLogger("extproc")

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_MODES = {"BUFFERED": processing_mode_pb2.ProcessingMode.BUFFERED,
          "STREAMED": processing_mode_pb2.ProcessingMode.STREAMED}
_HEADER_KINDS = ("request_headers", "response_headers")
# Replies that change nothing, built once: most messages get one of these.
_CONTINUE = {
    "request_headers": pb.ProcessingResponse(request_headers=pb.HeadersResponse()),
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}


def _headers(header_map: base_pb2.HeaderMap) -> dict[str, str]:
    return {h.key: h.raw_value.decode("latin-1") if h.raw_value else h.value for h in header_map.headers}


def _set_header_options(options: Any, headers: Iterable[tuple[str, str]]) -> None:
    """Each header appended to `options` (a repeated HeaderValueOption) as one overwriting option, built in
    place: half the cost of constructing each and copying it in (every mutating reply pays it)."""
    add = options.add
    for key, value in headers:
        header = add(append_action=_OVERWRITE).header
        header.key = key
        header.raw_value = value.encode("latin-1")


def to_proto(kind: str, act: Action) -> pb.ProcessingResponse:
    if act.immediate is not None:
        status, body, ctype = act.immediate
        immediate = pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status), body=body, details="llm_gateway_sidecar"))
        _set_header_options(immediate.immediate_response.headers.set_headers,
                            [("content-type", ctype), *act.set_headers])
        return immediate
    if not (act.set_headers or act.remove_headers or act.body is not None or act.clear_route_cache
            or act.response_body_mode):
        return _CONTINUE[kind]
    if kind not in _HEADER_KINDS and not kind.endswith("_body"):
        return _CONTINUE[kind]
    # Built in place, field by field: a third of the cost of building each message and copying it
    # into its parent (every streamed chunk pays this; benchmarks/micro.py).
    resp = pb.ProcessingResponse()
    common = getattr(resp, kind).response
    common.SetInParent()  # present even when empty (a mode override alone)
    if act.clear_route_cache:
        common.clear_route_cache = True
    if act.set_headers or act.remove_headers:
        mutation = common.header_mutation
        mutation.SetInParent()
        _set_header_options(mutation.set_headers, act.set_headers)
        mutation.remove_headers.extend(act.remove_headers)
    if act.body is not None:
        if act.body:
            common.body_mutation.body = act.body
        else:
            common.body_mutation.clear_body = True
    if act.response_body_mode:
        resp.mode_override.response_body_mode = _MODES[act.response_body_mode]
    return resp


class Processor:
    def __init__(self, holder: GatewayHolder, store: Store, metrics: Metrics | None = None,
                 tenants: TenantMeter | None = None, runs: BackgroundRuns | None = None):
        self.holder = holder
        self.store = store
        self.metrics = metrics or Metrics()
        self.tenants = tenants
        self.runs = runs or BackgroundRuns(store, lambda: holder.gateway.config, _gateway_url(holder), self.metrics)
        # Each grouped request's client-side stream, by its id, until an attempt answers its client (a
        # `GroupAttempt` of this process sets it): the stream then ends, so Envoy sends it no answer's headers
        # (exchange/failover.py `HandedOver`: only Envoy's own reply needs them; an attempt on another
        # worker leaves them to come, and let go there).
        self.answered: dict[str, _Release] = {}

    async def _fetch(self, lookup: Lookup[Any]) -> list[bytes | None] | None:
        try:
            return await self.store.get_many(lookup.keys)
        except StoreUnavailable as e:
            self.metrics.store_errors.inc("get")
            log.warning("state store unavailable: %s", e)
            return None

    async def _write(self, writes: list[tuple[str, bytes | None]], ttl: int | None) -> None:
        try:
            await self.store.write(writes, ttl)
        except StoreUnavailable as e:
            self.metrics.store_errors.inc("write")
            log.warning("state store unavailable, %d records not written: %s", len(writes), e)

    async def _step(self, ex: Exchange | FirstContact | GroupAttempt | FastJudge, kind: str,
                    req: pb.ProcessingRequest) -> Action:
        """One Envoy message through the exchange, store lookups included; errors become answers."""
        try:
            step: Step
            if isinstance(ex, FastJudge) and kind in _HEADER_KINDS:  # the member, the attempt, the request's id and route
                ex.attributes = _attributes(req)
            if kind == "request_headers":
                if isinstance(ex, GroupAttempt):  # the instance Envoy chose for this attempt
                    ex.host = _attribute(req, ADDRESS_ATTRIBUTE)
                    ex.named = named_member(_attribute(req, HOST_METADATA_ATTRIBUTE))
                step = ex.request_headers(_headers(req.request_headers.headers), req.request_headers.end_of_stream)
            elif kind == "request_body":
                step = ex.request_body(req.request_body.body)
            elif kind == "response_headers":
                step = ex.response_headers(_headers(req.response_headers.headers), req.response_headers.end_of_stream)
            elif kind == "response_body":
                step = ex.response_body(req.response_body.body, req.response_body.end_of_stream)
            else:
                step = Action()
            while isinstance(step, Lookup):
                step = step.then(await self._fetch(step))
            return step
        except GatewayError as e:
            if e.status >= 500:
                log.warning("%s %s model=%s: %s", ex.method, ex.path, ex.model, e.message)
            ex.failure = e
            return error_action(e, api_of(ex.path))
        except Exception:
            log.exception("%s %s model=%s: internal error in %s", ex.method, ex.path, ex.model, kind)
            ex.failure = GatewayError(500, "internal error in the gateway sidecar", code="gateway_error")
            return error_action(ex.failure, api_of(ex.path))

    def __mapping__(self) -> dict[str, Handler]:
        return methods(pb.DESCRIPTOR.services_by_name["ExternalProcessor"], self)

    async def Process(self, stream: Stream[pb.ProcessingRequest, pb.ProcessingResponse]) -> None:
        """One HTTP exchange."""
        # An upstream filter (of first-contact requests, of a model group's attempts) names itself in the
        # stream's metadata.
        role = stream.metadata.get(ROLE_METADATA) if stream.metadata else None
        if role == HOLD_ROLE:
            return await self._hold(stream)
        gw = self.holder.gateway
        ex: Exchange | FirstContact | GroupAttempt | FastJudge = FirstContact(gw) if role == FIRST_CONTACT_ROLE \
            else GroupAttempt(gw) if role == FAILOVER_ROLE else FastJudge(gw) if role == JUDGE_ROLE \
            else Exchange(gw, envoy_counts=True)
        timer = self.metrics.timer()
        handed: str | None = None  # a grouped request's id, while its client-side stream waits for an answer
        try:
            while True:
                req = await self._next(stream, handed)
                if req is None:
                    return
                kind = req.WhichOneof("request")
                t0 = time.perf_counter()
                marked = isinstance(ex, GroupAttempt) and ex.lets_go
                act = await self._step(ex, kind, req)
                if isinstance(ex, GroupAttempt) and ex.lets_go and not marked:  # the message that lets it go
                    act = dataclasses.replace(act, set_headers=[*act.set_headers, (H_ANSWERED, "1")])
                if act.background is not None:  # a background turn: within this replica's limit, or a 429
                    act = self.runs.admit(act)
                if act.writes:  # before the reply goes on: a client that sees an id can use it at once
                    await self._write(act.writes, act.write_ttl)
                if act.background is not None:  # run once its queued record is written
                    await self.runs.start(act.background)
                if isinstance(ex, GroupAttempt) and ex.answered and (waiting := self.answered.pop(ex.rid, None)):
                    await waiting.release()  # the client-side stream ends before this answer reaches it
                resp = to_proto(kind, act)
                handover = ex.req.handover if isinstance(ex, Exchange) and handed is None else None
                if handover is not None and not act.done:  # before the reply: no attempt can answer sooner
                    handed = handover.rid
                    self.answered[handed] = _Release()
                if (act.done or handover is not None) and (meta := ex.metadata()) is not None:
                    resp = _with_metadata(resp, meta)
                timer.message(kind, t0, time.perf_counter())
                await stream.send_message(resp)
                if act.done:
                    return
        finally:
            if handed is not None:
                self.answered.pop(handed, None)
            if isinstance(ex, Exchange) and not ex.handed_over:  # a first-contact attempt is reported by its
                self._record(ex, timer)  # client-side exchange, a grouped request by its attempts
            elif isinstance(ex, Exchange) and ex.failure is not None:  # ... unless no attempt answered it
                self._record_told(ex, timer)
            elif isinstance(ex, GroupAttempt):
                self._record_attempts(ex, timer)

    async def _next(self, stream: Stream[pb.ProcessingRequest, pb.ProcessingResponse],
                    handed: str | None) -> pb.ProcessingRequest | None:
        """Envoy's next message; None when the stream ends, or, for a grouped request's client-side stream,
        once an attempt answered its client."""
        if handed is None:
            return await stream.recv_message()
        release = self.answered.get(handed)
        if release is None:
            return None
        recv = asyncio.ensure_future(stream.recv_message())
        wait = asyncio.ensure_future(release.asked.wait())
        done, _ = await asyncio.wait((recv, wait), return_when=asyncio.FIRST_COMPLETED)
        if recv in done:
            wait.cancel()
            return recv.result()
        recv.cancel()
        try:
            await stream.send_trailing_metadata()  # ended here, so that Envoy reads it before the answer
        finally:
            release.closed.set()
        return None

    async def _hold(self, stream: Stream[pb.ProcessingRequest, pb.ProcessingResponse]) -> None:
        """A grouped attempt's hold filter (`Hold`): each message answered as it is, the answer's headers
        only once its first body chunk came."""
        hold = Hold()
        while not hold.done and (req := await stream.recv_message()) is not None:
            kind = req.WhichOneof("request")
            for due in hold.message(kind, req.response_headers.end_of_stream):
                await stream.send_message(_CONTINUE[due])

    def _record(self, ex: Exchange, timer: ExchangeTimer) -> None:
        record(ex, self.metrics, timer, self.holder.gateway.classifier.label_for)
        if self.tenants is not None and ex.client_api is not None and not ex.counted_by_envoy:
            u = ex.usage
            self.tenants.count(ex.headers.get(TENANT_HEADER), u.input_tokens if u else 0, u.output_tokens if u else 0)


    def _record_told(self, ex: Exchange, timer: ExchangeTimer) -> None:
        """A grouped request Envoy answered with no attempt's processor left (its reply replaced by the
        error naming each attempt): the attempts nobody saw end, and the request, reported here."""
        now = time.monotonic()
        for a in ex.unseen_attempts:
            self.metrics.record_attempt(a, self.holder.gateway.health, now)
        self._record(ex, timer)

    def _record_attempts(self, attempt: GroupAttempt, timer: ExchangeTimer) -> None:
        """Each upstream attempt counted and told to its backend's health; the one that answered (or the
        last one, whose error names them all) reported as the request."""
        now = time.monotonic()
        for a in attempt.attempts:
            self.metrics.record_attempt(a, self.holder.gateway.health, now)
        reported = attempt.served or (attempt.ex if attempt.last or attempt.failure is not None else None)
        if reported is not None:
            if attempt.failure is not None:
                reported.failure = attempt.failure
            self._record(reported, timer)


class _Release:
    """A grouped request's client-side stream let go by the attempt that answered its client: `asked` by
    that attempt, which waits (briefly) until the stream is `closed`, before its own reply goes."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.closed = asyncio.Event()

    async def release(self) -> None:
        self.asked.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closed.wait(), 0.05)


def _attribute(req: pb.ProcessingRequest, name: str) -> str:
    """A CEL attribute Envoy sent with the request headers (the filter's `request_attributes`)."""
    for struct in req.attributes.values():
        if name in struct.fields:
            return str(struct.fields[name].string_value)
    return ""


def _attributes(req: pb.ProcessingRequest) -> dict[str, str]:
    """Every CEL attribute Envoy sent with this message, as text (a count's number without its `.0`)."""
    out = {}
    for struct in req.attributes.values():
        for name, value in struct.fields.items():
            kind = value.WhichOneof("kind")
            out[name] = str(int(value.number_value)) if kind == "number_value" else str(getattr(value, kind or "string_value"))
    return out


def _with_metadata(resp: pb.ProcessingResponse, meta: dict[str, Any]) -> pb.ProcessingResponse:
    """Dynamic metadata for Envoy's access log (in NAMESPACE); the shared replies are copied."""
    out = pb.ProcessingResponse()
    out.CopyFrom(resp)
    _set_struct(out.dynamic_metadata.fields[NAMESPACE].struct_value, meta)
    return out


# A scalar's Value field by its exact type, the common case looked up at once.
_VALUE_FIELD = {str: "string_value", bool: "bool_value", int: "number_value", float: "number_value"}


def _set_struct(struct: struct_pb2.Struct, values: dict[str, Any]) -> None:
    """`values` into `struct`, field by field: the same message `Struct.update` builds at two thirds of its
    cost (its per-value dispatch is Python; every exchange's last reply pays it, benchmarks/micro.py)."""
    struct.SetInParent()  # present even when empty
    fields = struct.fields
    for key, v in values.items():
        _set_value(fields[key], v)


def _set_value(value: struct_pb2.Value, v: Any) -> None:
    """One JSON value, typed as `Struct.update` types it (a subclass of str or int as its base)."""
    name = _VALUE_FIELD.get(type(v))
    if name is not None:
        setattr(value, name, v)
    elif v is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(v, bool):
        value.bool_value = v
    elif isinstance(v, str):
        value.string_value = v
    elif isinstance(v, int | float):
        value.number_value = v
    elif isinstance(v, dict):
        _set_struct(value.struct_value, v)
    elif isinstance(v, list | tuple):
        items = value.list_value
        items.SetInParent()
        for item in v:
            _set_value(items.values.add(), item)
    else:
        raise TypeError(f"no protobuf Value for {type(v).__name__}")


class _Services:
    """The gRPC server and what its shutdown has to end: the long xDS and access-log streams."""

    def __init__(self, sidecar: Sidecar):
        holder = sidecar.holder
        tenants = TenantMeter(lambda: holder.gateway.config.clients, sidecar.store, sidecar.metrics)  # `clients`
        self.processor = Processor(holder, sidecar.store, sidecar.metrics, tenants)
        self.long_streams = xds.LongStreams()
        # Envoy's routes (the fast path) and the access log of what took it
        self.discovery = xds.Discovery(self.long_streams)
        self.server = GrpcServer([
            self.processor, self.discovery,
            access_log.AccessLog(sidecar.metrics, self.long_streams,
                                 lambda model: holder.gateway.classifier.label_for(model), tenants,
                                 lambda label, address: member_at(holder.gateway.config, label, address)),
            RateLimits(lambda: holder.gateway.config.clients, sidecar.store, sidecar.metrics),
            AttemptLog(sidecar.metrics, lambda: (holder.gateway.config, holder.gateway.health))],
            checked=self.processor)

    async def stop(self, grace: float) -> None:
        self.server.drain()
        self.long_streams.end()
        await self.server.finish(grace)
        await self.processor.runs.close()


def _gateway_url(holder: GatewayHolder) -> Callable[[], str]:
    """Envoy's listener, where the sidecar's own requests go (WebSocket messages, background runs)."""
    return lambda: os.environ.get("EXTPROC_WEBSOCKET_GATEWAY") or holder.gateway.config.websocket_gateway


def _listen(env: str, configured: str | None) -> str | None:
    """A listener's address, the environment first; None when it is off."""
    listen = os.environ.get(env, configured or "")
    return listen if listen and listen != "off" else None


async def serve(config_path: str) -> None:
    config = load_config(config_path)
    configure_logging(config.log_format, os.environ.get("EXTPROC_LOG_LEVEL", config.log_level))
    for warning in config.warnings:
        log.warning("config: %s", warning)
    store = open_store(config.state)
    holder = GatewayHolder(Gateway(config, tenant_secret=await tenant_secret(config, store)))
    sidecar = Sidecar(config_path, holder, store, Metrics())
    services = _Services(sidecar)
    listen = os.environ.get("EXTPROC_LISTEN", config.listen)
    await services.server.start(listen, config.listen_tls)
    log.info("ext_proc sidecar listening on %s with %d backends, state in %s", listen, len(config.backends),
             config.state.store)
    admin = front = None
    if (admin_listen := _listen("EXTPROC_ADMIN_LISTEN", config.admin_listen)) is not None:
        admin = await start_admin(admin_listen, sidecar.admin_routes(), os.environ.get(TOKEN_ENV) or None)
    if (websocket_listen := _listen("EXTPROC_WEBSOCKET_LISTEN", config.websocket_listen)) is not None:
        front = FrontDoor(lambda: holder.gateway.config, os.environ.get("EXTPROC_WEBSOCKET_GATEWAY"),
                          Follower(store, lambda: holder.gateway.sealer, lambda: holder.gateway.config))
        await front.start(websocket_listen)
    tasks = [asyncio.create_task(discover_forever(lambda: holder.gateway)),
             asyncio.create_task(xds.follow(services.discovery, lambda: holder.gateway, store)),
             asyncio.create_task(watch_files(lambda: watched_files(config_path, holder.gateway.config), sidecar.reload)),
             asyncio.create_task(every(lambda: holder.gateway.config.discovery.interval_seconds, sidecar.follow_dns))]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, sidecar.reload)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    grace = os.environ.get("EXTPROC_SHUTDOWN_GRACE", "30")
    log.info("stopping: no new streams, %ss for those in flight", grace)
    for task in tasks:
        task.cancel()
    await services.stop(float(grace))
    if admin is not None:
        await admin.cleanup()
    if front is not None:
        await front.close()
    await store.close()

"""The gRPC shell: Envoy's ext_proc stream in, `Exchange` decisions out as ProcessingResponses.

All decisions live in `flow.Exchange`; this module only converts messages and runs the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable
from urllib.parse import parse_qs

import grpc
import orjson
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.service.ratelimit.v3 import rls_pb2_grpc
from envoy.type.v3 import http_status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc.clients import TENANT_HEADER
from extproc.config import Config, ConfigError, ListenTLS, load_config
from extproc.envoy import xds
from extproc.envoy.ratelimit import RateLimits, TenantMeter
from extproc.errors import GatewayError
from extproc.exchange import Action, Exchange, Lookup, Step, error_action
from extproc.exchange.first_contact import ROLE, FirstContact
from extproc.front.websocket import FrontDoor
from extproc.ops import access_log
from extproc.ops.admin import TOKEN_ENV, start_admin
from extproc.ops.logs import configure_logging
from extproc.ops.metrics import CONTENT_TYPE, ExchangeTimer, Metrics
from extproc.ops.record import record
from extproc.routing.discovery import discover_forever
from extproc.routing.gateway import Gateway
from extproc.routing.modes import forget_learned, list_learned
from extproc.state.store import Store, StoreUnavailable, open_store
from extproc.state.tenancy import SECRET_KEY

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
_MAX_MESSAGE = 128 * 1024 * 1024
METADATA_NAMESPACE = "llm_gateway"  # deploy/envoy.yaml accepts it (metadata_options) and logs from it


def _headers(header_map: base_pb2.HeaderMap) -> dict[str, str]:
    return {h.key: h.raw_value.decode("latin-1") if h.raw_value else h.value for h in header_map.headers}


def _header_option(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=value.encode("latin-1")),
                                      append_action=_OVERWRITE)


def to_proto(kind: str, act: Action) -> pb.ProcessingResponse:
    if act.immediate is not None:
        status, body, ctype = act.immediate
        return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=pb.HeaderMutation(set_headers=[_header_option("content-type", ctype),
                                                   *(_header_option(k, v) for k, v in act.set_headers)]),
            body=body, details="llm_gateway_sidecar"))
    if not (act.set_headers or act.remove_headers or act.body is not None or act.clear_route_cache
            or act.response_body_mode):
        return _CONTINUE[kind]
    common = pb.CommonResponse(clear_route_cache=act.clear_route_cache)
    if act.set_headers or act.remove_headers:
        common.header_mutation.CopyFrom(pb.HeaderMutation(
            set_headers=[_header_option(k, v) for k, v in act.set_headers], remove_headers=act.remove_headers))
    if act.body is not None:
        if act.body:
            common.body_mutation.body = act.body
        else:
            common.body_mutation.clear_body = True
    if kind in _HEADER_KINDS:
        resp = pb.ProcessingResponse(**{kind: pb.HeadersResponse(response=common)})
    elif kind.endswith("_body"):
        resp = pb.ProcessingResponse(**{kind: pb.BodyResponse(response=common)})
    else:
        return _CONTINUE[kind]
    if act.response_body_mode:
        resp.mode_override.response_body_mode = _MODES[act.response_body_mode]
    return resp


class GatewayHolder:
    """The current Gateway; a reload swaps it while in-flight exchanges keep the one they started with."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway


class Processor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, holder: GatewayHolder, store: Store, metrics: Metrics | None = None,
                 tenants: TenantMeter | None = None):
        self.holder = holder
        self.store = store
        self.metrics = metrics or Metrics()
        self.tenants = tenants

    async def _fetch(self, lookup: Lookup) -> list[bytes | None] | None:
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

    async def _step(self, ex: Exchange | FirstContact, kind: str, req: pb.ProcessingRequest) -> Action:
        """One Envoy message through the exchange, store lookups included; errors become answers."""
        try:
            step: Step
            if kind == "request_headers":
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
            return error_action(e)
        except Exception:
            log.exception("%s %s model=%s: internal error in %s", ex.method, ex.path, ex.model, kind)
            ex.failure = GatewayError(500, "internal error in the gateway sidecar", code="gateway_error")
            return error_action(ex.failure)

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> None:
        """One HTTP exchange. context.read()/write() rather than an async generator: measured 15-25%
        more requests per second through grpc.aio (benchmarks/floor_processor.py)."""
        # The upstream filter of first-contact requests names itself in the stream's metadata.
        upstream = any(k == "x-extproc-role" and v == ROLE for k, v in context.invocation_metadata() or ())
        ex = FirstContact(self.holder.gateway) if upstream else Exchange(self.holder.gateway)
        timer = self.metrics.timer()
        try:
            while True:
                req = await context.read()
                if req is grpc.aio.EOF:
                    return
                kind = req.WhichOneof("request")
                t0 = time.perf_counter()
                act = await self._step(ex, kind, req)
                if act.writes:  # before the reply goes on: a client that sees an id can use it at once
                    await self._write(act.writes, act.write_ttl)
                resp = to_proto(kind, act)
                if act.done and (meta := ex.metadata()) is not None:
                    resp = _with_metadata(resp, meta)
                timer.message(kind, t0, time.perf_counter())
                await context.write(resp)
                if act.done:
                    return
        finally:
            if isinstance(ex, Exchange):  # a first-contact attempt is reported by its client-side exchange
                self._record(ex, timer)

    def _record(self, ex: Exchange, timer: ExchangeTimer) -> None:
        record(ex, self.metrics, timer, self.holder.gateway.classifier.label_for)
        if self.tenants is not None and ex.client_api is not None:
            u = ex.usage
            self.tenants.count(ex.headers.get(TENANT_HEADER), u.input_tokens if u else 0, u.output_tokens if u else 0)


def _with_metadata(resp: pb.ProcessingResponse, meta: dict) -> pb.ProcessingResponse:
    """Dynamic metadata for Envoy's access log (namespace llm_gateway); the shared replies are copied."""
    out = pb.ProcessingResponse()
    out.CopyFrom(resp)
    out.dynamic_metadata.update({METADATA_NAMESPACE: meta})
    return out


def _bind(server: grpc.aio.Server, listen: str, tls: ListenTLS | None) -> None:
    """`host:port`, or `unix:/path/to.sock` for Envoy on the same host without a TCP port."""
    if tls is None:
        bound = server.add_insecure_port(listen)
    else:
        def read(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()
        creds = grpc.ssl_server_credentials(
            [(read(tls.key_file), read(tls.cert_file))],
            root_certificates=read(tls.client_ca_file) if tls.client_ca_file else None,
            require_client_auth=tls.client_ca_file is not None)
        bound = server.add_secure_port(listen, creds)
    if bound == 0 and not listen.startswith("unix:"):
        raise OSError(f"cannot listen on {listen}")


async def serve(config_path: str) -> None:
    config = load_config(config_path)
    configure_logging(config.log_format, os.environ.get("EXTPROC_LOG_LEVEL", config.log_level))
    for warning in config.warnings:
        log.warning("config: %s", warning)
    store = open_store(config.state)
    holder = GatewayHolder(Gateway(config, tenant_secret=await tenant_secret(config, store)))
    metrics = Metrics()
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", _MAX_MESSAGE),
        ("grpc.max_send_message_length", _MAX_MESSAGE),
        ("grpc.so_reuseport", 1),
    ])
    tenants = TenantMeter(lambda: holder.gateway.config.clients, store, metrics)  # the `clients` section's
    pb_grpc.add_ExternalProcessorServicer_to_server(Processor(holder, store, metrics, tenants), server)
    long_streams = xds.LongStreams()
    discovery = xds.Discovery(long_streams)  # Envoy's routes (the fast path) and the access log of what took it
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(discovery, server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(access_log.AccessLog(
        metrics, long_streams, lambda model: holder.gateway.classifier.label_for(model), tenants), server)
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(
        RateLimits(lambda: holder.gateway.config.clients, store, metrics), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    listen = os.environ.get("EXTPROC_LISTEN", config.listen)
    _bind(server, listen, config.listen_tls)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("envoy.service.ext_proc.v3.ExternalProcessor", health_pb2.HealthCheckResponse.SERVING)
    log.info("ext_proc sidecar listening on %s with %d backends, state in %s", listen, len(config.backends),
             config.state.store)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def install(new: Config) -> None:
        """A new config for new exchanges; what was discovered and learned carries over."""
        holder.gateway = Gateway(new, holder.gateway.knowledge, tenant_secret=holder.gateway.tenant_secret)

    def reload() -> None:
        try:
            new = load_config(config_path)
            if new.state != holder.gateway.config.state:
                log.warning("config reload: 'state' changes take effect at the next restart")
            install(new)
            log.info("config reloaded from %s", config_path)
            for warning in new.warnings:
                log.warning("config: %s", warning)
        except ConfigError as e:
            log.error("config reload rejected, keeping the running config:\n%s", e)

    def unavailable(e: StoreUnavailable) -> tuple[int, bytes, str]:
        return 503, f"state store unavailable: {e}\n".encode(), "text/plain"

    async def ready(_query: str) -> tuple[int, bytes, str]:
        """Ready when the config is loaded and the state store answers; backends that cannot serve yet
        (a missing key, no instances) are named but do not hold the others back."""
        try:
            await store.get_many(("ready-probe",))
        except StoreUnavailable as e:
            return unavailable(e)
        return 200, "".join(f"{line}\n" for line in ["ready", *holder.gateway.config.unserved()]).encode(), "text/plain"

    async def healthy(_query: str) -> tuple[int, bytes, str]:
        return 200, b"ok\n", "text/plain"

    async def metrics_page(_query: str) -> tuple[int, bytes, str]:
        return 200, metrics.render(), CONTENT_TYPE

    async def learned(_query: str) -> tuple[int, bytes, str]:
        """Model APIs learned at run time (shared ones too, with a shared store)."""
        try:
            known = await list_learned(store)
        except StoreUnavailable as e:
            return unavailable(e)
        return 200, orjson.dumps({name: fact.as_dict() for name, fact in known.items()}), "application/json"

    async def forget(query: str) -> tuple[int, bytes, str]:
        """DELETE /learned?model=BACKEND:MODEL (repeatable), or ?all=1."""
        params = parse_qs(query)
        try:
            gone = await forget_learned(store, params.get("model", []), everything=bool(params.get("all")))
        except StoreUnavailable as e:
            return unavailable(e)
        holder.gateway.knowledge.forget_all()
        return 200, orjson.dumps({"forgotten": gone}), "application/json"

    admin_listen = os.environ.get("EXTPROC_ADMIN_LISTEN", config.admin_listen or "")
    admin = None
    if admin_listen and admin_listen != "off":
        admin = await start_admin(admin_listen, {"GET /healthz": healthy, "GET /readyz": ready,
                                                 "GET /metrics": metrics_page, "GET /learned": learned,
                                                 "DELETE /learned": forget}, os.environ.get(TOKEN_ENV) or None)

    websocket_listen = os.environ.get("EXTPROC_WEBSOCKET_LISTEN", config.websocket_listen or "")
    front = None
    if websocket_listen and websocket_listen != "off":
        front = FrontDoor(lambda: holder.gateway.config, os.environ.get("EXTPROC_WEBSOCKET_GATEWAY"))
        await front.start(websocket_listen)

    def follow_dns() -> None:
        """`dns:` endpoints (a headless Service): the ring follows the addresses as they change."""
        current = holder.gateway.config
        backends = []
        for b in current.backends:
            endpoints = b.resolve_dns() if b.dns_names else None
            backends.append(b if endpoints is None else dataclasses.replace(b, endpoints=endpoints))
        if [b.endpoints for b in backends] != [b.endpoints for b in current.backends]:
            log.info("dns endpoints changed; ring rebuilt")
            install(dataclasses.replace(current, backends=tuple(backends)))

    tasks = [asyncio.create_task(discover_forever(lambda: holder.gateway)),
             asyncio.create_task(xds.follow(discovery, lambda: holder.gateway, store)),
             asyncio.create_task(watch_file(config_path, reload)),
             asyncio.create_task(every(lambda: holder.gateway.config.discovery.interval_seconds, follow_dns))]
    loop.add_signal_handler(signal.SIGHUP, reload)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: no new streams, %ss for those in flight", os.environ.get("EXTPROC_SHUTDOWN_GRACE", "30"))
    for task in tasks:
        task.cancel()
    await health_servicer.enter_graceful_shutdown()
    long_streams.end()
    await server.stop(grace=float(os.environ.get("EXTPROC_SHUTDOWN_GRACE", "30")))
    if admin is not None:
        await admin.cleanup()
    if front is not None:
        await front.close()
    await store.close()


async def tenant_secret(config: Config, store: Store) -> bytes:
    """The HMAC key of tenant ids: from the environment, else one random secret the replicas sharing
    the store agree on (the first to start writes it). Without it no stored record can be found, so
    start-up waits for the store."""
    given = os.environ.get(config.tenancy.secret_env)
    if given:
        return given.encode()
    while True:
        try:
            return await store.add(SECRET_KEY, secrets.token_hex(32).encode())
        except StoreUnavailable as e:
            log.warning("waiting for the state store to read the tenant secret: %s", e)
            await asyncio.sleep(1)


async def every(seconds: Callable[[], float], action: Callable[[], None]) -> None:
    while True:
        await asyncio.sleep(seconds())
        try:
            await asyncio.to_thread(action)  # name resolution blocks
        except Exception:
            log.exception("periodic task failed")


async def watch_file(path: str, on_change: Callable[[], None], interval: float = 2.0) -> None:
    """Reload when the config file changes (a ConfigMap update included), as SIGHUP does."""
    def stamp() -> tuple[float, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_mtime, st.st_size

    last = stamp()
    while True:
        await asyncio.sleep(interval)
        now = stamp()
        if now is not None and now != last:
            last = now
            on_change()

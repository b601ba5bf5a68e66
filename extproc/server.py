"""The gRPC shell: Envoy's ext_proc stream in, `Exchange` decisions out as ProcessingResponses.

All decisions live in `flow.Exchange`; this module only converts messages and runs the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .config import ConfigError, load_config
from .discovery import discover_forever
from .errors import GatewayError
from .flow import Action, Exchange, Lookup, error_action
from .routing import Gateway
from .store import Store, StoreUnavailable, open_store

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
            headers=pb.HeaderMutation(set_headers=[_header_option("content-type", ctype)]),
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
    def __init__(self, holder: GatewayHolder, store: Store):
        self.holder = holder
        self.store = store

    async def _fetch(self, lookup: Lookup) -> list[bytes | None] | None:
        try:
            return await self.store.get_many(lookup.keys)
        except StoreUnavailable as e:
            log.warning("state store unavailable: %s", e)
            return None

    async def _write(self, writes: list[tuple[str, bytes | None]], ttl: int | None) -> None:
        try:
            await self.store.write(writes, ttl)
        except StoreUnavailable as e:
            log.warning("state store unavailable, %d records not written: %s", len(writes), e)

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ProcessingResponse]:
        ex = Exchange(self.holder.gateway)
        async for req in request_iterator:
            kind = req.WhichOneof("request")
            try:
                step: Action | Lookup
                if kind == "request_headers":
                    step = ex.request_headers(_headers(req.request_headers.headers), req.request_headers.end_of_stream)
                elif kind == "request_body":
                    step = ex.request_body(req.request_body.body)
                elif kind == "response_headers":
                    step = ex.response_headers(_headers(req.response_headers.headers))
                elif kind == "response_body":
                    step = ex.response_body(req.response_body.body, req.response_body.end_of_stream)
                else:
                    step = Action()
                while isinstance(step, Lookup):
                    step = step.then(await self._fetch(step))
                act = step
            except GatewayError as e:
                if e.status >= 500:
                    log.warning("%s %s model=%s: %s", ex.method, ex.path, ex.model, e.message)
                else:
                    log.info("%s %s model=%s: %d %s", ex.method, ex.path, ex.model, e.status, e.message)
                act = error_action(e)
            except Exception:
                log.exception("%s %s model=%s: internal error in %s", ex.method, ex.path, ex.model, kind)
                act = error_action(GatewayError(500, "internal error in the gateway sidecar", code="gateway_error"))
            if act.writes:  # before the reply goes on: a client that sees an id can use it at once
                await self._write(act.writes, act.write_ttl)
            yield to_proto(kind, act)
            if act.done:
                return


def _bind(server: grpc.aio.Server, listen: str) -> None:
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")


async def serve(config_path: str) -> None:
    config = load_config(config_path)
    logging.getLogger().setLevel(os.environ.get("EXTPROC_LOG_LEVEL", config.log_level).upper())
    holder = GatewayHolder(Gateway(config))
    store = open_store(config.state)
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", _MAX_MESSAGE),
        ("grpc.max_send_message_length", _MAX_MESSAGE),
        ("grpc.so_reuseport", 1),
    ])
    pb_grpc.add_ExternalProcessorServicer_to_server(Processor(holder, store), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    listen = os.environ.get("EXTPROC_LISTEN", config.listen)
    _bind(server, listen)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("envoy.service.ext_proc.v3.ExternalProcessor", health_pb2.HealthCheckResponse.SERVING)
    log.info("ext_proc sidecar listening on %s with %d backends, state in %s", listen, len(config.backends),
             config.state.store)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reload() -> None:
        try:
            new = load_config(config_path)
            if new.state != holder.gateway.config.state:
                log.warning("config reload: 'state' changes take effect at the next restart")
            holder.gateway = Gateway(new, holder.gateway.knowledge)
            log.info("config reloaded from %s", config_path)
        except ConfigError as e:
            log.error("config reload rejected, keeping the running config:\n%s", e)

    discovery = asyncio.create_task(discover_forever(lambda: holder.gateway))
    loop.add_signal_handler(signal.SIGHUP, reload)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    discovery.cancel()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=float(os.environ.get("EXTPROC_SHUTDOWN_GRACE", "30")))
    await store.close()

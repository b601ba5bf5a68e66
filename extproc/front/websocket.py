"""WebSocket mode's front door (aiohttp): Envoy routes upgrades on /v1/responses here, and the
streams of background responses the processor sends here (`front.follow`).

The model is only known per message, so the socket is not bound to a backend: each `response.create`
goes back through Envoy's own listener as a streaming `POST /v1/responses` with the client's headers
(authorization included), and its events are relayed as text messages. The decisions (what a
message becomes, which error event) live in `socket_turns`; this module only moves bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import aiohttp
from aiohttp import web

from extproc.config import Config
from extproc.errors import GatewayError
from extproc.front.follow import Follower
from extproc.front.socket_turns import (
    SocketSession,
    connection_limit_reached,
    error_event,
    gateway_error_event,
    upstream_error_event,
)
from extproc.translate.sse import Event, SSEDecoder

log = logging.getLogger("extproc")

# Request headers of the upgrade that describe the socket, not the client: never forwarded.
_NOT_FORWARDED = {"host", "connection", "upgrade", "content-length", "content-type", "transfer-encoding",
                  "keep-alive", "te", "trailer", "accept", "accept-encoding", "x-request-id", "origin"}
_ERROR_BODY_LIMIT = 1024 * 1024
_IDLE_READ_SECONDS = 600  # as Envoy's stream_idle_timeout: an upstream silent this long is given up


def forwarded_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The client's own headers (authorization, organisation, tenant...) for each message's request."""
    return {k: v for k, v in dict(headers).items()
            if k.lower() not in _NOT_FORWARDED and not k.lower().startswith(("sec-websocket-", "x-envoy-", "proxy-"))}


class FrontDoor:
    """The listener and the HTTP client its messages use."""

    def __init__(self, config: Callable[[], Config], gateway: str | None = None, follower: Follower | None = None):
        self.config = config
        self.gateway = gateway  # overrides the config's websocket_gateway (EXTPROC_WEBSOCKET_GATEWAY)
        self.follower = follower  # background responses' streams
        self.http: aiohttp.ClientSession | None = None
        self.runner: web.AppRunner | None = None

    async def start(self, listen: str) -> None:
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=_IDLE_READ_SECONDS))
        app = web.Application()
        app.router.add_get("/v1/responses", self.socket)
        if self.follower is not None:  # the processor's routes keep the client's path: a create, or a resume
            app.router.add_post("/v1/responses", self.follower.handle)
            app.router.add_get(r"/v1/responses/{response_id}", self.follower.handle)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        host, _, port = listen.rpartition(":")
        # SO_REUSEPORT: `serve --workers N` share the one port Envoy's websocket cluster names; each
        # socket is one connection, so the kernel spreads them.
        await web.TCPSite(self.runner, host.strip("[]") or "127.0.0.1", int(port), reuse_port=True).start()
        log.info("WebSocket mode listening on %s, messages sent through %s", listen, self.gateway_url())

    def gateway_url(self) -> str:
        return self.gateway or self.config().websocket_gateway

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.http is not None:
            await self.http.close()

    async def socket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=self.config().limits.max_body_bytes, heartbeat=30)
        if not ws.can_prepare(request).ok:
            err = GatewayError(426, "GET /v1/responses here is WebSocket mode: send an Upgrade: websocket request",
                               code="upgrade_required")
            return web.Response(status=426, body=err.body(), content_type="application/json")
        await ws.prepare(request)
        headers = forwarded_headers(request.headers)
        session = SocketSession(limit_seconds=self.config().limits.websocket_max_seconds)
        while (remaining := session.remaining()) > 0:  # one turn at a time, in order, as the specification has it
            try:
                msg = await ws.receive(timeout=remaining)
            except TimeoutError:
                break
            if msg.type == aiohttp.WSMsgType.TEXT:
                await self.turn(ws, session, headers, msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_str(error_event(400, {"code": "unsupported_message",
                                                    "message": "send response.create events as text messages"}))
            else:  # closing, closed or broken
                return ws
        if not ws.closed:
            await ws.send_str(gateway_error_event(connection_limit_reached()))
            await ws.close()
        return ws

    async def turn(self, ws: web.WebSocketResponse, session: SocketSession, headers: dict[str, str], text: str) -> None:
        """One `response.create`: its streaming request through Envoy, the events relayed as they come."""
        try:
            body = session.request(text)
        except GatewayError as e:
            await ws.send_str(gateway_error_event(e))
            return  # a refused message is no turn: the cache is left as it was
        assert self.http is not None
        url = self.gateway_url() + "/v1/responses"
        try:
            async with self.http.post(url, data=body, headers={**headers, "content-type": "application/json",
                                                                "accept": "text/event-stream"}) as resp:
                if resp.status != 200 or resp.content_type != "text/event-stream":
                    session.failed()
                    await ws.send_str(upstream_error_event(resp.status if resp.status != 200 else 502,
                                                           await resp.content.read(_ERROR_BODY_LIMIT)))
                    return
                decoder = SSEDecoder()
                ended = False
                async for chunk in resp.content.iter_any():
                    ended = await self.relay(ws, session, decoder.feed(chunk)) or ended
                ended = await self.relay(ws, session, decoder.close()) or ended
        except (TimeoutError, aiohttp.ClientError) as e:
            log.warning("WebSocket turn: the gateway at %s failed: %r", url, e)
            ended = False
        if not ended:
            session.failed()
        if not ended and not ws.closed:
            await ws.send_str(error_event(502, {"code": "stream_ended", "type": "server_error",
                                                "message": "the response stream ended before it completed"}))

    @staticmethod
    async def relay(ws: web.WebSocketResponse, session: SocketSession, events: list[Event]) -> bool:
        """Send the events on; True once one of them ended the turn."""
        ended = False
        for ev in events:
            if ev.data == "[DONE]":
                continue
            await ws.send_str(session.relayed(ev.data))
            ended = session.event(ev.data) or ended
        return ended

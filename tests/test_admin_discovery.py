"""The admin listener's guard on mutating routes, and the discovery client's redirect rule, against
real sockets on loopback (the admin app is served by aiohttp exactly as `serve()` builds it)."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp
import pytest
from aiohttp import web

from extproc.config import parse_config
from extproc.local.stack import free_port
from extproc.ops.admin import Guard, build_app, is_loopback
from extproc.routing.discovery import fetch_models

KEY = "sk-discovery-key"


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.7", False), ("admin.internal", False)])
def test_which_listen_hosts_count_as_loopback(host, loopback):
    assert is_loopback(host) is loopback


async def _calls(guard: Guard, requests: list[tuple[str, dict[str, str]]]) -> list[int]:
    async def forget(_query: str) -> tuple[int, bytes, str]:
        return 200, b'{"forgotten":[]}', "application/json"

    async def healthy(_query: str) -> tuple[int, bytes, str]:
        return 200, b"ok\n", "text/plain"

    runner = web.AppRunner(build_app({"GET /healthz": healthy, "DELETE /learned": forget}, guard))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()  # served on loopback; the guard is told otherwise
    try:
        async with aiohttp.ClientSession() as s:
            out = []
            for method, headers in requests:
                path = "/healthz" if method == "GET" else "/learned"
                async with s.request(method, f"http://127.0.0.1:{port}{path}", headers=headers) as r:
                    out.append(r.status)
            return out
    finally:
        await runner.cleanup()


def test_no_token_mutating_routes_only_on_loopback():
    calls = [("GET", {}), ("DELETE", {}), ("DELETE", {"authorization": "Bearer anything"})]
    assert asyncio.run(_calls(Guard("0.0.0.0", None), calls)) == [200, 403, 403]
    assert asyncio.run(_calls(Guard("10.0.0.7", None), calls)) == [200, 403, 403]
    assert asyncio.run(_calls(Guard("127.0.0.1", None), calls)) == [200, 200, 200]


def test_token_is_required_wherever_the_listener_is():
    calls = [("GET", {}), ("DELETE", {}), ("DELETE", {"authorization": "Bearer nope"}),
             ("DELETE", {"authorization": "Bearer s3cret"})]
    for host in ("0.0.0.0", "127.0.0.1"):
        assert asyncio.run(_calls(Guard(host, "s3cret"), calls)) == [200, 401, 401, 200]


class Upstream:
    """A /v1/models server on loopback that records what it was sent, and may redirect."""

    def __init__(self, redirect_to: str | None = None):
        self.seen: list[tuple[str, str | None]] = []  # (path, authorization)
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: object) -> None:
                pass

            def do_GET(self) -> None:
                upstream.seen.append((self.path, self.headers.get("authorization")))
                if redirect_to is not None and self.path == "/v1/models":
                    self.send_response(302)
                    self.send_header("location", redirect_to)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                body = json.dumps({"object": "list", "data": [
                    {"id": "m1", "supported_endpoints": ["/v1/responses"]}]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _discover(address: str) -> dict[str, str | None] | None:
    cfg = parse_config(f"""
backends:
  - {{name: b, api: auto, models: ["*"], endpoints: ["{address}"], api_key_env: DISCOVERY_KEY}}
""", env={"DISCOVERY_KEY": KEY})

    async def run() -> dict[str, str | None] | None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            return await fetch_models(session, cfg.backends[0])
    return asyncio.run(run())


def test_discovery_refuses_a_redirect_to_another_port_and_the_key_never_arrives():
    elsewhere = Upstream()
    origin = Upstream(redirect_to=f"http://{elsewhere.address}/v1/models")
    try:
        assert _discover(origin.address) is None  # the endpoint counts as not answering
        assert origin.seen == [("/v1/models", "Bearer " + KEY)]
        assert elsewhere.seen == []  # not even asked, so the key cannot have arrived
    finally:
        origin.close()
        elsewhere.close()


def test_discovery_follows_a_redirect_on_the_same_host_and_port():
    origin = Upstream(redirect_to="/v1/models/")
    try:
        assert _discover(origin.address) == {"m1": "responses"}
        assert origin.seen == [("/v1/models", "Bearer " + KEY), ("/v1/models/", "Bearer " + KEY)]
    finally:
        origin.close()

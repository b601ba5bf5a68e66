"""The admin HTTP listener (aiohttp): /healthz, /readyz, /metrics, GET and DELETE /learned.

aiohttp answers HEAD for every GET route, 404 for unknown paths and 405 for a known path with another
method, and serves each connection on its own task, so a slow client holds up no one else.

Mutating routes (every method but GET) are guarded: with `EXTPROC_ADMIN_TOKEN` set they need
`authorization: Bearer <token>` (401 otherwise), wherever the listener is; without a token they are
served on a loopback listener only, and answered 403 on any other (the read-only routes, which
probes and Prometheus need, keep working there).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

log = logging.getLogger("extproc")

Route = Callable[[str], Awaitable[tuple[int, bytes, str]]]  # called with the query string
TOKEN_ENV = "EXTPROC_ADMIN_TOKEN"


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything, so not trusted as loopback


class Guard:
    """Who may call a mutating route: decided once, from the listen address and the token."""

    def __init__(self, host: str, token: str | None):
        self.expected = f"Bearer {token}".encode() if token else None
        self.exposed = not is_loopback(host)

    def refusal(self, request: web.Request) -> web.Response | None:
        if self.expected is not None:
            given = request.headers.get("authorization", "").encode("latin-1", "replace")
            if hmac.compare_digest(given, self.expected):
                return None
            return web.Response(status=401, text="admin token required\n", headers={"www-authenticate": "Bearer"})
        if self.exposed:
            return web.Response(status=403, text=f"mutating admin routes on a non-loopback listener need {TOKEN_ENV}\n")
        return None


def _handler(route: Route, guard: Guard | None) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        if guard is not None and (refused := guard.refusal(request)) is not None:
            return refused
        status, body, ctype = await route(request.query_string)
        return web.Response(status=status, body=body, headers={"content-type": ctype})
    return handle


def build_app(routes: dict[str, Route], guard: Guard) -> web.Application:
    app = web.Application()
    for key, route in routes.items():
        method, _, path = key.partition(" ")
        if method == "GET":
            app.router.add_get(path, _handler(route, None))  # HEAD too
        else:
            app.router.add_route(method, path, _handler(route, guard))
    return app


async def start_admin(listen: str, routes: dict[str, Route], token: str | None = None) -> web.AppRunner:
    host, port = split_listen(listen)
    guard = Guard(host, token)
    runner = web.AppRunner(build_app(routes, guard), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    mutating = ("need the admin token" if token else f"refused (403): not loopback and no {TOKEN_ENV}"
                if guard.exposed else "open to local clients")
    log.info("admin listening on %s (%s); mutating routes %s", listen,
             " ".join(sorted({k.split()[1] for k in routes})), mutating)
    return runner

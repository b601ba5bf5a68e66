"""The admin HTTP listener: /healthz, /readyz and /metrics (localhost by default).

A few lines of asyncio instead of a web framework: three GET routes, no bodies in, small bodies out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("extproc")

Route = Callable[[], Awaitable[tuple[int, bytes, str]]]


async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, routes: dict[str, Route]) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        method, _, rest = head.decode("latin-1").partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        route = routes.get(path)
        if method not in ("GET", "HEAD"):
            status, body, ctype = 405, b"method not allowed\n", "text/plain"
        elif route is None:
            status, body, ctype = 404, b"not found\n", "text/plain"
        else:
            status, body, ctype = await route()
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}.get(status, "")
        writer.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
                     "connection: close\r\n\r\n".encode() + (b"" if method == "HEAD" else body))
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def start_admin(listen: str, routes: dict[str, Route]) -> asyncio.Server:
    host, _, port = listen.rpartition(":")
    server = await asyncio.start_server(lambda r, w: _serve_one(r, w, routes), host.strip("[]") or "127.0.0.1",
                                        int(port))
    log.info("admin listening on %s (/healthz /readyz /metrics)", listen)
    return server

"""The admin HTTP listener: /healthz, /readyz, /metrics and /learned (localhost by default).

A few lines of asyncio instead of a web framework: a handful of routes, no bodies in, small bodies out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("extproc")

Route = Callable[[str], Awaitable[tuple[int, bytes, str]]]  # called with the query string


async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, routes: dict[str, Route]) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        method, _, rest = head.decode("latin-1").partition(" ")
        path, _, query = rest.partition(" ")[0].partition("?")
        route = routes.get(f"{'GET' if method == 'HEAD' else method} {path}")
        if route is None:
            known = any(key.endswith(" " + path) for key in routes)
            status, body, ctype = (405, b"method not allowed\n", "text/plain") if known else (404, b"not found\n", "text/plain")
        else:
            status, body, ctype = await route(query)
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
    log.info("admin listening on %s (%s)", listen, " ".join(sorted({k.split()[1] for k in routes})))
    return server

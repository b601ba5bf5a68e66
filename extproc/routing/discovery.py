"""Reads the /v1/models list of backends declared `auto` or `both`, at start and then periodically.

Runs beside the server, never in a request's path: a slow or failing upstream only leaves the last
known list in place. What each model's entry says is parsed by `modes.parse_models` (sans-IO).

The request carries the backend's API key, so it never leaves the endpoint it was meant for: a
redirect to the same scheme, host and port is followed (a trailing-slash redirect, say), a redirect
anywhere else is refused and the endpoint counted as not answering.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp
import orjson
from yarl import URL

from extproc.api import AUTO, BOTH
from extproc.config import Backend
from extproc.routing.gateway import Gateway
from extproc.routing.modes import Knowledge, parse_models

log = logging.getLogger("extproc")

MAX_REDIRECTS = 3
MAX_BYTES = 8 * 1024 * 1024  # a model list larger than this is refused, not read into memory
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class DiscoveryError(Exception):
    pass


async def _get_json(session: aiohttp.ClientSession, url: URL, headers: dict[str, str]) -> object:
    for _ in range(MAX_REDIRECTS + 1):
        async with session.get(url, headers=headers, allow_redirects=False) as r:
            if r.status in _REDIRECTS:
                target = url.join(URL(r.headers.get("location", "")))
                if target.origin() != url.origin():
                    raise DiscoveryError(f"redirect to {target.origin()} refused: the API key stays with {url.origin()}")
                url = target
                continue
            if r.status != 200:
                raise DiscoveryError(f"HTTP {r.status}")
            raw = await r.content.read(MAX_BYTES + 1)
            if len(raw) > MAX_BYTES:
                raise DiscoveryError(f"model list over {MAX_BYTES} bytes")
            return orjson.loads(raw)
    raise DiscoveryError(f"more than {MAX_REDIRECTS} redirects")


async def fetch_models(session: aiohttp.ClientSession, backend: Backend) -> dict[str, str | None] | None:
    """The first endpoint that answers; None when none does."""
    headers = {"accept": "application/json"}
    if backend.api_key:
        headers["authorization"] = "Bearer " + backend.api_key
    for ep in backend.endpoints:
        url = URL(f"http://{ep.address}{backend.path_prefix}/v1/models")
        try:
            return parse_models(await _get_json(session, url, headers))
        except (aiohttp.ClientError, TimeoutError, ValueError, DiscoveryError) as e:
            log.info("discovery: %s %s: %s", backend.name, url, e or type(e).__name__)
    return None


def discoverable(gateway: Gateway) -> list[Backend]:
    return [b for b in gateway.config.backends if b.api in (AUTO, BOTH) and b.endpoints]


async def discover_once(gateway: Gateway, knowledge: Knowledge) -> None:
    timeout = aiohttp.ClientTimeout(total=gateway.config.discovery.timeout_ms / 1000)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for backend in discoverable(gateway):
            models = await fetch_models(session, backend)
            if models is not None:
                knowledge.discovered[backend.name] = models
                log.info("discovery: %s lists %d models", backend.name, len(models))


async def discover_forever(current: Callable[[], Gateway]) -> None:
    while True:
        gateway = current()
        try:
            await discover_once(gateway, gateway.knowledge)
        except Exception:
            log.exception("discovery failed; keeping the last known model lists")
        await asyncio.sleep(gateway.config.discovery.interval_seconds)

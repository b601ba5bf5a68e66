"""Reads the /v1/models list of backends declared `auto` or `both`, at start and then periodically.

Runs beside the server, never in a request's path: a slow or failing upstream only leaves the last
known list in place. What each model's entry says is parsed by `modes.parse_models` (sans-IO).
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from collections.abc import Callable

from extproc.api import AUTO, BOTH
from extproc.config import Backend
from extproc.routing.gateway import Gateway
from extproc.routing.modes import Knowledge, parse_models

log = logging.getLogger("extproc")


def fetch_models(backend: Backend, timeout: float) -> dict[str, str | None] | None:
    """The first endpoint that answers; None when none does."""
    headers = {"accept": "application/json"}
    if backend.api_key:
        headers["authorization"] = "Bearer " + backend.api_key
    for ep in backend.endpoints:
        url = f"http://{ep.address}{backend.path_prefix}/v1/models"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
                return parse_models(json.loads(r.read()))
        except (OSError, ValueError) as e:
            log.info("discovery: %s %s: %s", backend.name, url, e)
    return None


def discoverable(gateway: Gateway) -> list[Backend]:
    return [b for b in gateway.config.backends if b.api in (AUTO, BOTH) and b.endpoints]


async def discover_once(gateway: Gateway, knowledge: Knowledge) -> None:
    timeout = gateway.config.discovery.timeout_ms / 1000
    for backend in discoverable(gateway):
        models = await asyncio.to_thread(fetch_models, backend, timeout)
        if models is not None:
            knowledge.discover(backend.name, models)
            log.info("discovery: %s lists %d models", backend.name, len(models))


async def discover_forever(current: Callable[[], Gateway]) -> None:
    while True:
        gateway = current()
        try:
            await discover_once(gateway, gateway.knowledge)
        except Exception:
            log.exception("discovery failed; keeping the last known model lists")
        await asyncio.sleep(gateway.config.discovery.interval_seconds)

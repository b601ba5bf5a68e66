"""Following `dns:` names while a reload lands: the slow lookup must not put back the config it started from."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

from extproc.config import load_config
from extproc.envoy.running import GatewayHolder, Sidecar
from extproc.ops.metrics import Metrics
from extproc.routing.gateway import Gateway
from extproc.state.store import MemoryStore

CONFIG = """
backends:
  - {{name: pool, api: chat, models: [{models}], endpoints: [{{dns: "pool.test:8000"}}]}}
"""


class Resolver:
    """getaddrinfo for pool.test, whose answers the test sets; `hold()` makes the next lookup block until
    `release()` (other lookups, such as the reload's own, answer at once)."""

    def __init__(self, address: str):
        self.address = address
        self.held = threading.Event()
        self.entered = threading.Event()
        self.go = threading.Event()
        self.real = socket.getaddrinfo

    def __call__(self, host: str, *args: Any, **kw: Any) -> list[Any]:
        if host != "pool.test":
            return self.real(host, *args, **kw)
        address = self.address
        if self.held.is_set():
            self.held.clear()
            self.entered.set()
            self.go.wait(10)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, 0))]


def test_a_reload_during_a_slow_dns_lookup_is_not_overwritten(tmp_path, monkeypatch):
    resolver = Resolver("10.0.0.1")
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(models="old-model"))
    holder = GatewayHolder(Gateway(load_config(str(path), env={}), tenant_secret=b"s"))
    sidecar = Sidecar(str(path), holder, MemoryStore(60, 100), Metrics())

    async def run() -> None:
        resolver.address = "10.0.0.2"
        resolver.held.set()
        follow = asyncio.create_task(sidecar.follow_dns())
        assert await asyncio.to_thread(resolver.entered.wait, 10)  # the lookup started from the old config
        path.write_text(CONFIG.format(models="new-model"))
        sidecar.reload()  # lands while the lookup is blocked
        resolver.go.set()
        await follow

    asyncio.run(run())
    (pool,) = holder.gateway.config.backends
    assert pool.models == ("new-model",)  # the reload stands
    assert [e.address for e in pool.endpoints] == ["10.0.0.2:8000"]  # resolved by the reload itself


def test_changed_dns_answers_rebuild_the_ring_without_a_reload(tmp_path, monkeypatch):
    resolver = Resolver("10.0.0.1")
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(models="m"))
    holder = GatewayHolder(Gateway(load_config(str(path), env={}), tenant_secret=b"s"))
    sidecar = Sidecar(str(path), holder, MemoryStore(60, 100), Metrics())
    before = holder.gateway
    asyncio.run(sidecar.follow_dns())
    assert holder.gateway is before  # same answers: nothing rebuilt
    resolver.address = "10.0.0.3"
    asyncio.run(sidecar.follow_dns())
    assert [e.address for e in holder.gateway.config.backends[0].endpoints] == ["10.0.0.3:8000"]
    assert holder.gateway.knowledge is before.knowledge  # what was learned carries over

"""What the running sidecar does beside answering Envoy: config reloads, following `dns:` names, the admin
pages. Everything here runs on the event loop; only name resolution goes to a thread."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

import orjson

from extproc.config import Config, ConfigError, load_config
from extproc.ops.admin import Route
from extproc.ops.metrics import CONTENT_TYPE, Metrics
from extproc.routing.gateway import Gateway
from extproc.routing.modes import forget_learned, list_learned
from extproc.state.store import Store, StoreUnavailable
from extproc.state.tenancy import SECRET_KEY

log = logging.getLogger("extproc")

Page = tuple[int, bytes, str]


class GatewayHolder:
    """The current Gateway; a reload swaps it while in-flight exchanges keep the one they started with."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway


def resolve_dns(config: Config) -> Config | None:
    """The config with its `dns:` endpoints resolved again, or None when no backend's endpoints changed.
    Blocks on name resolution: run it in a thread."""
    backends = []
    for b in config.backends:
        endpoints = b.resolve_dns() if b.dns_names else None
        backends.append(b if endpoints is None else dataclasses.replace(b, endpoints=endpoints))
    if [b.endpoints for b in backends] == [b.endpoints for b in config.backends]:
        return None
    return dataclasses.replace(config, backends=tuple(backends))


class Sidecar:
    """The config file and the Gateway built from it: reloads swap the Gateway, what was discovered and
    learned carries over."""

    def __init__(self, config_path: str, holder: GatewayHolder, store: Store, metrics: Metrics):
        self.config_path = config_path
        self.holder = holder
        self.store = store
        self.metrics = metrics
        metrics.backend_states = self.backend_states

    def install(self, new: Config) -> None:
        """A new config for new exchanges."""
        old = self.holder.gateway
        self.holder.gateway = Gateway(new, old.knowledge, tenant_secret=old.tenant_secret, health=old.health)

    def reload(self) -> None:
        try:
            new = load_config(self.config_path)
        except ConfigError as e:
            log.error("config reload rejected, keeping the running config:\n%s", e)
            return
        if new.state != self.holder.gateway.config.state:
            log.warning("config reload: 'state' changes take effect at the next restart")
        self.install(new)
        log.info("config reloaded from %s", self.config_path)
        for warning in new.warnings:
            log.warning("config: %s", warning)

    async def follow_dns(self) -> None:
        """`dns:` endpoints (a headless Service): the ring follows the addresses as they change. The lookup
        is slow and runs in a thread; a reload that lands meanwhile wins (it resolved the names itself), so
        the result is installed only over the config it was resolved from."""
        start = self.holder.gateway.config
        resolved = await asyncio.to_thread(resolve_dns, start)
        if resolved is None:
            return
        if self.holder.gateway.config is not start:
            log.info("dns endpoints changed during a config reload; the reloaded config stands")
            return
        log.info("dns endpoints changed; ring rebuilt")
        self.install(resolved)

    def admin_routes(self) -> dict[str, Route]:
        return {"GET /healthz": self.healthy, "GET /readyz": self.ready, "GET /metrics": self.metrics_page,
                "GET /learned": self.learned, "DELETE /learned": self.forget}

    def backend_states(self) -> dict[str, str]:
        """Every configured backend's state in its model groups: healthy, ejected or held_off."""
        gateway, now = self.holder.gateway, time.monotonic()
        return {b.name: gateway.health.state(b.name, now) for b in gateway.config.backends}

    async def ready(self, _query: str) -> Page:
        """Ready when the config is loaded and the state store answers. The body (JSON) names the backends
        that cannot serve yet (a missing key, no instances) and each backend's state in its groups; neither
        holds the sidecar back: the upstreams are the same for every replica, so none is better off out."""
        try:
            await self.store.get_many(("ready-probe",))
        except StoreUnavailable as e:
            return _unavailable(e)
        gateway, now = self.holder.gateway, time.monotonic()
        backends = []
        for name, state in self.backend_states().items():
            entry: dict[str, object] = {"name": name, "state": state}
            if (until := gateway.health.until(name, now)) is not None:
                entry["back_in_seconds"] = round(until - now, 1)
            backends.append(entry)
        body = {"status": "ready", "unserved": gateway.config.unserved(), "backends": backends}
        return 200, orjson.dumps(body), "application/json"

    async def healthy(self, _query: str) -> Page:
        return 200, b"ok\n", "text/plain"

    async def metrics_page(self, _query: str) -> Page:
        return 200, self.metrics.render(), CONTENT_TYPE

    async def learned(self, _query: str) -> Page:
        """Model APIs learned at run time (shared ones too, with a shared store)."""
        try:
            known = await list_learned(self.store)
        except StoreUnavailable as e:
            return _unavailable(e)
        return 200, orjson.dumps({name: fact.as_dict() for name, fact in known.items()}), "application/json"

    async def forget(self, query: str) -> Page:
        """DELETE /learned?model=BACKEND:MODEL (repeatable), or ?all=1."""
        params = parse_qs(query)
        try:
            gone = await forget_learned(self.store, params.get("model", []), everything=bool(params.get("all")))
        except StoreUnavailable as e:
            return _unavailable(e)
        self.holder.gateway.knowledge.forget_all()
        return 200, orjson.dumps({"forgotten": gone}), "application/json"


def _unavailable(e: StoreUnavailable) -> Page:
    return 503, f"state store unavailable: {e}\n".encode(), "text/plain"


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


async def every(seconds: Callable[[], float], action: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(seconds())
        try:
            await action()
        except Exception:
            log.exception("periodic task failed")


def watched_files(config_path: str, config: Config) -> list[str]:
    """The files whose change reloads the config: the file itself, each backend's `api_key_file` (a
    mounted Secret rotated in place) and `ca_file`, so a new key or CA reaches the processor and Envoy
    without a restart."""
    keys = [b.api_key_file for b in config.backends if b.api_key_file]
    cas = [b.hosted.ca_file for b in config.backends if b.hosted and b.hosted.ca_file]
    return [config_path, *dict.fromkeys(keys + cas)]


async def watch_files(paths: Callable[[], list[str]], on_change: Callable[[], None], interval: float = 2.0) -> None:
    """Reload when one of the files changes (a ConfigMap or Secret update included), as SIGHUP does. A
    file newly watched (a reload named it) is stamped first, not counted as a change."""
    def stamp(path: str) -> tuple[float, int, int] | None:
        try:
            st = os.stat(path)  # follows the symlinks a mounted volume swaps on update
        except OSError:
            return None
        return st.st_mtime, st.st_size, st.st_ino

    last = {p: stamp(p) for p in paths()}
    while True:
        await asyncio.sleep(interval)
        now = {p: stamp(p) for p in paths()}
        changed = any(p in last and now[p] is not None and now[p] != last[p] for p in now)
        last = now
        if changed:
            on_change()

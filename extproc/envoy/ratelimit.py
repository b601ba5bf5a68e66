"""Envoy's rate-limit service (envoy.service.ratelimit.v3), served on the sidecar's gRPC port, and the
token meter that feeds it: the shell around quota.py's decisions.

Envoy's ratelimit filter (deploy/envoy.yaml) calls `ShouldRateLimit` only for tenants with limits, with
one descriptor: the tenant its key check found, and the request's path (for the 429's shape). The
counters live in the state store, so replicas sharing Redis share them. A store that does not answer
lets the request through (logged and counted), as Envoy does when the service itself is down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from grpclib.const import Handler
from grpclib.server import Stream

from extproc import quota
from extproc.clients import Clients
from extproc.envoy.serving import methods
from extproc.ops.metrics import Metrics
from extproc.state.store import Store, StoreUnavailable

log = logging.getLogger("extproc")
_OK = rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)


class _Quotas:
    """What the meter and the service both read: the tenants' limits as the config has them now, the
    store that holds the counters, the metrics and the clock."""

    def __init__(self, clients: Callable[[], Clients | None], store: Store, metrics: Metrics,
                 clock: Callable[[], float] = time.time):
        self.clients = clients
        self.store = store
        self.metrics = metrics
        self.clock = clock


class TenantMeter(_Quotas):
    """Each answer's requests and tokens per listed tenant: in the metrics, and, for tenants with token
    limits, added to their counters in the store (off the request path)."""

    def __init__(self, clients: Callable[[], Clients | None], store: Store, metrics: Metrics,
                 clock: Callable[[], float] = time.time):
        super().__init__(clients, store, metrics, clock)
        self.pending: set[asyncio.Task[None]] = set()

    def count(self, tenant: str | None, input_tokens: int, output_tokens: int) -> None:
        """One answer of `tenant` (the value Envoy's key check set; names the config does not list are
        not labels, so a label's values stay the config's)."""
        clients = self.clients()
        limits = clients.limits(tenant) if clients is not None and tenant else None
        if tenant is None or limits is None:
            return
        self.metrics.tenant_requests.inc(tenant)
        for kind, n in (("input", input_tokens), ("output", output_tokens)):
            if n > 0:
                self.metrics.tenant_tokens.inc(tenant, kind, by=n)
        total = input_tokens + output_tokens
        if limits.counts_tokens and total > 0:
            task = asyncio.get_running_loop().create_task(
                self._add(quota.usage_changes(tenant, limits, self.clock(), total)))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    async def _add(self, changes: list[quota.Change]) -> None:
        try:
            await self.store.incr(changes)
        except StoreUnavailable as e:
            self.metrics.store_errors.inc("quota")
            log.warning("state store unavailable, tokens not counted: %s", e)


def _header(key: str, value: str) -> base_pb2.HeaderValue:
    return base_pb2.HeaderValue(key=key, value=value)


class RateLimits(_Quotas):
    def __mapping__(self) -> dict[str, Handler]:
        return methods(rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"], self)

    async def ShouldRateLimit(self, stream: Stream[rls_pb2.RateLimitRequest, rls_pb2.RateLimitResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None  # a unary call's one message
        await stream.send_message(await self.verdict(request))

    async def verdict(self, request: rls_pb2.RateLimitRequest) -> rls_pb2.RateLimitResponse:
        entries = {e.key: e.value for d in request.descriptors[:1] for e in d.entries}
        tenant, path = entries.get("tenant", ""), entries.get("path", "")
        clients = self.clients()
        limits = clients.limits(tenant) if clients is not None else None
        if limits is None or not limits.any:  # a reload took the limits away since Envoy's check
            return _OK
        now = self.clock()
        found, changes = quota.check_changes(tenant, limits, now)
        try:
            values = await self.store.incr(changes)
        except StoreUnavailable as e:
            self.metrics.store_errors.inc("quota")
            log.warning("state store unavailable, tenant %s not rate limited: %s", tenant, e)
            return _OK
        v = quota.verdict(limits, found, values, now)
        headers = [_header(k, value) for k, value in v.headers]
        if v.refusal is None:
            return rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK, response_headers_to_add=headers)
        self.metrics.rate_limited.inc(tenant, v.refusal.limit)
        return rls_pb2.RateLimitResponse(
            overall_code=rls_pb2.RateLimitResponse.OVER_LIMIT,
            response_headers_to_add=[*headers, _header("content-type", "application/json")],
            raw_body=quota.refusal_body(path, tenant, limits, v.refusal))

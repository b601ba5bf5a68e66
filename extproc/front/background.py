"""Background runs on chat-only backends (aiohttp): the sidecar's own request for a `background: true` turn.

The queued Response is already recorded when a run starts (`extproc.state.background`). The run
sends the client's request, without `background`, through Envoy's own listener (the same
`websocket_gateway` WebSocket mode sends through), so it is routed and translated like any turn, and
records the Response under the queued id. It does not depend on the client's connection; it is
bounded by `limits.background_max_runs` (per replica) and `limits.background_max_seconds`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp
import orjson

from extproc.config import Config
from extproc.errors import GatewayError
from extproc.exchange.actions import Action, error_action
from extproc.ops.metrics import Metrics
from extproc.state.background import Run, outcome_writes
from extproc.state.store import Store, StoreUnavailable

log = logging.getLogger("extproc")


class BackgroundRuns:
    def __init__(self, store: Store, config: Callable[[], Config], gateway: Callable[[], str], metrics: Metrics):
        self.store = store
        self.metrics = metrics
        self.config = config
        self.gateway = gateway  # Envoy's listener URL
        self.tasks: set[asyncio.Task[None]] = set()
        self.http: aiohttp.ClientSession | None = None

    def admit(self, act: Action) -> Action:
        """The queued answer, or a 429 when this replica already runs its limit."""
        limit = self.config().limits.background_max_runs
        if len(self.tasks) >= limit:
            return error_action(GatewayError(429, f"This gateway replica already runs {limit} background responses; "
                                                  "retry later", code="background_limit_reached"))
        return act

    def start(self, run: Run) -> None:
        task = asyncio.create_task(self._run(run))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _current(self, run: Run) -> bytes | None:
        return (await self.store.get_many((run.key,)))[0]

    async def _run(self, run: Run) -> None:
        outcome = "cancelled"  # or deleted: what the client did meanwhile is kept
        try:
            writes = outcome_writes(run, {**run.response, "status": "in_progress"}, await self._current(run))
            if writes:
                await self.store.write(writes)
                response = await self._send(run)
                if writes := outcome_writes(run, response, await self._current(run)):
                    await self.store.write(writes)
                    outcome = str(response["status"])
        except StoreUnavailable as e:
            outcome = "unrecorded"
            log.warning("background response %s: state store unavailable, outcome not recorded: %s", run.id, e)
        self.metrics.background_runs.inc(outcome)

    async def _send(self, run: Run) -> dict[str, object]:
        if self.http is None:
            self.http = aiohttp.ClientSession()
        seconds = self.config().limits.background_max_seconds
        url = self.gateway().rstrip("/") + "/v1/responses"
        try:
            async with self.http.post(url, data=orjson.dumps(run.request),
                                      headers={**run.headers, "content-type": "application/json"},
                                      timeout=aiohttp.ClientTimeout(total=seconds)) as answer:
                return run.finished(answer.status, await answer.read())
        except TimeoutError:
            return run.failed("background_timeout", f"the background run took longer than {seconds} s "
                                                    "(limits.background_max_seconds)")
        except aiohttp.ClientError as e:
            log.warning("background response %s: %s unreachable: %s", run.id, url, e)
            return run.failed("gateway_unreachable", "the gateway could not send the background request")

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.http is not None:
            await self.http.close()

"""Background runs on chat-only backends (aiohttp): the sidecar's own request for a `background: true` turn.

The queued Response is already recorded when a run starts (`extproc.state.background`). The run
sends the client's request, without `background` and streamed, through Envoy's own listener (the
same `websocket_gateway` WebSocket mode sends through), so it is routed and translated like any
turn; it keeps the events in the run's event log when the client asked for a stream
(`state.event_log`), and records the Response under the queued id. It watches for a cancellation
while it streams, and stops the upstream call then. It does not depend on the client's connection;
it is bounded by `limits.background_max_runs` (per replica) and `limits.background_max_seconds`.
Its lease is written before the client gets the queued answer and renewed while the run lives, so
another replica can tell a run that died with its replica (`state.background.lost`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson

from extproc.config import Config
from extproc.errors import GatewayError
from extproc.exchange.actions import Action, error_action
from extproc.ops.metrics import Metrics
from extproc.state.background import Run, cancel_key, outcome_writes
from extproc.state.event_log import TERMINAL
from extproc.state.store import Store, StoreUnavailable
from extproc.translate.sse import SSEDecoder

log = logging.getLogger("extproc")
CANCEL_CHECK_SECONDS = 0.25  # how often a streaming run looks for a cancellation


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

    async def start(self, run: Run) -> None:
        """The run's lease taken (before the queued answer goes out: a poll never finds a live run
        without it), and the run started."""
        try:
            await self._lease(run)
        except StoreUnavailable as e:  # the queued record was not written either: nothing to poll
            log.warning("background response %s: state store unavailable, lease not written: %s", run.id, e)
        task = asyncio.create_task(self._run(run))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _lease(self, run: Run) -> None:
        writes, ttl = run.lease(self.config().limits)
        await self.store.write(writes, ttl)

    async def _keep_lease(self, run: Run) -> None:
        """Renew the lease every third of its life while the run lives (a store outage skips a renewal)."""
        while True:
            await asyncio.sleep(self.config().limits.background_lease_seconds / 3)
            try:
                await self._lease(run)
            except StoreUnavailable as e:
                log.warning("background response %s: lease not renewed: %s", run.id, e)

    async def _current(self, run: Run) -> bytes | None:
        return (await self.store.get_many((run.key,)))[0]

    async def _record(self, run: Run, response: dict[str, Any]) -> bool:
        """The run's record as `response`, unless the client deleted or cancelled it meanwhile: the
        cancel mark guards the write itself, so a cancel racing this round trip wins."""
        writes = outcome_writes(run, response, await self._current(run))
        return bool(writes) and await self.store.write_unless(cancel_key(run.tenant, run.id), writes)

    async def _run(self, run: Run) -> None:
        outcome = "cancelled"  # or deleted: what the client did meanwhile is kept
        keeper = asyncio.create_task(self._keep_lease(run))  # the lease then lapses by itself
        try:
            if await self._record(run, {**run.response, "status": "in_progress"}):
                response = await self._send(run)
                if response is not None and await self._record(run, response):
                    outcome = str(response["status"])
            elif run.streams:  # cancelled (or deleted) before it ran: its stream ends all the same
                await self.store.write(run.log.cancel())
        except StoreUnavailable as e:
            outcome = "unrecorded"
            log.warning("background response %s: state store unavailable, outcome not recorded: %s", run.id, e)
        finally:
            keeper.cancel()
        self.metrics.background_runs.inc(outcome)

    async def _cancelled(self, run: Run) -> bool:
        return (await self.store.get_many((cancel_key(run.tenant, run.id),)))[0] is not None

    async def _send(self, run: Run) -> dict[str, Any] | None:
        """The run's final Response, its events logged on the way; None when it was cancelled."""
        if self.http is None:
            self.http = aiohttp.ClientSession()
        seconds = self.config().limits.background_max_seconds
        url = self.gateway().rstrip("/") + "/v1/responses"
        answer: dict[str, Any] | None = None
        try:
            async with self.http.post(url, data=orjson.dumps(run.request),
                                      headers={**run.headers, "content-type": "application/json",
                                               "accept": "text/event-stream"},
                                      timeout=aiohttp.ClientTimeout(total=seconds)) as resp:
                if resp.status != 200 or resp.content_type != "text/event-stream":
                    answer = run.finished(resp.status, await resp.read())
                elif not await self._follow(run, resp.content.iter_any()):
                    if run.streams:
                        await self.store.write(run.log.cancel())
                    return None
        except TimeoutError:
            answer = run.failed("background_timeout", f"the background run took longer than {seconds} s "
                                                      "(limits.background_max_seconds)")
        except aiohttp.ClientError as e:
            log.warning("background response %s: %s unreachable: %s", run.id, url, e)
            answer = run.failed("gateway_unreachable", "the gateway could not send the background request")
        response, writes = run.settled(answer)
        if writes:
            await self.store.write(writes)
        return response

    async def _follow(self, run: Run, chunks: AsyncIterator[bytes]) -> bool:
        """Read the run's stream into its log until it ends (True) or the run is cancelled (False),
        looking for a cancellation every CANCEL_CHECK_SECONDS, whether the stream sends or not."""
        decoder, loop = SSEDecoder(), asyncio.get_running_loop()
        checked = loop.time()
        pending: asyncio.Future[bytes] | None = None
        try:
            while not run.log.ended:
                pending = pending or asyncio.ensure_future(anext(chunks))
                done, _ = await asyncio.wait({pending}, timeout=CANCEL_CHECK_SECONDS)
                if loop.time() - checked >= CANCEL_CHECK_SECONDS:
                    if await self._cancelled(run):
                        return False
                    checked = loop.time()
                if not done:
                    continue
                chunk, pending = pending, None
                try:
                    events = decoder.feed(chunk.result())
                except StopAsyncIteration:
                    events = decoder.close()
                    if not events:
                        break
                if any(ev.event in TERMINAL for ev in events) and await self._cancelled(run):
                    return False  # a cancellation just before the end: the response stays cancelled
                writes = [w for ev in events for w in run.log.record(ev.data)]
                if writes:
                    await self.store.write(writes)
        finally:
            if pending is not None:
                pending.cancel()
        return True

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.http is not None:
            await self.http.close()

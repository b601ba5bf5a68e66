"""A background response's stream (aiohttp), served by the sidecar's front door from its event log.

The processor decides (`state.background.Follow`: whose log, from which cursor) and has Envoy send
the client's request here with the decision sealed in `x-gateway-follow`; this module only reads the
log through the store (`state.event_log.Cursor`, polled with `Backoff`) and writes each event as it
comes, until the terminal one. It holds no run: any replica's front door follows any replica's run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import orjson
from aiohttp import web

from extproc.config import Config
from extproc.envoy.names import H_FOLLOW
from extproc.state import records as rec
from extproc.state.background import LOST_CODE, Follow, lease_key
from extproc.state.event_log import Backoff
from extproc.state.store import Store, StoreUnavailable
from extproc.translate.compact import Sealer
from extproc.translate.sse import encode

log = logging.getLogger("extproc")
KEEPALIVE_SECONDS = 30  # an SSE comment after this long without events: Envoy's idle timeout stays away


def _stream_error(code: str, message: str) -> bytes:
    """The end of a stream the log cannot finish (no sequence number: it is no event of the log)."""
    return encode(orjson.dumps({"type": "error", "error": {"type": "server_error", "code": code,
                                                           "message": message, "param": None}}), "error")


class Follower:
    def __init__(self, store: Store, sealer: Callable[[], Sealer], config: Callable[[], Config]):
        self.store = store
        self.sealer = sealer
        self.config = config

    async def handle(self, request: web.Request) -> web.StreamResponse:
        follow = Follow.opened(request.headers.get(H_FOLLOW, ""), self.sealer())
        if follow is None:  # not sent by this gateway's processor
            return web.Response(status=404, body=rec.response_not_found("").body(), content_type="application/json")
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await resp.prepare(request)
        cursor, backoff, loop = follow.cursor(), Backoff(), asyncio.get_running_loop()
        # A run lives at most background_max_seconds, and logs its end within a lease after that (it
        # started after this stream may have: the create call's own stream is one): a log still open
        # then lost its run.
        limits = self.config().limits
        deadline = loop.time() + limits.background_max_seconds + limits.background_lease_seconds
        wrote = loop.time()
        lease = lease_key(follow.tenant, follow.response_id)
        try:
            while not cursor.done:
                if request.transport is None or request.transport.is_closing():
                    return resp  # the client went away; the run goes on
                *log_values, leased = await self.store.get_many((*cursor.reads(), lease))
                events = cursor.take(log_values)
                if events or loop.time() - wrote > KEEPALIVE_SECONDS:
                    await resp.write(b"".join(events) or b": keepalive\n\n")
                    wrote = loop.time()
                # Read together: a run logs its end before its lease can lapse, so a log that has nothing
                # new while the lease is gone has lost its run (its replica died). A log that ended is whole.
                if not cursor.done and (loop.time() > deadline or (leased is None and not events)):
                    await resp.write(_stream_error(LOST_CODE, "the background run stopped recording its "
                                                   "events; poll GET /v1/responses/{id}"))
                    break
                if (delay := backoff.next(bool(events))) > 0:
                    await asyncio.sleep(delay)  # the log grows in another process, maybe another replica
        except StoreUnavailable as e:
            log.warning("background response %s: state store unavailable while streaming: %s", follow.response_id, e)
            await resp.write(_stream_error("state_unavailable", "the gateway's state store is unavailable; "
                                           f"resume with starting_after={cursor.after}"))
        except ConnectionResetError:
            return resp  # the client went away; the run goes on
        await resp.write_eof()
        return resp

"""Background responses on chat-only backends: what is recorded and answered (sans-IO).

A chat backend has no background mode, so the sidecar runs the turn itself: the create call is
answered at once with the Response `queued` (kept as a turn, so `GET /v1/responses/{id}` polls it on
any replica), and a `Run` is handed to the shell, which sends the same request without `background`
through Envoy (translated like any turn, streamed) and records the outcome under the queued id
(`extproc/front/background.py`). With `stream: true` the run's events are also kept as an event log
(`state.event_log`), and the client's stream, like a later `GET /v1/responses/{id}?stream=true`
(`starting_after` resumes), is that log read back by the sidecar's front door: the request is sent
there (`Follow`). `POST /v1/responses/{id}/cancel` marks a queued or running one `cancelled` (and
leaves a mark the run watches, so it stops); a run that ends after that keeps the cancellation.

A run holds a lease (`lease_key`, a record that expires `limits.background_lease_seconds` after the
run last renewed it), so a run whose replica died is not `in_progress` forever: a poll that finds an
unfinished run without its lease records it `failed` (`lost`), fenced by the cancel mark so a run
that was only slow to renew stops and cannot overwrite that; a follower of its stream ends it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import orjson

from extproc.config import Limits
from extproc.errors import GatewayError, invalid, upstream_error_payload
from extproc.state import records as rec
from extproc.state.event_log import Cursor, EventLog
from extproc.translate.common import new_id, now
from extproc.translate.compact import Sealer
from extproc.translate.resp_chat_to_responses import response_shell

Writes = list[tuple[str, bytes | None]]
Puts = list[tuple[str, bytes]]  # writes without deletes: what `Store.write_unless` takes
UNFINISHED = ("queued", "in_progress")
# The client's request headers that do not describe the client: never sent with the run's request.
_NOT_FORWARDED = {"content-length", "content-type", "accept-encoding", "connection", "transfer-encoding",
                  "x-request-id", "host", "te", "keep-alive"}


def cancel_key(tenant: str, response_id: str) -> str:
    """The mark `cancel` leaves for the run to see (small: the run looks at it while it streams)."""
    return f"bgcancel:{tenant}:{response_id}"


def lease_key(tenant: str, response_id: str) -> str:
    """The run's lease: present while the replica running it renews it (`Run.lease`)."""
    return f"bglease:{tenant}:{response_id}"


LOST_CODE = "background_run_lost"
LOST_OUTCOME = "lost"  # its label in extproc_background_runs_total, beside the outcomes the run records itself
LOST_MESSAGE = "the gateway replica running this background response stopped before it finished"


def requested(body: dict[str, Any], translated: bool, can_stream: bool) -> bool:
    """Whether the sidecar must run this turn in the background (a chat model); the combinations it
    cannot serve are refused. A Responses backend takes `background` itself (passed through).
    `can_stream`: the front door that serves the streams listens (`websocket_listen`)."""
    if body.get("background") is not True or not translated:
        return False
    refused = [("conversation", "a background response cannot be part of a conversation on chat-only backends")]
    if not can_stream:
        refused.append(("stream", "streaming a background response needs the sidecar's front door "
                                  "(websocket_listen), which is off: poll GET /v1/responses/{id}"))
    for key, why in refused:
        if body.get(key) not in (None, False):
            raise GatewayError(400, f"Invalid '{key}': {why}", param=key, code="unsupported_parameter")
    if body.get("store") is False:
        raise GatewayError(400, "Background responses must be stored: 'background' needs 'store' true",
                           param="store", code="invalid_value")
    return True


@dataclass(slots=True)
class Run:
    """One background turn: its queued Response, and what the shell needs to run and record it."""

    tenant: str
    request: dict[str, Any]  # the client's body, `background` removed: sent through Envoy, streamed
    headers: dict[str, str]  # the client's own headers (its credential: the same tenant)
    items: list[dict[str, Any]]
    ancestors: list[str]
    response: dict[str, Any]
    log: EventLog  # what the run's stream brings: kept for the client when it asked for a stream

    @staticmethod
    def start(body: dict[str, Any], tenant: str, headers: dict[str, str], ancestors: list[str],
              limits: Limits) -> Run:
        response = response_shell(body, new_id("resp_"), now())
        response.update(status="queued", background=True)
        request = {k: v for k, v in body.items() if k not in ("background", "store", "stream", "stream_options")}
        sent = {k: v for k, v in headers.items()
                if not k.startswith((":", "x-envoy-", "x-forwarded-")) and k not in _NOT_FORWARDED}
        log = EventLog(tenant, response, body.get("stream") is True, limits.background_max_events,
                       limits.background_max_event_bytes)
        return Run(tenant, {**request, "store": False, "stream": True}, sent, rec.input_items(body.get("input")),
                   ancestors, response, log)

    @property
    def streams(self) -> bool:
        """Created with `stream: true`: its events are logged, and the client follows the log."""
        return self.log.kept

    @property
    def id(self) -> str:
        return str(self.response["id"])

    @property
    def key(self) -> str:
        return rec.turn_key(self.tenant, self.id)

    def writes(self, response: dict[str, Any]) -> Puts:
        """The turn record of this run with `response` as its Response, and the id's owner."""
        return [(self.key, _record(response, self.items, self.ancestors, self.streams)),
                rec.owner_write(self.tenant, self.id)]

    def queued(self) -> tuple[bytes, Writes]:
        """The create call's answer and writes: the queued record (and the log's first event)."""
        return orjson.dumps(self.response), self.writes(self.response) + self.log.first()

    def follow(self) -> Follow:
        return Follow(self.tenant, self.id, -1)

    def lease(self, limits: Limits) -> tuple[Writes, int]:
        """The lease's write and its TTL: written when the run starts, renewed every third of it."""
        return [(lease_key(self.tenant, self.id), b"1")], limits.background_lease_seconds

    def finished(self, status: int, body: bytes) -> dict[str, Any]:
        """The run's Response from the answer to its request: the answer under the queued id, or failed."""
        doc: Any = None
        if 200 <= status < 300:
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError:
                doc = None
        if isinstance(doc, dict) and doc.get("object") == "response":
            return {**doc, "id": self.id, "created_at": self.response["created_at"], "background": True, "store": True}
        error = upstream_error_payload(status, body) if status >= 400 else {
            "code": "bad_upstream_response", "message": "the background run got no Response back"}
        return self.failed(str(error.get("code") or "upstream_error"), str(error.get("message")))

    def failed(self, code: str, message: str) -> dict[str, Any]:
        return {**self.response, "status": "failed", "error": {"code": code, "message": message}}

    def settled(self, answer: dict[str, Any] | None) -> tuple[dict[str, Any], Writes]:
        """The run's final Response, and the log's end when its stream did not end it: `answer` is the
        Response of an answer that was no stream (an error), None for a stream that stopped short."""
        if self.log.final is not None:
            return self.log.final, []
        if answer is not None and answer.get("status") != "failed" and not self.log.kept:
            return answer, []
        error = (answer or {}).get("error") or {"code": "stream_ended",
                                                 "message": "the response stream ended before it completed"}
        writes = self.log.fail(str(error.get("code") or "upstream_error"), str(error.get("message")))
        return self.log.terminal(), writes


def _record(response: dict[str, Any], items: list[dict[str, Any]], ancestors: list[str], logged: bool) -> bytes:
    """A background turn's record: a held turn's, and whether its events are logged (it streams)."""
    if not logged:
        return rec.turn_record(response, items, ancestors, None)
    return orjson.dumps({"response": response, "input": items, "ancestors": ancestors, "endpoint": None,
                         "events": True})


@dataclass(frozen=True, slots=True)
class Follow:
    """A client's stream of a run's event log, served by the sidecar's front door: which log, and
    the cursor. The processor hands it over sealed in a header (`ticket`), so the front door serves
    only what the processor decided, for the tenant it found."""

    tenant: str
    response_id: str
    after: int

    def ticket(self, sealer: Sealer) -> str:
        return f"{self.tenant};" + sealer.seal(f"{self.response_id};{self.after}", self.tenant)

    @staticmethod
    def opened(ticket: str, sealer: Sealer) -> Follow | None:
        """The follow a ticket names; None for one this gateway did not make."""
        tenant, _, sealed = ticket.partition(";")
        try:
            response_id, _, after = sealer.open(sealed, tenant).partition(";")
            return Follow(tenant, response_id, int(after))
        except (GatewayError, ValueError):
            return None

    def cursor(self) -> Cursor:
        return Cursor(self.tenant, self.response_id, self.after)


def stream_query(query: str) -> int | None:
    """For `GET /v1/responses/{id}`: None unless `stream=true`; else the `starting_after` (-1: from
    the first event)."""
    q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    if q.get("stream", "false").lower() != "true":
        return None
    after = q.get("starting_after")
    if after is None:
        return -1
    if not after.isdigit():
        raise invalid("starting_after", "expected the sequence number of an event: an integer of 0 or more")
    return int(after)


def follow(turn: dict[str, Any], tenant: str, response_id: str, after: int) -> Follow:
    """A held turn's stream resumed: only a background response created with `stream: true` has one
    (OpenAI refuses the others likewise)."""
    if not turn.get("events"):
        raise GatewayError(400, "Only background responses created with stream=true can be streamed; poll "
                                "GET /v1/responses/{id} instead", param="stream", code="invalid_request_error")
    return Follow(tenant, response_id, after)


def outcome_writes(run: Run, response: dict[str, Any], current: bytes | None) -> Puts:
    """The run's record, unless the response was cancelled or deleted meanwhile. The shell writes it
    unless the cancel mark is there (`Store.write_unless`): a cancel that lands between this read and
    that write is still seen, so a cancelled run never ends `completed`."""
    turn = rec.load_turn(current)
    if turn is None or turn["response"].get("status") == "cancelled":
        return []
    return run.writes(response)


def cancel(turn: dict[str, Any], tenant: str, response_id: str) -> tuple[bytes, Writes]:
    """`POST /v1/responses/{id}/cancel` on a held turn: a background one still running becomes
    `cancelled`; a finished one is answered as it is; any other is OpenAI's 400."""
    response = turn["response"]
    if not response.get("background"):
        raise GatewayError(400, "Only responses created with background=true can be cancelled.",
                           code="invalid_request_error")
    if response.get("status") not in UNFINISHED:
        return orjson.dumps(response), []
    cancelled = {**response, "status": "cancelled"}
    return orjson.dumps(cancelled), _stopped(turn, tenant, response_id, cancelled)


def unfinished(turn: dict[str, Any]) -> bool:
    """A background response still queued or running, as its record says: its run must hold a lease."""
    response = turn["response"]
    return bool(response.get("background")) and response.get("status") in UNFINISHED


def lost(turn: dict[str, Any], tenant: str, response_id: str) -> tuple[dict[str, Any], Writes]:
    """An unfinished run found without its lease: its replica stopped renewing it (it died), so it is
    recorded `failed`, and the cancel mark stops the run in case it was only late."""
    failed = {**turn["response"], "status": "failed", "error": {"code": LOST_CODE, "message": LOST_MESSAGE}}
    return {**turn, "response": failed}, _stopped(turn, tenant, response_id, failed)


def _stopped(turn: dict[str, Any], tenant: str, response_id: str, response: dict[str, Any]) -> Writes:
    """The cancel mark, then the turn recorded as `response`: from then on the run's own writes are
    refused (outcome_writes); one that went in before the mark is overwritten by this record."""
    return [(cancel_key(tenant, response_id), b"1"),
            (rec.turn_key(tenant, response_id), _record(response, turn["input"], turn.get("ancestors") or [],
                                                        bool(turn.get("events"))))]

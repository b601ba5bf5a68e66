"""Background responses on chat-only backends: what is recorded and answered (sans-IO).

A chat backend has no background mode, so the sidecar runs the turn itself: the create call is
answered at once with the Response `queued` (kept as a turn, so `GET /v1/responses/{id}` polls it on
any replica), and a `Run` is handed to the shell, which sends the same request without `background`
through Envoy (translated like any turn) and records the outcome under the queued id
(`extproc/front/background.py`). `POST /v1/responses/{id}/cancel` marks a queued or running one
`cancelled`; a run that ends after that keeps the cancellation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from extproc.errors import GatewayError, upstream_error_payload
from extproc.state import records as rec
from extproc.translate.common import new_id, now
from extproc.translate.resp_chat_to_responses import response_shell

Writes = list[tuple[str, bytes | None]]
UNFINISHED = ("queued", "in_progress")
# The client's request headers that do not describe the client: never sent with the run's request.
_NOT_FORWARDED = {"content-length", "content-type", "accept-encoding", "connection", "transfer-encoding",
                  "x-request-id", "host", "te", "keep-alive"}


def requested(body: dict[str, Any], translated: bool) -> bool:
    """Whether the sidecar must run this turn in the background (a chat model); the combinations it
    cannot serve are refused. A Responses backend takes `background` itself (passed through)."""
    if body.get("background") is not True or not translated:
        return False
    for key, why in (("stream", "streaming a background response is not supported on chat-only backends: "
                                "poll GET /v1/responses/{id}"),
                     ("conversation", "a background response cannot be part of a conversation on chat-only "
                                      "backends")):
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
    request: dict[str, Any]  # the client's body, `background` removed: sent through Envoy as it is
    headers: dict[str, str]  # the client's own headers (its credential: the same tenant)
    items: list[dict[str, Any]]
    ancestors: list[str]
    response: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def start(body: dict[str, Any], tenant: str, headers: dict[str, str], ancestors: list[str]) -> Run:
        response = response_shell(body, new_id("resp_"), now())
        response.update(status="queued", background=True)
        request = {k: v for k, v in body.items() if k not in ("background", "store")}
        sent = {k: v for k, v in headers.items()
                if not k.startswith((":", "x-envoy-", "x-forwarded-")) and k not in _NOT_FORWARDED}
        return Run(tenant, {**request, "store": False}, sent, rec.input_items(body.get("input")), ancestors, response)

    @property
    def id(self) -> str:
        return str(self.response["id"])

    @property
    def key(self) -> str:
        return rec.turn_key(self.tenant, self.id)

    def writes(self, response: dict[str, Any]) -> Writes:
        """The turn record of this run with `response` as its Response, and the id's owner."""
        return [(self.key, rec.turn_record(response, self.items, self.ancestors, None)),
                rec.owner_write(self.tenant, self.id)]

    def queued(self) -> tuple[bytes, Writes]:
        return orjson.dumps(self.response), self.writes(self.response)

    def running(self) -> Writes:
        return self.writes({**self.response, "status": "in_progress"})

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


def outcome_writes(run: Run, response: dict[str, Any], current: bytes | None) -> Writes:
    """The run's final record, unless the response was cancelled or deleted meanwhile."""
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
    return orjson.dumps(cancelled), [(rec.turn_key(tenant, response_id), rec.turn_record(
        cancelled, turn["input"], turn.get("ancestors") or [], turn.get("endpoint")))]

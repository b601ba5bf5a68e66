"""One HTTP exchange through the sidecar: Envoy's messages in, `Action`s (or store `Lookup`s) out.

The phases are explicit (`Phase`), and `_MOVES` is the whole lifecycle: which Envoy message each
phase accepts and where it leads. The request side (`request.RequestSide`) resolves the request into
a `Plan`; at response headers `response.choose` picks the one handler that owns the rest of the
answer. An Action with `done` closes the exchange early: Envoy passes the rest through untouched.
Nothing here does I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import Enum
from typing import Any

from extproc.errors import GatewayError, empty_answer
from extproc.exchange.actions import Action, Step
from extproc.exchange.key_guard import guard
from extproc.exchange.request import RequestSide
from extproc.exchange.response import Outcome, ResponseHandler, choose
from extproc.ops.usage import Usage
from extproc.routing.gateway import Gateway, Target
from extproc.state.lookup import Lookup, then

log = logging.getLogger("extproc")


class Phase(Enum):
    REQUEST = "request"  # waiting for request headers
    REQUEST_BODY = "request_body"  # headers seen, the body decides
    ROUTED = "routed"  # Envoy routes the request; a body may still pass
    ANSWER = "answer"  # a handler reads the answer's body
    DONE = "done"


# Envoy message kind -> the phases that accept it.
_MOVES: dict[str, tuple[Phase, ...]] = {
    "request_headers": (Phase.REQUEST,),
    "request_body": (Phase.REQUEST_BODY, Phase.ROUTED),
    "response_headers": (Phase.REQUEST, Phase.REQUEST_BODY, Phase.ROUTED),  # before routing: Envoy's own reply (413)
    "response_body": (Phase.ANSWER,),
}


def _from_client(run: Callable[[], Step]) -> Step:
    """The request side, reads included, with a shape nothing checked for (a bug that only hostile input
    reaches) answered as the client's error, a 400, rather than the gateway's 500; logged as a bug."""
    try:
        step = run()
    except GatewayError:
        raise
    except Exception as e:
        log.warning("request the sidecar could not use", exc_info=True)
        raise GatewayError(400, f"the request has a shape the gateway cannot use ({type(e).__name__} while "
                                "reading it)", code="invalid_request") from None
    if isinstance(step, Lookup):
        pending = step
        return Lookup(pending.keys, lambda values: _from_client(lambda: pending.then(values)))
    return step


class Exchange:
    def __init__(self, gateway: Gateway):
        self.req = RequestSide(gateway)
        self.phase = Phase.REQUEST
        self.handler: ResponseHandler | None = None
        self.outcome = Outcome()
        self.status = 0
        self.chunks = 0  # response body messages handled
        self.failure: GatewayError | None = None  # set by the shell when the sidecar answered with an error

    def _enter(self, kind: str) -> None:
        if self.phase not in _MOVES[kind]:
            raise RuntimeError(f"Envoy sent {kind} in phase {self.phase.value}")

    def _settle(self, step: Step, next_phase: Phase) -> Step:
        def settle(act: Action) -> Action:
            self.phase = Phase.DONE if act.done else next_phase
            return act
        return then(step, settle)

    # -- Envoy's messages ---------------------------------------------------------------------------

    def request_headers(self, headers: dict[str, str], end_of_stream: bool) -> Step:
        self._enter("request_headers")
        step = _from_client(lambda: self.req.on_headers(headers, end_of_stream))
        return then(step, lambda act: self._settle(act, Phase.ROUTED if self.req.plan else Phase.REQUEST_BODY))

    def request_body(self, raw: bytes) -> Step:
        self._enter("request_body")
        return self._settle(_from_client(lambda: self.req.on_body(raw)), Phase.ROUTED)

    def response_headers(self, headers: dict[str, str], end_of_stream: bool = False) -> Action:
        self._enter("response_headers")
        plan = self.req.plan
        try:
            self.status = int(headers.get(":status", "0"))
        except ValueError:
            self.status = 502
        if plan is None:  # Envoy answered before the request was routed: nothing to add
            self.phase = Phase.DONE
            return Action(done=True)
        if plan.pair is not None and end_of_stream:  # no body to translate: say so in the client's shape
            raise empty_answer(self.status)
        chosen = choose(plan, self.status, headers, self.outcome)
        chosen = guard(plan, headers, end_of_stream, chosen)  # a keyed backend's answer: never the key
        if isinstance(chosen, Action):
            self.phase = Phase.DONE
            return chosen
        self.handler = chosen
        self.phase = Phase.ANSWER
        return chosen.headers_action()

    def response_body(self, chunk: bytes, end_of_stream: bool) -> Action:
        self._enter("response_body")
        assert self.handler is not None
        self.chunks += 1
        act = self.handler.body(chunk, end_of_stream)
        if act.done:
            self.phase = Phase.DONE
        return act

    # -- what the shell reads for metrics, logs and Envoy's access log ----------------------------------

    @property
    def headers(self) -> dict[str, str]:
        return self.req.headers

    @property
    def method(self) -> str:
        return self.req.method

    @property
    def path(self) -> str:
        return self.req.path

    @property
    def model(self) -> str | None:
        return self.req.model

    @property
    def client_api(self) -> str | None:
        return self.req.client_api

    @property
    def target(self) -> Target | None:
        return self.req.plan.target if self.req.plan else None

    @property
    def upstream_api(self) -> str | None:
        return self.req.plan.upstream_api if self.req.plan else None

    @property
    def translated(self) -> bool:
        return self.req.plan is not None and self.req.plan.pair is not None

    @property
    def stream(self) -> bool:
        return self.req.plan is not None and self.req.plan.stream

    @property
    def dropped_tools(self) -> list[str]:
        return self.req.plan.dropped_tools if self.req.plan else []

    @property
    def pin_decision(self) -> str | None:
        return self.req.pinning.decision

    @property
    def learned_fact(self) -> str | None:
        return self.outcome.learned_fact

    @property
    def usage(self) -> Usage | None:
        return self.outcome.usage

    def metadata(self) -> dict[str, Any] | None:
        """What Envoy's access log may show of this exchange (dynamic metadata, namespace llm_gateway)."""
        if self.model is None:
            return None
        out: dict[str, Any] = {"model": self.model, "client_api": self.client_api or "",
                               "upstream_api": self.upstream_api or self.client_api or "",
                               "backend": self.target.backend.name if self.target else ""}
        if self.usage is not None:
            out.update(self.usage.as_metadata())
        return out

"""The phases of an exchange among Envoy's messages, and the one table that moves them."""

from __future__ import annotations

from enum import Enum

from extproc.exchange.actions import Action


class Phase(Enum):
    REQUEST = "request"  # waiting for request headers
    REQUEST_BODY = "request_body"  # headers seen, the body decides
    ROUTED = "routed"  # Envoy routes the request; a body may still pass
    ANSWER = "answer"  # a handler reads the answer's body
    DONE = "done"


# Envoy message kind -> (the phases that accept it, the phase it leads to). An Action with `done`
# leads to DONE instead, and request headers that routed the request already lead to ROUTED.
_MOVES: dict[str, tuple[tuple[Phase, ...], Phase]] = {
    "request_headers": ((Phase.REQUEST,), Phase.REQUEST_BODY),
    "request_body": ((Phase.REQUEST_BODY, Phase.ROUTED), Phase.ROUTED),
    # before routing too: Envoy's own reply (a 413)
    "response_headers": ((Phase.REQUEST, Phase.REQUEST_BODY, Phase.ROUTED), Phase.ANSWER),
    "response_body": ((Phase.ANSWER,), Phase.ANSWER),
}


class Lifecycle:
    """Where an exchange is among Envoy's messages, moved by `_MOVES` alone."""

    def __init__(self) -> None:
        self.phase = Phase.REQUEST

    def enter(self, kind: str) -> None:
        if self.phase not in _MOVES[kind][0]:
            raise RuntimeError(f"Envoy sent {kind} in phase {self.phase.value}")

    def move(self, kind: str, act: Action, routed: bool = False) -> Action:
        """`act` answers a message of `kind`: the phase it leads to."""
        nxt = _MOVES[kind][1]
        self.phase = Phase.DONE if act.done else Phase.ROUTED if routed and nxt is Phase.REQUEST_BODY else nxt
        return act

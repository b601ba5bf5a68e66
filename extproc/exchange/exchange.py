"""One HTTP exchange through the sidecar: Envoy's messages in, `Action`s (or store `Lookup`s) out.

The phases are explicit (`phases.Phase`), and `phases._MOVES` is the whole lifecycle: which Envoy
message each phase accepts and which phase it leads to (`Lifecycle`, shared with the first-contact
attempts). The request side (`request.RequestSide`) resolves the request into an immutable `Plan`;
at response headers `response.choose` picks the one handler that owns the rest of the answer. An
Action with `done` closes the exchange early: Envoy passes the rest through untouched. Nothing here
does I/O.
"""

from __future__ import annotations

import logging
from typing import Any

from extproc.envoy.names import Key
from extproc.errors import GatewayError, empty_answer
from extproc.exchange.actions import Action, Step
from extproc.exchange.key_guard import guard
from extproc.exchange.phases import Lifecycle, Phase
from extproc.exchange.request import RequestSide
from extproc.exchange.response import Outcome, ResponseHandler, choose
from extproc.ops.usage import Usage
from extproc.routing.failover import Attempt
from extproc.routing.gateway import Gateway, Target
from extproc.state.lookup import Decision, start

log = logging.getLogger("extproc")


class Exchange:
    """`envoy_counts`: this is the client's exchange (Envoy's downstream filter), whose access-log entry
    Envoy's access-log service may count (an upstream filter's attempts count themselves)."""

    def __init__(self, gateway: Gateway, tenant: str | None = None, member: Target | None = None,
                 envoy_counts: bool = False):
        self.req = RequestSide(gateway, tenant, member, envoy_counts)
        self.life = Lifecycle()
        self.handler: ResponseHandler | None = None
        self.outcome = Outcome()
        self.status = 0
        self.chunks = 0  # response body messages handled
        self.failure: GatewayError | None = None  # set by the shell when the sidecar answered with an error

    @property
    def phase(self) -> Phase:
        return self.life.phase

    def _from_client(self, kind: str, decision: Decision[Action]) -> Decision[Action]:
        """The request side's decision, reads included, with a shape nothing checked for (a bug that only
        hostile input reaches) answered as the client's error, a 400, rather than the gateway's 500;
        logged as a bug."""
        try:
            act = yield from decision
        except GatewayError:
            raise
        except Exception as e:
            log.warning("request the sidecar could not use", exc_info=True)
            raise GatewayError(400, f"the request has a shape the gateway cannot use ({type(e).__name__} while "
                                    "reading it)", code="invalid_request") from None
        return self.life.move(kind, act, routed=self.req.plan is not None)

    # -- Envoy's messages ---------------------------------------------------------------------------

    def request_headers(self, headers: dict[str, str], end_of_stream: bool) -> Step:
        self.life.enter("request_headers")
        return start(self._from_client("request_headers", self.req.on_headers(headers, end_of_stream)))

    def request_body(self, raw: bytes) -> Step:
        self.life.enter("request_body")
        return start(self._from_client("request_body", self.req.on_body(raw)))

    def response_headers(self, headers: dict[str, str], end_of_stream: bool = False) -> Step:
        handover = self.req.handover
        if handover is not None:  # a grouped request's answer, or Envoy's reply when no attempt answered
            self.life.enter("response_headers")
            return start(self._handed_back(handover.answer(headers)))
        return self.answer_headers(headers, end_of_stream)

    def _handed_back(self, decision: Decision[Action]) -> Decision[Action]:
        return self.life.move("response_headers", (yield from decision))

    def answer_headers(self, headers: dict[str, str], end_of_stream: bool = False) -> Action:
        """The answer's headers, once the request was routed here (the shell's, an upstream attempt's)."""
        self.life.enter("response_headers")
        plan = self.req.plan
        try:
            self.status = int(headers.get(":status", "0"))
        except ValueError:
            self.status = 502
        if plan is None:  # Envoy answered before the request was routed: nothing to add
            return self.life.move("response_headers", Action(done=True))
        if plan.pair is not None and end_of_stream:  # no body to translate: say so in the client's shape
            raise empty_answer(self.status)
        # a keyed backend's answer never carries the key (exchange/key_guard.py)
        self.handler = guard(plan, headers, end_of_stream, choose(plan, self.status, headers, self.outcome))
        return self.life.move("response_headers", self.handler.headers_action())

    def response_body(self, chunk: bytes, end_of_stream: bool) -> Action:
        self.life.enter("response_body")
        assert self.handler is not None
        self.chunks += 1
        return self.life.move("response_body", self.handler.body(chunk, end_of_stream))

    # -- what the shell reads for metrics, logs and Envoy's access log ----------------------------------

    @property
    def headers(self) -> dict[str, str]:
        return self.req.headers

    @property
    def handed_over(self) -> bool:
        """Sent to its model group's attempts, each reported on its own (exchange/failover.py)."""
        return self.req.handover is not None

    @property
    def unseen_attempts(self) -> list[Attempt]:
        """A grouped request's attempts no attempt's processor saw the end of, once Envoy's reply was
        replaced (`failover.HandedOver`): counted by this exchange."""
        return self.req.handover.unseen if self.req.handover is not None else []

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
    def background_outcome(self) -> str | None:
        """How a background run ended, when this request recorded it (one whose replica died: `lost`)."""
        return self.req.pinning.background_outcome

    @property
    def learned_fact(self) -> str | None:
        return self.outcome.learned_fact

    @property
    def usage(self) -> Usage | None:
        return self.outcome.usage

    @property
    def response_model(self) -> str | None:
        """The model the upstream's answer named, where the sidecar read the answer (not the one requested)."""
        return self.outcome.model

    @property
    def counted_by_envoy(self) -> bool:
        """Envoy's access-log service counts this request (its status, tokens, duration), not the shell:
        its plan leaves the usage to Envoy and the exchange ended as planned, with the metadata that marks
        its entry (`metadata`). Ended otherwise (an error of the sidecar's, Envoy closing the stream), the
        shell counts it."""
        plan = self.req.plan
        return plan is not None and plan.envoy_counts and self.failure is None and self.phase is Phase.DONE

    def metadata(self) -> dict[str, Any] | None:
        """What Envoy's access log may show of this exchange (dynamic metadata, names.NAMESPACE)."""
        if self.model is None:
            return None
        out: dict[str, Any] = {Key.MODEL: self.model, Key.CLIENT_API: self.client_api or "",
                               Key.UPSTREAM_API: self.upstream_api or self.client_api or "",
                               Key.BACKEND: self.target.backend.name if self.target else ""}
        if self.usage is not None:
            out.update(self.usage.as_metadata())
        if self.counted_by_envoy:  # deploy/envoy.yaml's filter sends the entry to the access-log service
            out[Key.ENVOY_COUNTS] = True
        return out

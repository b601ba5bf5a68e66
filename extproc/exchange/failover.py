"""Failover across a model group's members, both sides of it (sans-IO): each attempt an ordinary exchange.

A request for a model that several `endpoints:` backends serve (`routing.groups`) is not translated by
the client-side exchange: `hand_over` records what its attempts need (the caller's tenant, the client's
headers, when it started; sealed, since the headers carry the client's credential) and names the group's
cluster (`routing.group_routes`), whose priorities are the members. Envoy sends the buffered request to
the first member and retries on the next one; the processor, as that cluster's upstream filter, sees
each attempt (`Attempt`, picked by the shell for role `failover`):

- the member is the one whose instance Envoy connected to (`upstream.address`);
- upstream filters change the one header map every attempt is sent from, so each attempt first puts the
  client's headers back (the previous attempt's path, key and content-length must not reach this one),
  then runs the request through an `Exchange` on that member: translated when the member speaks another
  API, its state read and written as usual (a conversation the sidecar holds continues on any member);
- an answer is judged before any byte of it reaches the client (`routing.failover.judge`): an error
  body is read whole first, and a non-streamed success is held whole too, so a reset before its body
  ended is still a retry; a failed-over answer is recorded and marked `x-gateway-retry` (Envoy drops it
  and retries), a final one goes to the exchange's handler as any answer would; an answer's headers
  reach the attempt only with its first body chunk (`Hold`, the group cluster's second upstream
  filter; on the fast path's twin, for a stream), so a reset before it is a retry too, the last attempt's
  included (its error names every attempt); the fast twin's error answers are judged by `FastJudge`;
- the last attempt (`failover.max_attempts`, the members, or `deadline_seconds` after the start), when
  it fails too, answers with one error naming every attempt (`all_failed_error`). An attempt that got
  no answer is told by the records (`told`): each attempt after the first records when it began and on
  which member (the first began at the hand-over), so one that never reached a processor is a failed
  connection, and one that did is a reset, or timed out when it lasted the attempt timeout (Envoy's
  per-try timeout: a last member timing out is the 504 `all_backends_timed_out`);
- when no attempt's processor is left to answer (the route's one more attempt goes back to the first
  member, and that one is down too: refused, or reset before its processor saw it), Envoy answers the
  client itself; the client-side exchange, which handed the request over, sees that answer's headers
  (`HandedOver`) and replaces it with the same error, built from the same records. The attempt that
  answers the client ends that stream first (`GroupAttempt.answered`, read by the shell), so the path
  where an attempt answers sends that stream no message more.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import orjson

from extproc.api import API_OF_PATH, BOTH, CHAT, MESSAGES, RESPONSES
from extproc.config import Backend, Failover
from extproc.envoy.names import (
    H_ANSWERED,
    H_BACKEND,
    H_CLUSTER,
    H_ENDPOINT,
    H_FAILOVER,
    H_FIRST_CONTACT,
    H_RETRY,
    TENANT_HEADER,
)
from extproc.errors import GatewayError
from extproc.exchange.actions import BUFFERED, Action, Step
from extproc.exchange.paths import INPUT_TOKENS
from extproc.exchange.phases import Phase
from extproc.exchange.upstream import UpstreamStream
from extproc.routing.failover import Attempt, Transport, Verdict, all_failed_error
from extproc.routing.gateway import Target, placement_key
from extproc.routing.group_routes import fast_members, first_on, group_cluster, is_no_member, member_on
from extproc.routing.groups import Group, continue_order, group_for
from extproc.routing.needs import Call
from extproc.state import records as rec
from extproc.state.lookup import Decision, Reads, awaited, start

if TYPE_CHECKING:
    from extproc.exchange.exchange import Exchange
    from extproc.exchange.request import RequestSide
    from extproc.routing.gateway import Gateway

log = logging.getLogger("extproc")

_SEALED_FOR = "failover"  # the sealer's associated data: a record sealed for this use only
_OURS = (H_FAILOVER,)  # the attempts' own header, on every attempt
_ROUTING = (H_BACKEND, H_CLUSTER, H_ENDPOINT, H_FIRST_CONTACT)  # routed already: no attempt sets them


def _slack(timeout: int) -> float:
    """Seconds short of its timeout that an attempt with no answer may have lasted and still be taken for
    timed out: its start is read when its processor saw it, a little after Envoy's per-try timer started,
    and its end when the next attempt's processor saw that one (or the client's exchange Envoy's reply)."""
    return min(1.0, timeout / 4)


def record_key(rid: str) -> str:
    return f"failover:{rid}"


def attempt_key(rid: str, n: int) -> str:
    return f"failover:{rid}:{n}"


def records_ttl(f: Failover) -> int:
    """How long a request's failover records are kept: no attempt starts after its deadline, and a minute
    covers the last one's answer."""
    return f.deadline_seconds + 60


# -- the client-side exchange's part ----------------------------------------------------------------

def _follows(group: Group, call: Call, path: str, body: dict[str, Any]) -> bool:
    """Whether this call may be served by any member: a turn; a background turn, a count only where every
    member keeps Responses state itself (it runs the turn, it counts; a chat member's run is the sidecar's,
    whose own request is then an ordinary grouped turn); a compaction only where the sidecar compacts for
    every member (its sealed items are read whoever serves the next turn: a backend's own are not)."""
    apis = {b.api for b in group.backends}
    if call is Call.CREATE:
        return body.get("background") is not True or apis <= {RESPONSES, BOTH}
    if call is Call.COUNT:
        return path == INPUT_TOKENS and apis <= {RESPONSES, BOTH}
    return call is Call.COMPACT and apis <= {CHAT, MESSAGES}


def hand_over(side: RequestSide, call: Call, body: dict[str, Any], model: str) -> Decision[Action | None]:
    """The request sent to its model group's attempts, or None when it takes today's path: not a group
    Envoy carries, an attempt already, a call only the primary can serve (`_follows`: then the model's
    backend serves it as before), or the continuation of a response a member stored itself (a stateful
    Responses backend's pin): only that member can continue it, so the request goes there
    (`side.member`), as any pinned turn does, without failover; a pin to a backend outside the group, or
    to one no longer configured, takes today's path too (that backend, or 409 `pinned_backend_gone`):
    an attempt on a member would send the member the holder's key. A turn the sidecar holds goes
    first to the member that served it (its prefix cache) while that member is in."""
    gw = side.gw
    group = group_for(gw.config, model) if side.member is None else None
    if group is None or not _follows(group, call, side.bare, body):
        return None
    prev = body.get("previous_response_id")
    previous: str | None = None  # the member that served the turn this one continues, when the sidecar holds it
    if isinstance(prev, str) and prev:
        values = yield from side.pinning.state_of(prev)
        turn = rec.load_turn(values[0]) if values else None
        pin = rec.Pin.loads(values[1]) if values and values[1] and turn is None else None
        if pin is not None:  # only the backend that stored it can continue it: never any other member
            holder = next((b for b in group.backends if b.name == pin.backend), None)
            if holder is not None and (holder.hosted is not None or
                                       pin.endpoint in {e.address for e in holder.endpoints}):
                side.member = Target(holder, None if holder.hosted is not None else pin.endpoint)
            return None  # not a member (the client changed models), or gone: as for any pinned turn
        served = turn.get("backend") if turn is not None else None
        previous = served if isinstance(served, str) else None
    rid = os.urandom(12).hex()
    # The policy's first attempt (the previous turn's member while it is in, else weights by the placement
    # key; members held off or ejected moved back) names the cluster whose priority 0 it is; the later
    # attempts follow that cluster's priorities.
    first = continue_order(group, placement_key(body, side.headers), gw.health, gw.clock(),
                           previous_backend=previous)[0]
    members = first_on(group.backends, first)
    t0 = time.time()
    record = {"tenant": side.pinning.tenant, "headers": side.headers, "t0": t0, "model": model,
              "members": [b.name for b in members]}
    sealed = gw.sealer.seal(orjson.dumps(record).decode(), _SEALED_FOR)
    side.handover = HandedOver(gw, rid, tuple(b.name for b in members), t0, model)
    # Not done: the answer's headers come back here (`HandedOver.answer`), Envoy's own reply replaced.
    return Action(set_headers=[(H_CLUSTER, group_cluster(members)), (H_BACKEND, members[0].name),
                               (H_FAILOVER, rid)],
                  remove_headers=(H_ENDPOINT, H_FIRST_CONTACT), clear_route_cache=True,
                  writes=[(record_key(rid), sealed.encode())], write_ttl=records_ttl(gw.config.failover))


class HandedOver:
    """The client-side exchange's part after the hand-over: the answer's headers. An answer an attempt
    let go (marked `x-gateway-answered` by it, its own errors included) goes on as it is; Envoy's own reply (every attempt ended without a processor left to
    answer: the last one refused or reset; or a failed answer Envoy did not retry, still marked) is
    replaced by the error naming every attempt, read from the attempts' records. `unseen`: the attempts
    no processor saw the end of (for the metrics and health)."""

    def __init__(self, gw: Gateway, rid: str, members: tuple[str, ...], t0: float, model: str):
        self.gw = gw
        self.rid = rid
        self.members = members
        self.t0 = t0
        self.model = model
        self.unseen: list[Attempt] = []

    def answer(self, headers: dict[str, str]) -> Decision[Action]:
        if H_ANSWERED in headers and H_RETRY not in headers:
            return Action(done=True)
        now = time.time()
        f = self.gw.config.failover
        tries = min(len(self.members), f.max_attempts)
        values = yield Reads(tuple(attempt_key(self.rid, k) for k in range(1, tries + 1)))
        attempts, self.unseen = told(values or [None] * tries, self.members, self.t0, now, f.attempt_timeout)
        raise all_failed_error(attempts, self.model)


def told(values: Iterable[bytes | None], members: Iterable[str], t0: float, now: float, timeout: int,
         on: str | None = None) -> tuple[list[Attempt], list[Attempt]]:
    """Attempts 1..n as their records tell them (`now`: when the last of them ended; `on`: the member of
    the attempt reading them, when it is one of the members' attempts), and those of them no processor
    saw the end of. An attempt with no outcome recorded got no answer: when its processor never saw it
    (no record: only the first begins without one, at the hand-over) Envoy's connection failed; else it
    lasted until the next attempt that is known to have begun, and one that lasted the attempt timeout
    was given up on by Envoy's per-try timeout, a shorter one refused or reset. Members nobody
    recorded are named in priority order."""
    recorded: list[dict[str, Any] | None] = [orjson.loads(v) if v else None for v in values]
    named = {r["backend"] for r in recorded if r}
    unnamed = iter([m for m in members if m not in named and m != on])
    began: list[float | None] = [t0, *(r.get("began") if r else None for r in recorded[1:])]
    out: list[Attempt] = []
    unseen: list[Attempt] = []
    for k, r in enumerate(recorded):
        if r and "status" in r:  # its answer was judged by its processor (which counted it)
            error = r.get("error")
            out.append(Attempt(r["backend"], r.get("status"), r.get("message", ""),
                               Transport(error) if error else None, retry_after=r.get("retry_after")))
            continue
        backend = r["backend"] if r else next(unnamed, "?")
        start, end = began[k], next((b for b in began[k + 1:] if b is not None), now)
        if start is None:
            attempt = Attempt.failed(backend, Transport.CONNECT_FAILURE)
        elif end - start >= timeout - _slack(timeout):
            attempt = Attempt.failed(backend, Transport.TIMEOUT, f"no answer within {timeout} s")
        else:  # (a refused connection's headers can reach its processor before Envoy hears of the refusal)
            attempt = Attempt(backend, None, "no answer (connection refused or reset)", Transport.RESET)
        out.append(attempt)
        if not any(recorded[k + 1:]):  # no later attempt's processor saw it end
            unseen.append(attempt)
    return out, unseen


# -- the upstream filter's attempts -----------------------------------------------------------------

def _member(backends: tuple[Backend, ...], host: str, named: str) -> Backend | None:
    """The member Envoy sent this attempt to: the `url:` member its host's metadata names (a provider's
    addresses are its DNS's), else the one whose instance it connected to."""
    return next((b for b in backends if b.name == named and b.hosted is not None), None) or \
        member_on(backends, host)


def _restored(current: dict[str, str], client: dict[str, str]) -> tuple[list[tuple[str, str]], tuple[str, ...]]:
    """The header changes that give this attempt the client's headers again: what an earlier attempt
    changed set back, what it added removed (Envoy's own x-envoy-* and the attempts' headers stay)."""
    sets = [(k, v) for k, v in client.items() if current.get(k) != v and k != TENANT_HEADER and
            (not k.startswith(":") or k in (":path", ":authority"))]
    removes = tuple(k for k in current if k not in client and not k.startswith((":", "x-envoy-")) and k not in _OURS)
    return sets, removes


def _upstream(act: Action) -> Action:
    """An exchange's action as an attempt's: the route is chosen (no re-match, no routing headers), and
    the answer is always read (it is judged before it reaches the client)."""
    return dataclasses.replace(act, clear_route_cache=False, done=act.immediate is not None,
                               set_headers=[(k, v) for k, v in act.set_headers if k not in _ROUTING],
                               remove_headers=tuple(h for h in (*act.remove_headers, *_ROUTING) if h not in _OURS))


def _said(attempt: Attempt, began: float | None = None) -> bytes:
    """An attempt's record, for the attempts after it: what it got, and when it began (`told`; the fast
    path's judge, which sees only the answer, knows no start)."""
    said = {"backend": attempt.backend, "status": attempt.status, "message": attempt.message,
            "retry_after": attempt.retry_after, "error": attempt.error.value if attempt.error else None}
    return orjson.dumps(said if began is None else {**said, "began": began})


def _began(backend: str, began: float) -> bytes:
    """The record of an attempt after the first, written as it begins: that it reached its processor, on
    which member, and when (`told`)."""
    return orjson.dumps({"backend": backend, "began": began})


def _answered(ex: Exchange, headers: dict[str, str], end_of_stream: bool) -> Action:
    """The exchange's answer to the response headers; an exchange that wanted nothing of the answer (a
    token count, `usage_accounting: translated` on a pass-through) was done with its request: as it came."""
    return Action(done=True) if ex.phase is Phase.DONE else ex.answer_headers(headers, end_of_stream)


@dataclasses.dataclass(frozen=True)
class _Whole:
    """A success held until its body is whole, while another attempt is left."""

    status: int
    headers: dict[str, str]
    reads: bool  # the exchange reads the body (usage, id, the key scrubbed); else it only lets it go


class GroupAttempt(UpstreamStream):
    """One upstream-filter stream: attempt n of a grouped request, on the member Envoy chose. The shell
    drives it like an `Exchange`, gives it the attempt's host (`host`, and `named`: the member its
    endpoint metadata names, for a `url:` member), and afterwards reads `attempts`
    (each one it saw or inferred: metrics and health) and `served` (the exchange that answered)."""

    def __init__(self, gw: Gateway, host: str = "", named: str = ""):
        self.gw = gw
        self.host = host
        self.named = named
        self.headers: dict[str, str] = {}
        self.ex: Exchange | None = None
        self.member: Backend | None = None
        self.rid = ""
        self.n = 1
        self.last = True
        self.began = 0.0
        self.attempts: list[Attempt] = []  # this attempt's outcome, and earlier ones no processor saw end
        self.earlier: list[Attempt] = []  # every earlier attempt, for the all-failed error
        self.held: dict[str, str] | None = None  # an error's headers, judged with its body
        self.whole: _Whole | None = None  # a success held whole: a reset before its end is still a retry
        self.served: Exchange | None = None
        self.gave_up = False  # this last attempt failed too: its answer is the error naming every attempt
        self.failure: GatewayError | None = None  # set by the shell when the sidecar answered with an error

    # -- request ------------------------------------------------------------------------------------

    def request_headers(self, headers: dict[str, str], end_of_stream: bool) -> Step:
        return start(self._start(headers, end_of_stream))

    def _start(self, headers: dict[str, str], end_of_stream: bool) -> Decision[Action]:
        self.began = time.time()  # as early as it is seen: the end of the attempt before it (`told`)
        self.headers = headers
        self.rid = headers.get(H_FAILOVER, "")
        self.n = int(headers.get("x-envoy-attempt-count", "1") or 1)
        values = yield Reads((record_key(self.rid), *(attempt_key(self.rid, k) for k in range(1, self.n))))
        record = self._open(values[0] if values else None)
        client: dict[str, str] = record.get("headers") or {}
        self.headers = {**client, **{k: v for k, v in headers.items() if k.startswith("x-envoy-")}}
        model = record.get("model")
        names: list[str] = record.get("members") or []
        backends = tuple(b for b in map(self.gw.config.backend, names) if b is not None)
        self.member = _member(backends, self.host, self.named)
        f = self.gw.config.failover
        tries = min(len(backends), f.max_attempts)
        mine = self.member.name if self.member is not None and self.n <= tries else None
        self.earlier, self.attempts = told(values[1:] if values else [], names, float(record.get("t0", 0)),
                                           self.began, f.attempt_timeout, on=mine)
        late = time.time() - float(record.get("t0", 0)) > f.deadline_seconds
        if self.member is None or self.n > tries or (late and self.n > 1):
            raise self._all_failed(model)
        self.last = self.n >= tries
        # here: the exchange imports the client side of this module
        from extproc.exchange.exchange import Exchange

        tenant = record.get("tenant")
        endpoint = None if self.member.hosted is not None else self.host  # a provider's: its cluster's, as off the group
        self.ex = Exchange(self.gw, tenant if isinstance(tenant, str) else None,
                           Target(self.member, endpoint, grouped=True))
        act = yield from awaited(self.ex.request_headers(self.headers, end_of_stream))
        sets, removes = _restored(headers, client)
        up = _upstream(act)
        if self.n > 1 and not up.writes:  # (an exchange writes nothing at request headers: no TTL to share)
            up = dataclasses.replace(up, writes=[(attempt_key(self.rid, self.n), _began(self.member.name, self.began))],
                                     write_ttl=records_ttl(f))
        return dataclasses.replace(up, set_headers=[*sets, *up.set_headers], remove_headers=(*removes, *up.remove_headers))

    def _open(self, raw: bytes | None) -> dict[str, Any]:
        if raw is None:
            raise GatewayError(502, "this request's failover record is gone (expired, or the state store lost it)",
                               code="failover_state_lost")
        opened = orjson.loads(self.gw.sealer.open(raw.decode(), _SEALED_FOR))
        return opened if isinstance(opened, dict) else {}

    def request_body(self, raw: bytes) -> Step:
        assert self.ex is not None
        return start(self._body(raw))

    def _body(self, raw: bytes) -> Decision[Action]:
        assert self.ex is not None
        return _upstream((yield from awaited(self.ex.request_body(raw))))

    # -- response -----------------------------------------------------------------------------------

    def response_headers(self, headers: dict[str, str], end_of_stream: bool = False) -> Action:
        ex = self.ex
        assert ex is not None and self.member is not None
        status = int(headers.get(":status", "0") or 0)
        if status >= 400 and not end_of_stream:  # judged with its body, before any of it goes on
            self.held = headers
            return Action(response_body_mode=BUFFERED)
        if status >= 400:
            return self._judged(headers, b"")
        act = _answered(ex, headers, end_of_stream)
        if not self.last and not end_of_stream and not ex.stream:
            # Held whole, whatever the exchange does with the body (reads its usage or id, scrubs the key:
            # STREAMED would let the headers reach the router at once): a reset before its end is then a
            # retry, not a cut answer, and the attempt has served only once the body is whole.
            self.whole = _Whole(status, headers, reads=not act.done)
            return dataclasses.replace(act, response_body_mode=BUFFERED, done=False)
        self._served(status, headers)
        return act

    def response_body(self, chunk: bytes, end_of_stream: bool) -> Action:
        ex = self.ex
        assert ex is not None
        if self.held is not None:
            headers, self.held = self.held, None
            return self._judged(headers, chunk)
        whole, self.whole = self.whole, None
        if whole is not None:  # Envoy buffered it: this is the whole body
            self._served(whole.status, whole.headers)
            if not whole.reads:
                return Action(done=True)
        return ex.response_body(chunk, end_of_stream)

    def _judged(self, headers: dict[str, str], body: bytes) -> Action:
        ex = self.ex
        assert ex is not None and self.member is not None
        status = int(headers.get(":status", "0") or 0)
        attempt = Attempt.answered(self.member.name, status, body, headers, key=self.member.api_key or None,
                                   now=time.time())
        if attempt.verdict is Verdict.FINAL:
            self._served(status, headers)
            first = _answered(ex, headers, not body)
            if first.done or not body:
                return dataclasses.replace(first, response_body_mode=None)
            rest = ex.response_body(body, True)
            return dataclasses.replace(rest, set_headers=[*first.set_headers, *rest.set_headers],
                                       remove_headers=(*first.remove_headers, *rest.remove_headers))
        self.attempts.append(attempt)
        log.info("model=%s: attempt %d on %s failed over: %s", ex.model, self.n, self.member.name, attempt.describe())
        if self.last:
            self.gave_up = True
            err = all_failed_error([*self.earlier, attempt], ex.model)
            body_out = err.body(ex.client_api)
            return Action(body=body_out, set_headers=[(":status", str(err.status)), ("content-type", "application/json"),
                                                      ("content-length", str(len(body_out))), *err.headers],
                          done=True)
        return Action(set_headers=[(H_RETRY, "1")], writes=[(attempt_key(self.rid, self.n), _said(attempt, self.began))],
                      write_ttl=records_ttl(self.gw.config.failover), done=True)

    def _served(self, status: int, headers: dict[str, str]) -> None:
        assert self.ex is not None and self.member is not None
        self.attempts.append(Attempt.answered(self.member.name, status, None, headers))
        self.served = self.ex

    def _all_failed(self, model: Any) -> GatewayError:
        if not self.earlier:
            return GatewayError(502, "no member of this model's group serves the instance Envoy chose",
                                code="all_backends_failed")
        return all_failed_error(self.earlier, model if isinstance(model, str) else None)

    # -- what the shell reads -----------------------------------------------------------------------

    @property
    def answered(self) -> bool:
        """Whether this attempt's answer goes to the client, surely (served, or the error naming every
        attempt after its own answer was judged), not to a retry. An error of the sidecar's own is not
        sure to: Envoy may have heard of a refused connection first, and answer itself."""
        return self.served is not None or self.gave_up

    @property
    def lets_go(self) -> bool:
        """Whether this attempt lets an answer go to the client (`answered`, or an error of the sidecar's
        own): the shell marks it `x-gateway-answered`, which the client-side exchange lets go."""
        return self.answered or self.failure is not None

    @property
    def client_api(self) -> str | None:
        return API_OF_PATH.get(self.path.partition("?")[0])

    @property
    def model(self) -> str | None:
        return self.ex.model if self.ex is not None else None


class Hold:
    """The hold filter's stream on one attempt (`group_routes._holder`): the member's response headers
    answered only with its first body chunk, a stream's or not, so that a reset before any body byte
    is still a retry (Envoy's router retries none once headers reached it). `message` names the
    replies (each "go on as it is") due after each message, in order; `done` once nothing more is held
    (the stream is then closed: Envoy passes the rest alone)."""

    def __init__(self) -> None:
        self.held: list[str] = []
        self.done = False

    def message(self, kind: str, end_of_stream: bool) -> list[str]:
        if kind == "response_headers" and not end_of_stream:
            self.held = [kind]
            return []
        self.done = True
        return [*self.held, kind]


class FastJudge(UpstreamStream):
    """The judge filter's stream on one fast-path attempt (`group_routes._judge`): an answer of a status
    `judge` may fail over (5xx, 408, 429; Envoy skips the filter for every other), read whole and judged
    as a processor attempt's is. A final one (a 500 naming a context overflow) goes on as it is; a
    failed-over one is recorded under the request's id (`request.id`, which every attempt shares) and
    marked `x-gateway-retry` (its value the status: the attempt log reads it, `ops.attempt_log`), so
    Envoy drops it and retries; on the last attempt the answer is the error naming every attempt, in
    the client's API's shape (the route's name says it), and so is the answer to the attempt after the
    last (`request_headers`: Envoy makes it when the last member got no answer). The shell gives it the attributes Envoy sent
    with the headers (`seen`). Counting and health are the attempt log's: it sees every attempt."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.headers: dict[str, str] = {}
        self.attributes: dict[str, str] = {}
        self.failure: GatewayError | None = None
        self.model: str | None = None

    def request_headers(self, headers: dict[str, str], end_of_stream: bool) -> Step:
        """The attempt after the last (the last-word filter: the last member got no answer): the error
        naming every attempt, at once."""
        n = int(headers.get("x-envoy-attempt-count", "1") or 1)
        return start(self._all_failed(n, None, lambda err, out: Action(
            immediate=(err.status, out, "application/json"), set_headers=list(err.headers), done=True)))

    def request_body(self, raw: bytes) -> Step:
        return Action(done=True)

    def response_headers(self, headers: dict[str, str], end_of_stream: bool = False) -> Step:
        self.headers = headers
        return start(self._judged(b"")) if end_of_stream else Action()  # the body comes whole (BUFFERED)

    def response_body(self, chunk: bytes, end_of_stream: bool) -> Step:
        return start(self._judged(chunk))

    def _members(self) -> tuple[Backend, ...]:
        return fast_members(self.gw.config, self.attributes.get("xds.cluster_name", ""))

    def _judged(self, body: bytes) -> Decision[Action]:
        members = self._members()
        address = self.attributes.get("upstream.address", "")
        member = member_on(members, address)
        status = int(self.headers.get(":status", "0") or 0)
        n = int(self.attributes.get("upstream.request_attempt_count", "1") or 1)
        if is_no_member(address):  # every member not yet tried is ejected: the sentinel's 503 is no answer
            return (yield from self._all_failed(n, None, _replaced("503"), out=True))
        if member is None:
            return Action(done=True)
        attempt = Attempt.answered(member.name, status, body, self.headers, now=time.time())
        if attempt.verdict is Verdict.FINAL:
            return Action(done=True)
        mark = (H_RETRY, str(status))
        log.info("attempt %d on %s failed over (fast path): %s", n, member.name, attempt.describe())
        if n < min(len(members), self.gw.config.failover.max_attempts):
            return Action(set_headers=[mark], writes=[(fast_attempt_key(self.rid, n), _said(attempt))],
                          write_ttl=records_ttl(self.gw.config.failover), done=True)
        return (yield from self._all_failed(n, attempt, _replaced(str(status))))

    @property
    def rid(self) -> str:
        return self.attributes.get("request.id", "")

    def _all_failed(self, n: int, this: Attempt | None, answer: Callable[[GatewayError, bytes], Action],
                    out: bool = False) -> Decision[Action]:
        """The error naming every attempt before attempt `n` (as they recorded themselves; those with no
        record got no answer, named by the members nobody recorded, in priority order) and `this` one, in
        the client's API's shape (the route's name: `fast:<client api>:<group>`). `out`: Envoy found no
        member left to try (each ejected by its outlier detection), named too."""
        values = yield Reads(tuple(fast_attempt_key(self.rid, k) for k in range(1, n)))
        recorded = [orjson.loads(v) if v else None for v in values or [None] * (n - 1)]
        named = {r["backend"] for r in recorded if r} | ({this.backend} if this is not None else set())
        unnamed = iter([b.name for b in self._members() if b.name not in named])
        earlier = [Attempt(r["backend"], r.get("status"), r.get("message", ""), retry_after=r.get("retry_after")) if r
                   else Attempt(next(unnamed, "?"), None, "no answer (connection refused, reset or timed out)",
                                Transport.RESET) for r in recorded]
        ejected = [Attempt(name, None, "taken out (ejected after failing)", Transport.CONNECT_FAILURE)
                   for name in unnamed] if out else []
        err = all_failed_error([*earlier, *([this] if this is not None else []), *ejected])
        _, _, route = self.attributes.get("xds.route_name", "").partition(":")
        return answer(err, err.body(route.partition(":")[0] or None))


# The fast judge's mark (`x-gateway-retry`) on the answer that ends a request, which Envoy's retry skips
# (it retries on a number alone) and the attempt log reads: the last attempt failed with this status.
LAST_MARK = "last "


def _replaced(status: str) -> Callable[[GatewayError, bytes], Action]:
    """The failed answer of status `status` replaced by the error naming every attempt (`err`, `out` its body)."""
    return lambda err, out: Action(body=out, set_headers=[
        (":status", str(err.status)), ("content-type", "application/json"), ("content-length", str(len(out))),
        *err.headers, (H_RETRY, f"{LAST_MARK}{status}")], done=True)


def fast_attempt_key(rid: str, n: int) -> str:
    return f"failover:fast:{rid}:{n}"

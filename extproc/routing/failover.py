"""Failover between the members of a model group (sans-IO): which upstream answers another backend might
serve, what a `retry-after` asks, each backend's health, and the one error a client gets when every
attempt failed.

Nothing here sends, sleeps or reads a clock: the caller passes `now` (time.monotonic seconds) and the
answers it saw, and gets decisions back. The mechanism that moves a request between backends (the
processor's attempts, Envoy's compiled retries) asks `judge` whether to go on, records each attempt in
`Health` (through `Metrics.record_attempt`), and asks `routing.groups.attempt_order` where to go next.
"""

from __future__ import annotations

import datetime
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from enum import Enum

from extproc.config import Failover
from extproc.errors import GatewayError, upstream_error_payload
from extproc.ops.redact import forms_of


class Verdict(Enum):
    """What to do with one upstream answer received before any byte of it reached the client."""

    FAIL_OVER = "fail_over"  # another backend might serve it: try the next member
    FINAL = "final"  # deliver it (a success, or an error every backend would repeat)


class Transport(Enum):
    """An attempt that got no HTTP answer at all: always failed over (nothing reached the client)."""

    CONNECT_FAILURE = "connect_failure"
    RESET = "reset"  # the connection dropped before the response's headers (or its first body byte)
    TIMEOUT = "timeout"


# Statuses another backend may serve: every 5xx (unless the body names a final reason), 408 and 429.
_FAIL_OVER_4XX = frozenset({408, 429})
# What an error body says when the request itself is the problem, so that every backend would refuse it
# too, whatever status it came with (vLLM and some proxies answer a context overflow with a 500, Azure a
# content-filter refusal with a 400 or a 500). Lower case; searched in the body's first 64 KiB.
_FINAL_MARKERS = re.compile(
    r"context_length_exceeded"  # OpenAI's code, Chat and Responses
    r"|maximum context length"  # OpenAI's and vLLM's message ("This model's maximum context length is ...")
    r"|context window"  # OpenAI Responses: "Your input exceeds the context window of this model"
    r"|longer than the maximum model length"  # vLLM: "The decoder prompt (length N) is longer than ..."
    r"|prompt is too long"  # Anthropic: "prompt is too long: 208310 tokens > 200000 maximum"
    r"|input is too long"  # Anthropic on Bedrock and Vertex
    r"|model_context_window_exceeded"  # Anthropic's stop reason, as some proxies report it
    r"|exceeds the maximum number of tokens"  # Gemini: "The input token count (N) exceeds the maximum number ..."
    r"|exceed_context_size_error|exceeds the available context size"  # llama.cpp's server
    r"|content_filter|content_policy_violation|responsibleaipolicyviolation"  # Azure, OpenAI
    r"|invalid_prompt|flagged as potentially violating"  # OpenAI's usage-policy refusal
)
_SCAN_BYTES = 64 * 1024


def judge(status: int, body: bytes | None, *, gateway_key: bool = False) -> Verdict:
    """Whether an upstream answer should go to the next member of the group instead of to the client.

    Failed over: 5xx (Envoy's own 503 for a refused or reset connection and 504 for a timeout included),
    429, 408. Final: every success and every other 4xx (400, a 404 for the model, 413, 422, ...), and any
    status whose body names a context-length overflow or a content-policy refusal, which another backend
    would repeat. A 401/403 is the client's own key and final, unless the sidecar sent the backend its
    own key (`gateway_key`): then it is the backend's misconfiguration and another member may serve.
    """
    if status < 400:
        return Verdict.FINAL
    if body and _FINAL_MARKERS.search(body[:_SCAN_BYTES].decode("utf-8", "replace").lower()):
        return Verdict.FINAL
    if status >= 500 or status in _FAIL_OVER_4XX or (gateway_key and status in (401, 403)):
        return Verdict.FAIL_OVER
    return Verdict.FINAL


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """How long an upstream asked not to be sent requests: `retry-after-ms` (milliseconds, OpenAI's), else
    `retry-after` (delta seconds or an HTTP date; `now` is the wall clock, time.time(), for the date).
    None when neither is there or readable; never negative. Header names in any case."""
    lower = {k.lower(): v.strip() for k, v in headers.items()}
    ms = _number(lower.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000
    value = lower.get("retry-after")
    if not value:
        return None
    seconds = _number(value)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT; a date without a zone is taken as GMT too
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) and value >= 0 else None


HEALTHY, EJECTED, HELD_OFF = "healthy", "ejected", "held_off"
STATES = (HEALTHY, EJECTED, HELD_OFF)


@dataclass
class _Record:
    failures: int = 0  # consecutive failed attempts since the last success or return
    times_ejected: int = 0  # the ejection multiplier (decays while the backend stays in)
    ejected_until: float = -math.inf
    back_since: float = -math.inf  # when the last ejection ended
    held_until: float = -math.inf  # a retry-after's end


@dataclass
class Health:
    """Each backend's standing, from the attempts recorded (sans-IO: `now` is passed in, monotonic seconds).

    Outlier ejection as Envoy does it: `eject_after` consecutive failures take a backend out for
    `eject_seconds` times the number of times it was taken out, capped at `max_eject_seconds`; it comes
    back by itself when that time is up, and a success resets the count of failures. The multiplier
    drops by one for each `eject_seconds` the backend stays in after coming back (Envoy decrements it per
    interval while the host is healthy), so a backend that failed once long ago starts again at the base.
    A `retry-after` holds a backend off for that long (capped at `max_eject_seconds`): attempts go to the
    other members meanwhile, nothing waits. A success ends an ejection or a hold at once (a request that
    went there because every member was out shows that it serves again).

    The settings may be replaced on a config reload (`settings`); the records carry over.
    """

    settings: Failover = field(default_factory=Failover)
    _records: dict[str, _Record] = field(default_factory=dict)

    def record(self, backend: str, ok: bool, now: float, retry_after: float | None = None,
               status: int | None = None) -> None:
        """One attempt's outcome: `ok` when the backend answered (a success or a final error, which is the
        request's fault), not ok when the attempt was failed over. A failed-over answer below 500 (`status`
        429 or 408) holds the backend off by its retry-after but is no failure towards `eject_after`: it
        ends the run of failures, as any answer under 500 ends Envoy's consecutive-5xx count, so `/readyz`
        says ejected exactly when the group cluster's outlier detection would."""
        r = self._records.setdefault(backend, _Record())
        if ok:
            r.failures = 0
            r.held_until = -math.inf
            if now < r.ejected_until:
                r.ejected_until = r.back_since = now
            return
        if retry_after is not None:
            r.held_until = max(r.held_until, now + min(retry_after, self.settings.max_eject_seconds))
        if now < r.ejected_until:
            return  # already out: its failures while out say nothing new
        if status is not None and status < 500:
            r.failures = 0
            return
        r.failures += 1
        if r.failures >= self.settings.eject_after:
            base = self.settings.eject_seconds
            decayed = int((now - r.back_since) // base) if r.times_ejected else 0
            r.times_ejected = max(0, r.times_ejected - decayed) + 1
            r.ejected_until = r.back_since = now + min(base * r.times_ejected, self.settings.max_eject_seconds)
            r.failures = 0

    def state(self, backend: str, now: float) -> str:
        """healthy, ejected (by consecutive failures) or held_off (by a retry-after)."""
        r = self._records.get(backend)
        if r is None:
            return HEALTHY
        if now < r.ejected_until:
            return EJECTED
        if now < r.held_until:
            return HELD_OFF
        return HEALTHY

    def available(self, backend: str, now: float) -> bool:
        return self.state(backend, now) == HEALTHY

    def until(self, backend: str, now: float) -> float | None:
        """When an ejected or held-off backend comes back (None: it is in)."""
        r = self._records.get(backend)
        state = self.state(backend, now)
        if r is None or state == HEALTHY:
            return None
        return r.ejected_until if state == EJECTED else r.held_until

    def states(self, now: float, backends: Iterable[str] = ()) -> dict[str, str]:
        """The state of every backend recorded, and of each of `backends` (healthy when never recorded)."""
        names = dict.fromkeys([*backends, *self._records])
        return {name: self.state(name, now) for name in names}


@dataclass(frozen=True)
class Attempt:
    """One try of a request on one backend, as the mechanism saw it before anything reached the client."""

    backend: str
    status: int | None  # the upstream's (or Envoy's) status; None: no HTTP answer (`error` says why)
    message: str  # what it said: the error's message, or the transport failure
    error: Transport | None = None
    verdict: Verdict = Verdict.FAIL_OVER
    retry_after: float | None = None  # seconds the backend asked to be left alone

    @classmethod
    def answered(cls, backend: str, status: int, body: bytes | None, headers: Mapping[str, str] | None = None,
                 *, gateway_key: bool = False, now: float | None = None, key: str | None = None) -> Attempt:
        """An attempt that got an HTTP answer: judged, its error message and retry-after read (`now` is
        the wall clock for a retry-after date). `key`: the key the sidecar sent this backend (implies
        `gateway_key`), removed from the message in any form the upstream quoted it (ops.redact), since
        the message reaches the client in the all-failed error."""
        message = "ok" if status < 400 else upstream_error_payload(status, body or b"")["message"]
        if key:
            message = forms_of(key).scrub_text(message)
        return cls(backend, status, message, None, judge(status, body, gateway_key=gateway_key or bool(key)),
                   retry_after_seconds(headers or {}, now))

    @classmethod
    def failed(cls, backend: str, error: Transport, detail: str = "") -> Attempt:
        """An attempt that got no answer: refused, reset, or silent past its timeout."""
        what = {Transport.CONNECT_FAILURE: "connection failed", Transport.RESET: "connection reset",
                Transport.TIMEOUT: "timed out"}[error]
        return cls(backend, None, f"{what}: {detail}" if detail else what, error)

    @property
    def ok(self) -> bool:
        """Whether the backend served (its health): a success or a final error, which is the request's."""
        return self.verdict is Verdict.FINAL

    @property
    def timed_out(self) -> bool:
        return self.error is Transport.TIMEOUT or self.status == 504

    @property
    def outcome(self) -> str:
        """The metric label: ok, rejected (a final error), rate_limited, failed (another failed-over
        status), connect_failure, reset, timeout."""
        if self.error is not None:
            return self.error.value
        assert self.status is not None
        if self.verdict is Verdict.FINAL:
            return "ok" if self.status < 400 else "rejected"
        return "rate_limited" if self.status == 429 else "timeout" if self.status in (408, 504) else "failed"

    def describe(self) -> str:
        """`backend: status message`, short, for the all-failed error and the log."""
        said = self.message if len(self.message) <= 200 else self.message[:197] + "..."
        return f"{self.backend}: {self.status} {said}" if self.status is not None else f"{self.backend}: {said}"


OUTCOMES = ("ok", "rejected", "rate_limited", "failed", *(t.value for t in Transport))


def all_failed_error(attempts: Sequence[Attempt], model: str | None = None) -> GatewayError:
    """The one error a client gets when every attempt was failed over (its `body` in the client's API's
    shape: Anthropic's for Messages clients, OpenAI's otherwise), naming each attempt's backend and what
    it said, with a `retry-after` header of the soonest hint on a 429.

    Status: 429 when every attempt was a 429 (the client's SDK backs off and retries, as it would for one
    provider), else 504 when the last attempt timed out, else 502 (the upstreams failed, not the gateway).
    """
    if not attempts:
        raise ValueError("all_failed_error needs at least one attempt")
    if all(a.status == 429 for a in attempts):
        status, code = 429, "all_backends_rate_limited"
    elif attempts[-1].timed_out:
        status, code = 504, "all_backends_timed_out"
    else:
        status, code = 502, "all_backends_failed"
    whose = f"model '{model}'" if model else "this model"
    message = (f"every backend of {whose} failed ({len(attempts)} attempt{'s' * (len(attempts) > 1)}): "
               + "; ".join(a.describe() for a in attempts))
    hints = [a.retry_after for a in attempts if a.retry_after is not None]
    headers = (("retry-after", str(math.ceil(min(hints)))),) if status == 429 and hints else ()
    return GatewayError(status, message, code=code, headers=headers)


__all__ = ["EJECTED", "HEALTHY", "HELD_OFF", "OUTCOMES", "STATES", "Attempt", "Health", "Transport",
           "Verdict", "all_failed_error", "judge", "retry_after_seconds"]

"""Per-tenant request and token limits: windows, counters and the verdict on one request (sans-IO).

Envoy asks the sidecar's rate-limit service (envoy/ratelimit.py) about each request of a tenant with
limits; the service runs `plan`'s counter changes in the state store (one round trip, shared by the
replicas) and answers with `verdict`. Requests are counted as they are checked; tokens are counted
from each answer's usage afterwards (`usage_changes`), so a tenant under its token limit may send one
request that takes it over: the next is refused until the window ends.

Windows are fixed and aligned: the minute (UTC, :00 to :59), the UTC day, the UTC calendar month.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson

from extproc.clients import TenantLimits

MINUTE = "minute"
PREFIX = "quota:"
SLACK_SECONDS = 60  # a counter outlives its window by this much (clocks of replicas differ a little)


@dataclass(frozen=True)
class Window:
    start: int  # epoch seconds, inclusive
    end: int  # exclusive

    def reset(self, now: float) -> float:
        return max(0.0, self.end - now)


def window(per: str, now: float) -> Window:
    """The fixed window of `per` (minute | day | month) that holds `now`."""
    if per == MINUTE:
        start = int(now) // 60 * 60
        return Window(start, start + 60)
    t = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if per == "day":
        return Window(int(t.timestamp()), int((t + timedelta(days=1)).timestamp()))
    first = t.replace(day=1)
    following = first.replace(year=first.year + first.month // 12, month=first.month % 12 + 1)
    return Window(int(first.timestamp()), int(following.timestamp()))


@dataclass(frozen=True)
class Counter:
    """One counter of one tenant in one window: the store key and how long it must live."""

    name: str  # requests | tokens | budget
    window: Window
    key: str

    def ttl(self, now: float) -> int:
        return math.ceil(self.window.end - now) + SLACK_SECONDS


def counters(tenant: str, limits: TenantLimits, now: float) -> list[Counter]:
    """The tenant's counters for `now`, in a fixed order: requests, tokens per minute, budget."""
    out = []
    for name, per, present in (("requests", MINUTE, limits.requests_per_minute is not None),
                               ("tokens", MINUTE, limits.tokens_per_minute is not None),
                               ("budget", limits.token_budget.per if limits.token_budget else "", limits.token_budget)):
        if present:
            w = window(per, now)
            out.append(Counter(name, w, f"{PREFIX}{tenant}:{name}:{per}:{w.start}"))
    return out


Change = tuple[str, int, int]  # store key, increment, ttl seconds


def check_changes(tenant: str, limits: TenantLimits, now: float) -> tuple[list[Counter], list[Change]]:
    """What checking one request does to the counters: +1 request, and a read (+0) of the others."""
    found = counters(tenant, limits, now)
    return found, [(c.key, 1 if c.name == "requests" else 0, c.ttl(now)) for c in found]


def usage_changes(tenant: str, limits: TenantLimits, now: float, tokens: int) -> list[Change]:
    """An answer's tokens added to the tenant's token counters (none when it has no token limits)."""
    return [(c.key, tokens, c.ttl(now)) for c in counters(tenant, limits, now) if c.name != "requests"]


@dataclass(frozen=True)
class Refusal:
    limit: str  # requests | tokens | budget: the limit that refused (the metric's label)
    retry_after: int  # seconds until the window that refused ends


@dataclass(frozen=True)
class Verdict:
    headers: list[tuple[str, str]]  # x-ratelimit-* (and on a refusal retry-after), on every answer
    refusal: Refusal | None


def duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: `59s`, `1m30s`, `2h0m0s`, `450ms`."""
    ms = math.ceil(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    return (f"{hours}h{minutes}m" if hours else f"{minutes}m" if minutes else "") + secs


def verdict(limits: TenantLimits, found: list[Counter], values: list[int], now: float) -> Verdict:
    """Over a limit: more requests than allowed in this minute (this one counted), or tokens already at
    the minute's or the budget's limit."""
    headers: list[tuple[str, str]] = []
    refusals: list[Refusal] = []
    budget = limits.token_budget
    for c, value in zip(found, values, strict=True):
        limit = {"requests": limits.requests_per_minute, "tokens": limits.tokens_per_minute,
                 "budget": budget.tokens if budget else None}[c.name] or 0
        over = value > limit if c.name == "requests" else value >= limit
        if c.name != "budget":  # OpenAI's headers name per-minute limits; the budget has no header of its own
            headers += [(f"x-ratelimit-limit-{c.name}", str(limit)),
                        (f"x-ratelimit-remaining-{c.name}", str(max(0, limit - value))),
                        (f"x-ratelimit-reset-{c.name}", duration(c.window.reset(now)))]
        if over:
            refusals.append(Refusal(c.name, max(1, math.ceil(c.window.reset(now)))))
    if not refusals:
        return Verdict(headers, None)
    worst = max(refusals, key=lambda r: r.retry_after)  # every refusing window must end
    return Verdict([*headers, ("retry-after", str(worst.retry_after))], worst)


_MESSAGES = {
    "requests": ("requests", "rate_limit_exceeded", "Rate limit reached for requests per minute of tenant {t} "
                                                   "(limit {n}); try again in {s}s."),
    "tokens": ("tokens", "rate_limit_exceeded", "Rate limit reached for tokens per minute of tenant {t} (limit {n}); "
                                               "try again in {s}s."),
    "budget": ("insufficient_quota", "insufficient_quota", "Tenant {t} has used its token budget of {n} per {p}; "
                                                          "it renews in {s}s."),
}


def refusal_body(path: str, tenant: str, limits: TenantLimits, refusal: Refusal) -> bytes:
    """The 429's body in the caller's API's shape: Anthropic Messages, or OpenAI's for both its APIs."""
    kind, code, template = _MESSAGES[refusal.limit]
    budget = limits.token_budget
    n = {"requests": limits.requests_per_minute, "tokens": limits.tokens_per_minute,
         "budget": budget.tokens if budget else None}[refusal.limit]
    message = template.format(t=tenant, n=n, s=refusal.retry_after, p=budget.per if budget else "")
    if path.startswith("/v1/messages"):
        return orjson.dumps({"type": "error", "error": {"type": "rate_limit_error", "message": message}})
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})

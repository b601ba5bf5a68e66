"""What a finished exchange leaves behind: its metrics and its one log line.

The only place that reads a finished `Exchange` for operations. What each GenAI metric can see:

- token usage: every answer whose usage the upstream reported (estimates stay out of the GenAI
  histogram, as the conventions ask, and go to `extproc_tokens_total{estimated="true"}`);
- request duration: answers the sidecar read to their last byte (translated, or watched for usage
  with `usage_accounting: all`), and its own error replies; an answer it stopped watching after the
  headers (an upstream error passed through, `usage_accounting: translated`) has no end it can see;
- time to first token and time per output token: successful streams whose chunks the sidecar
  handled (translated, or watched); per output token needs the upstream's usage and 2+ output tokens.

What it reads of the exchange: model, response_model, client_api, upstream_api, target (backend name, endpoint),
usage, stream, translated, pin_decision, learned_fact, background_outcome, failure, status, chunks,
counted_by_envoy, and
for the log line headers (x-request-id), method, path, dropped_tools. An exchange `counted_by_envoy`
(a pass-through whose usage only Envoy reads) leaves its request, token and GenAI metrics to the
access-log service (`ops.access_log`), which counts them from Envoy's entry as for the fast path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from extproc.ops.metrics import ExchangeTimer, Metrics

if TYPE_CHECKING:
    from extproc.exchange import Exchange

log = logging.getLogger("extproc")
OPERATION = "chat"  # gen_ai.operation.name: the conventions' value for Chat Completions and Responses alike


def outcome_of(ex: Exchange) -> tuple[str, int]:
    if ex.failure is not None:
        return f"gateway_{ex.failure.status // 100}xx", ex.failure.status
    return status_outcome(ex.status), ex.status


def status_outcome(status: int) -> str:
    """An answer's outcome label by its status (the access-log service counts fast-path ones with it)."""
    return "ok" if 200 <= status < 300 else f"upstream_{status // 100}xx" if status else "passed_on"


def record(ex: Exchange, metrics: Metrics, timer: ExchangeTimer, label_for: Callable[[str | None], str]) -> None:
    """Metrics and the log line of one exchange; `label_for` bounds the model label (`Classifier.label_for`)."""
    m = metrics
    outcome, status = outcome_of(ex)
    backend = ex.target.backend.name if ex.target else ""
    model = label_for(ex.model)
    u = ex.usage
    envoy = ex.counted_by_envoy  # its request, tokens and duration come from Envoy's access log (ops.access_log)
    if ex.client_api is not None and not envoy:
        m.requests.inc(ex.client_api, ex.upstream_api or ex.client_api, backend, model, outcome)
        if ex.target is not None:
            _genai(ex, m, timer, (OPERATION, backend, model), _response_model(ex, m, label_for), status)
    if ex.translated:
        m.translations.inc(f"{ex.client_api}_to_{ex.upstream_api}", str(ex.stream).lower())
    if ex.chunks:
        m.stream_chunks.inc("translated" if ex.translated else "observed", by=ex.chunks)
    if ex.pin_decision:
        m.pins.inc(ex.pin_decision)
    if ex.learned_fact:
        m.learned.inc(backend, ex.learned_fact)
    if ex.background_outcome and ex.failure is None:  # the run's own outcomes: front/background.py
        m.background_runs.inc(ex.background_outcome)
    if u is not None:
        est = str(u.estimated).lower()
        for kind, n in (("input", u.input_tokens), ("output", u.output_tokens), ("cached", u.cached_tokens),
                        ("reasoning", u.reasoning_tokens)):
            m.tokens.inc(model, backend, kind, est, by=n)
    if (ex.method or ex.path) and log.isEnabledFor(logging.INFO):
        fields: dict[str, object] = {"request_id": ex.headers.get("x-request-id"), "method": ex.method, "path": ex.path,
                  "model": ex.model, "client_api": ex.client_api, "upstream_api": ex.upstream_api,
                  "backend": backend or None, "endpoint": ex.target.endpoint if ex.target else None,
                  "translated": ex.translated, "stream": ex.stream, "pin": ex.pin_decision, "status": status,
                  "outcome": outcome, "duration_ms": round((timer.ended - timer.started) * 1000, 2),
                  "sidecar_ms": round(timer.busy * 1000, 3)}
        if ex.failure is not None:
            fields["error"] = ex.failure.code
        if u is not None:
            fields.update(u.as_metadata())
        if ex.dropped_tools:
            fields["dropped_tools"] = ex.dropped_tools
        if envoy:
            fields["counted_by"] = "envoy"  # the status and usage are in Envoy's access log
        log.info("request", extra={"fields": fields})


def _response_model(ex: Exchange, m: Metrics, label_for: Callable[[str | None], str]) -> str:
    """The GenAI response model label: the model the upstream's answer named (a provider's dated snapshot,
    a server's served name), bounded (`Metrics.response_models`); an answer that names the model asked
    for gets the request model's own label; none when the sidecar did not read one."""
    named = ex.response_model
    if not named:
        return ""
    return label_for(named) if named == ex.model else m.response_models.label(named)


def _genai(ex: Exchange, m: Metrics, timer: ExchangeTimer, labels: tuple[str, str, str], answered: str,
           status: int) -> None:
    """The OpenTelemetry GenAI metrics of one routed request, from what the sidecar saw of its answer
    (`answered`: its response model label)."""
    u = ex.usage
    if ex.failure is not None:
        m.request_duration.observe(timer.ended - timer.started, *labels, ex.failure.code or str(ex.failure.status),
                                   answered)
        return
    if u is None:  # the answer was not read to its end: no duration, no usage, no stream timing
        return
    ok = 200 <= status < 300
    m.request_duration.observe(timer.ended - timer.started, *labels, "" if ok else str(status), answered)
    if not u.estimated:
        m.token_usage.observe(u.input_tokens, *labels, "input", answered)
        m.token_usage.observe(u.output_tokens, *labels, "output", answered)
    first, last = timer.first_chunk, timer.last_chunk
    if ex.stream and ok and first is not None and last is not None:
        m.time_to_first_token.observe(first - timer.started, *labels, answered)
        if not u.estimated and u.output_tokens > 1:
            m.time_per_output_token.observe((last - first) / (u.output_tokens - 1), *labels, answered)

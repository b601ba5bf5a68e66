"""The sidecar's Prometheus metrics: its own counters, and the OpenTelemetry GenAI metrics.

`prometheus_client` keeps the registry and writes the exposition format; the values themselves are
kept here in plain dicts and lists, read by a custom collector at scrape time. Measured
(benchmarks/micro.py): prometheus_client's own Counter and Histogram take a lock per call and a
histogram increments every bucket at or above a value, which made the metrics of one translated
stream about five times dearer than these; the event loop is single-threaded, so no lock is needed.

The GenAI metrics follow the OpenTelemetry semantic conventions (gen-ai-metrics.md), spelled as the
OTel-to-Prometheus rules ask: dots become underscores, unit `s` becomes the suffix `_seconds`, and an
annotation unit such as `{token}` adds no suffix. Their buckets are the conventions' advice.

Label values come from the config or from small fixed sets, never from what a client sent: a model
is labelled with the configured name or pattern it matched (`Classifier.label_for`). The one value an
upstream names, the response model (`gen_ai_response_model`, the last label of each GenAI histogram),
is bounded too (`ResponseModels`).
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from extproc.routing.failover import Attempt, Health

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what every Prometheus version scrapes
PHASE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
# The semantic conventions' ExplicitBucketBoundaries advice, metric by metric.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
KINDS = ("request_headers", "request_body", "request_trailers", "response_headers", "response_body",
         "response_trailers")
GENAI = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")
RESPONSE_MODEL = "gen_ai_response_model"  # each GenAI histogram's last label: the model the answer named
RESPONSE_MODELS_KEPT = 64  # distinct response models exported as they are; later new ones are `other`
BACKEND_STATES = ("healthy", "ejected", "held_off")  # routing.failover's STATES (not imported: no cycle)


@dataclass
class Counter:
    name: str  # without the `_total` the exposition adds
    help: str
    labels: tuple[str, ...]
    values: defaultdict[tuple[str, ...], float] = field(default_factory=lambda: defaultdict(float))

    def inc(self, *label_values: str, by: float = 1) -> None:
        self.values[label_values] += by

    def family(self) -> Metric:
        out = CounterMetricFamily(self.name, self.help, labels=self.labels)
        for lv, v in sorted(self.values.items()):
            out.add_metric(lv, v)
        return out


@dataclass(slots=True)
class Series:
    """One label set of a histogram: a count per bucket (not cumulative; summed at scrape) and the sum."""

    buckets: tuple[float, ...]
    counts: list[int]
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value


@dataclass
class Histogram:
    name: str
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...]
    series: dict[tuple[str, ...], Series] = field(default_factory=dict)

    def child(self, *label_values: str) -> Series:
        found = self.series.get(label_values)
        if found is None:
            found = self.series[label_values] = Series(self.buckets, [0] * (len(self.buckets) + 1))
        return found

    def observe(self, value: float, *label_values: str) -> None:
        self.child(*label_values).observe(value)

    def family(self) -> Metric:
        """The exposition; a series observed without its trailing labels has them empty, which Prometheus
        reads as absent (the access-log service's entries name no response model)."""
        out = HistogramMetricFamily(self.name, self.help, labels=self.labels)
        bounds = [floatToGoString(b) for b in self.buckets] + ["+Inf"]
        pad = len(self.labels)
        for lv, s in sorted(self.series.items()):
            lv = lv + ("",) * (pad - len(lv))
            running, cumulative = 0, []
            for bound, n in zip(bounds, s.counts, strict=True):
                running += n
                cumulative.append((bound, running))
            out.add_metric(lv, cumulative, s.total)
        return out


@dataclass
class ResponseModels:
    """The response model label: the model an upstream's answer named, as it is for the first
    `RESPONSE_MODELS_KEPT` distinct ones, `other` after them (an upstream that names whatever it was
    asked would otherwise let clients grow the series), and nothing over 256 bytes or with control
    characters, which no real model name has."""

    kept: set[str] = field(default_factory=set)

    def label(self, model: str) -> str:
        if model in self.kept:
            return model
        if len(self.kept) >= RESPONSE_MODELS_KEPT or len(model.encode()) > 256 or not model.isprintable():
            return "other"
        self.kept.add(model)
        return model


class Metrics(Collector):
    def __init__(self) -> None:
        self.requests = Counter("extproc_requests", "Requests by API pair, backend, model and outcome",
                                ("client_api", "upstream_api", "backend", "model", "outcome"))
        self.translations = Counter("extproc_translations", "Translated requests by direction and streaming",
                                    ("direction", "stream"))
        self.phase_seconds = Histogram("extproc_phase_seconds", "Sidecar time per Envoy message", ("phase",),
                                       PHASE_BUCKETS)
        self.stream_chunks = Counter("extproc_stream_chunks", "Response body chunks the sidecar handled", ("kind",))
        self.pins = Counter("extproc_pin_decisions", "previous_response_id and /v1/responses/{id} routing: "
                            "pin_hit, pin_fallback, pin_gone, turn_hit, turn_miss, ...", ("decision",))
        self.learned = Counter("extproc_learned_modes", "Model APIs learned from upstream answers", ("backend", "fact"))
        self.store_errors = Counter("extproc_state_store_errors", "State store calls that failed", ("op",))
        self.background_runs = Counter("extproc_background_runs", "Background responses run for chat-only "
                                       "backends, by outcome: completed, incomplete, failed, cancelled, unrecorded, "
                                       "lost (its replica died; recorded by a poll)",
                                       ("outcome",))
        self.tokens = Counter("extproc_tokens", "Token usage by model, backend and kind; estimated when the "
                              "upstream reported none", ("model", "backend", "kind", "estimated"))
        self.token_usage = Histogram("gen_ai_client_token_usage", "Number of input and output tokens used, as the "
                                     "upstream reported them ({token})",
                                     (*GENAI, "gen_ai_token_type", RESPONSE_MODEL), TOKEN_BUCKETS)
        self.request_duration = Histogram("gen_ai_server_request_duration_seconds", "Time from the request's "
                                          "headers to the last byte of the answer, where the sidecar saw it",
                                          (*GENAI, "error_type", RESPONSE_MODEL), DURATION_BUCKETS)
        self.time_to_first_token = Histogram("gen_ai_server_time_to_first_token_seconds", "Time from the request's "
                                             "headers to the first chunk of a streamed answer",
                                             (*GENAI, RESPONSE_MODEL), TTFT_BUCKETS)
        self.time_per_output_token = Histogram("gen_ai_server_time_per_output_token_seconds", "Time per output token "
                                               "after the first chunk of a streamed answer",
                                               (*GENAI, RESPONSE_MODEL), TPOT_BUCKETS)
        self.response_models = ResponseModels()
        # Per tenant of the `clients` section (its names only): answers, tokens, and requests refused by a limit.
        self.tenant_requests = Counter("extproc_tenant_requests", "Answered requests by listed tenant", ("tenant",))
        self.tenant_tokens = Counter("extproc_tenant_tokens", "Token usage by listed tenant and kind (input, output)",
                                     ("tenant", "kind"))
        self.rate_limited = Counter("extproc_rate_limited", "Requests refused with a 429 by tenant and the limit "
                                    "that refused (requests, tokens, budget)", ("tenant", "limit"))
        # Model groups (routing.failover): every upstream attempt by backend and outcome (ok, rejected,
        # rate_limited, failed, connect_failure, reset, timeout), and each backend's state at scrape time.
        self.upstream_attempts = Counter("extproc_upstream_attempts", "Upstream attempts by backend and outcome",
                                         ("backend", "outcome"))
        self.backend_states: Callable[[], Mapping[str, str]] = dict  # set by the running sidecar
        self.all: tuple[Counter | Histogram, ...] = (
            self.requests, self.translations, self.phase_seconds, self.stream_chunks, self.pins, self.learned,
            self.store_errors, self.background_runs, self.tokens, self.token_usage, self.request_duration,
            self.time_to_first_token, self.time_per_output_token, self.tenant_requests, self.tenant_tokens,
            self.rate_limited, self.upstream_attempts)
        self._phases = {kind: self.phase_seconds.child(kind) for kind in KINDS}
        self.registry = CollectorRegistry(auto_describe=False)  # the sidecar's numbers only
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        for m in self.all:
            yield m.family()
        states = GaugeMetricFamily("extproc_backend_state", "Each backend's state in its model groups: 1 for the "
                                   "state it is in (healthy, ejected, held_off), 0 for the others",
                                   labels=("backend", "state"))
        for backend, now in sorted(self.backend_states().items()):
            for state in BACKEND_STATES:
                states.add_metric((backend, state), float(state == now))
        yield states

    def record_attempt(self, attempt: Attempt, health: Health, now: float) -> None:
        """After each upstream attempt of a request (served or failed over): count it, and tell the health
        of its backend (`now`: time.monotonic seconds, the clock Health reads)."""
        self.upstream_attempts.inc(attempt.backend, attempt.outcome)
        health.record(attempt.backend, attempt.ok, now, attempt.retry_after, attempt.status)

    def timer(self) -> ExchangeTimer:
        return ExchangeTimer(self._phases)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(slots=True)
class ExchangeTimer:
    """When the sidecar handled each message of one exchange (time.perf_counter seconds): the phase
    histogram per message, and what the GenAI time metrics need (the exchange's start, and when the
    first and the last response body chunk went back to Envoy)."""

    phases: dict[str, Series]
    started: float = field(default_factory=time.perf_counter)
    busy: float = 0.0
    ended: float = 0.0
    first_chunk: float | None = None
    last_chunk: float | None = None

    def message(self, kind: str, began: float, done: float) -> None:
        self.phases[kind].observe(done - began)
        self.busy += done - began
        self.ended = done
        if kind == "response_body":
            if self.first_chunk is None:
                self.first_chunk = done
            self.last_chunk = done

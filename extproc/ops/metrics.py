"""Counters and histograms in the Prometheus text format, kept small for the hot path (sans-IO).

One `Metrics` per process. Label values are stored as tuples; nothing is formatted until scraped.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field

PHASE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


@dataclass
class Counter:
    name: str
    help: str
    labels: tuple[str, ...]
    values: defaultdict[tuple[str, ...], float] = field(default_factory=lambda: defaultdict(float))

    def inc(self, *label_values: str, by: float = 1) -> None:
        self.values[label_values] += by

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        out += [f"{self.name}{_labels(self.labels, lv)} {_num(v)}" for lv, v in sorted(self.values.items())]
        return out


@dataclass
class Histogram:
    name: str
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = PHASE_BUCKETS
    counts: dict[tuple[str, ...], list[int]] = field(default_factory=dict)
    sums: defaultdict[tuple[str, ...], float] = field(default_factory=lambda: defaultdict(float))

    def observe(self, value: float, *label_values: str) -> None:
        counts = self.counts.get(label_values)
        if counts is None:
            counts = self.counts[label_values] = [0] * (len(self.buckets) + 1)
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sums[label_values] += value

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for lv, counts in sorted(self.counts.items()):
            running = 0
            for bound, n in zip((*self.buckets, float("inf")), counts, strict=True):
                running += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append(f"{self.name}_bucket{_labels((*self.labels, 'le'), (*lv, le))} {running}")
            out.append(f"{self.name}_sum{_labels(self.labels, lv)} {self.sums[lv]!r}")
            out.append(f"{self.name}_count{_labels(self.labels, lv)} {running}")
        return out


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)) + "}"


def _num(v: float) -> str:
    return str(int(v)) if v == int(v) else repr(v)


class Metrics:
    def __init__(self) -> None:
        req = ("client_api", "upstream_api", "backend", "model", "outcome")
        self.requests = Counter("extproc_requests_total", "Requests by API pair, backend, model and outcome", req)
        self.translations = Counter("extproc_translations_total", "Translated requests by direction and streaming",
                                    ("direction", "stream"))
        self.phase_seconds = Histogram("extproc_phase_seconds", "Sidecar time per Envoy message", ("phase",))
        self.stream_chunks = Counter("extproc_stream_chunks_total", "Response body chunks the sidecar handled",
                                     ("kind",))
        self.pins = Counter("extproc_pin_decisions_total",
                            "previous_response_id and /v1/responses/{id} routing: hit, fallback, gone, turn_hit, "
                            "turn_miss", ("decision",))
        self.learned = Counter("extproc_learned_modes_total", "Model APIs learned from upstream answers",
                               ("backend", "fact"))
        self.store_errors = Counter("extproc_state_store_errors_total", "State store calls that failed", ("op",))
        self.tokens = Counter("extproc_tokens_total", "Token usage by model, backend and kind; estimated when the "
                              "upstream reported none", ("model", "backend", "kind", "estimated"))
        self.all = (self.requests, self.translations, self.phase_seconds, self.stream_chunks, self.pins,
                    self.learned, self.store_errors, self.tokens)

    def render(self) -> bytes:
        lines: list[str] = []
        for m in self.all:
            lines += m.render()
        return ("\n".join(lines) + "\n").encode()

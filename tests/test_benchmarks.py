"""The benchmarks' smoke check (CI runs no benchmark, only this): each floor of benchmarks/floor_processor.py
answers through the real Envoy with its pattern's messages, and the sidecar asks Envoy for the same
messages as the floor run.py compares each of its processor rows with (benchmarks/common.PATTERN_OF).

Message counts are Envoy's own (its ext_proc filter's `stream_msgs_sent` statistic), for one request
whose answer is a small JSON body (one body message)."""

from __future__ import annotations

import importlib
import json
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.local.stack import Stack

from .upstreams import ChatServer, Reply, ResponsesServer

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
common = importlib.import_module("common")
floor_processor = importlib.import_module("floor_processor")

# Envoy's messages to the processor for each pattern, counted by hand: request headers and body,
# then response headers, then the body: buffered, one message; streamed, one per piece Envoy reads,
# at least one (a small JSON answer is one, or two when its end is read apart). A processor that closes
# its stream at the request body may still be sent the response headers, when the answer is faster
# than the stream's close reaches Envoy (unanswered: the processor is gone). FULL_DUPLEX_STREAMED
# (duplex_body) is sent what STREAMED is, without waiting for the answers.
MESSAGES = {"request": (2, 3), "response_headers": (3, 3), "buffered_body": (4, 4), "streamed_body": (4, None),
            "duplex_body": (4, None)}


def matches(n: int, pattern: str, pieces: bool = False) -> bool:
    """`n` messages are `pattern`'s; `pieces`: the answer came in several (a stream)."""
    low, high = MESSAGES[pattern]
    if pieces and high is None:
        low += 1
    return low <= n <= (high if high is not None else n)


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
# Each exchange kind of PATTERN_OF: which sidecar (usage accounting), path and body make one.
KINDS = {
    "pass-through, usage counted": ("all", "/v1/chat/completions", CHAT),
    "pass-through, usage_accounting: translated": ("translated", "/v1/chat/completions", CHAT),
    "Responses pass-through, stored": ("all", "/v1/responses", {"model": "r", "input": "hi"}),
    "translated": ("all", "/v1/responses", {"model": "m", "input": "hi"}),
    "translated stream": ("all", "/v1/responses", {"model": "m", "input": "hi", "stream": True}),
}
STREAMS = {"translated stream"}  # answered in several pieces
SLOW = Reply(text="a stream in several pieces", delay=0.005)  # 20 deltas, 5 ms apart: Envoy reads them apart


def post(port: int, path: str, body: dict) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, r.read()


def counted(target: common.Processed, path: str, body: dict) -> tuple[int, bytes, int]:
    """(status, body, Envoy's messages to the processor) of one request through `target`."""
    before = common.envoy_counters(target.admin)["messages"]
    status, out = post(target.port, path, body)
    return status, out, common.envoy_counters(target.admin)["messages"] - before


@pytest.fixture(scope="module")
def bench() -> Iterator[tuple[Stack, ChatServer, ResponsesServer, dict[str, common.Processed]]]:
    chat, resp = ChatServer(), ResponsesServer()
    stack = Stack()
    backends = f"""
- {{name: chat, api: chat, models: ["m"], endpoints: ["{chat.address}"]}}
- {{name: responses, api: responses, models: ["r"], endpoints: ["{resp.address}"]}}
"""
    try:
        sidecars = {mode: common.start_gateway(stack, backends, extra=f"fast_path: false\nusage_accounting: {mode}")
                    for mode in ("all", "translated")}
        yield stack, chat, resp, sidecars
    finally:
        stack.stop()
        chat.close()
        resp.close()


@pytest.mark.parametrize("pattern", floor_processor.PATTERNS)
def test_floor_answers_with_its_pattern(bench, pattern):
    stack, chat, _, _ = bench
    floor = common.start_floor(stack, pattern, chat.address)
    status, out, n = counted(floor, "/v1/chat/completions", CHAT)
    assert status == 200 and json.loads(out)["object"] == "chat.completion"
    assert matches(n, pattern)
    chat.script.append(SLOW)
    status, out, n = counted(floor, "/v1/chat/completions", {**CHAT, "stream": True})
    assert status == 200 and out.rstrip().endswith(b"data: [DONE]")
    assert matches(n, pattern, pieces=True)


@pytest.mark.parametrize("kind", list(KINDS))
def test_sidecar_asks_for_its_floors_messages(bench, kind):
    _, chat, _, sidecars = bench
    accounting, path, body = KINDS[kind]
    if kind in STREAMS:
        chat.script.append(SLOW)
    status, out, n = counted(sidecars[accounting], path, body)
    assert status == 200, out
    if kind in STREAMS:
        assert b"event: response.completed" in out
    assert matches(n, common.PATTERN_OF[kind], pieces=kind in STREAMS), n


def test_every_kind_of_the_table_is_checked():
    assert set(KINDS) == set(common.PATTERN_OF)
    assert set(common.PATTERN_OF.values()) <= set(MESSAGES) == set(floor_processor.PATTERNS)


def test_run_py_imports():
    """run.py is never run by CI: at least what it is made of must still exist."""
    run = importlib.import_module("run")
    assert callable(run.main)


def test_failover_py_measures_each_kind_of_each_variant():
    """benchmarks/failover.py, a tiny run: every request of each kind answered 200 (`post` asserts it),
    with two variants (this checkout twice) each measured against its own baseline."""
    failover = importlib.import_module("failover")
    repo = BENCHMARKS.parent
    results = failover.main(["--n", "2", "--rounds", "1", "--variant", f"a={repo}", "--variant", f"b={repo}"])
    assert set(results) == {(v, k) for v in ("a", "b") for k in failover.KINDS}
    assert all(med > 0 for med, _, _ in results.values())

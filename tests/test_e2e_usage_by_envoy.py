"""End to end: on the processor path (`fast_path: false`), an answer passed through and read for nothing
but its usage is counted by Envoy, as on the fast path: the processor lets go of it at the request
body (two ext_proc messages) and marks the request, and Envoy's access-log service counts its status
and tokens. A stored Responses answer is still read until its id is pinned, before the client sees
it, and its usage is counted once. A keyed backend's answers, which the processor reads whole anyway,
are counted by the processor (tests/test_e2e_ops.py)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from extproc.local.stack import Stack, free_port, wait_until

from .conftest import metric, running
from .upstreams import ChatServer, Reply, ResponsesServer

CONFIG = """
listen: 127.0.0.1:{extproc}
admin_listen: 127.0.0.1:{admin}
fast_path: false
backends:
  - name: chat
    api: chat
    models: ["llama-*"]
    endpoints: ["{chat}"]
  - name: resp
    api: responses
    models: ["resp-*"]
    endpoints: ["{resp_a}", "{resp_b}"]
"""
# The test upstreams report 11 input / 7 output / 3 cached / 2 reasoning tokens per chat answer, and
# the same per Responses answer.
KINDS = ("input", "output", "cached", "reasoning")


@dataclass
class Site:
    url: str
    admin: str
    envoy_admin: str
    stack: Stack
    envoy_log: str
    chat: ChatServer
    resp: tuple[ResponsesServer, ResponsesServer]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="k", max_retries=0, timeout=30)

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.admin, name, **labels)

    def tokens(self, model: str) -> dict[str, float]:
        return {k: self.metric("extproc_tokens_total", model=model, kind=k) for k in KINDS}

    def messages(self) -> int:
        """Envoy's ext_proc messages to the processor so far (its `stream_msgs_sent` statistic)."""
        with urllib.request.urlopen(f"{self.envoy_admin}/stats?filter=ext_proc.stream_msgs_sent$&format=json",
                                    timeout=5) as r:
            return sum(int(s["value"]) for s in json.loads(r.read())["stats"])


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    chat, resp_a, resp_b = ChatServer(), ResponsesServer(), ResponsesServer()
    extproc, admin, port, envoy_admin = free_port(), free_port(), free_port(), free_port()
    cfg = Path(tmp_path_factory.mktemp("usage")) / "config.yaml"
    cfg.write_text(CONFIG.format(extproc=extproc, admin=admin, chat=chat.address, resp_a=resp_a.address,
                                 resp_b=resp_b.address))
    with running(cfg, extproc, port, servers=(chat, resp_a, resp_b), ready=(admin,), envoy_admin=envoy_admin) as stack:
        yield Site(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", f"http://127.0.0.1:{envoy_admin}", stack,
                   f"envoy-{port}", chat, (resp_a, resp_b))


def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Envoy's access-log entries reach the sidecar in batches, after the answer (0.2 s flush)."""
    if not wait_until(check, timeout):
        raise AssertionError(f"not within {timeout}s: {what}")


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before}


def test_a_pass_through_read_only_for_its_usage_is_counted_by_envoy(site):
    client = site.client()
    tokens, ok = site.tokens("llama-*"), site.metric("extproc_requests_total", model="llama-*", outcome="ok")
    messages = site.messages()
    assert client.chat.completions.create(model="llama-3", messages=[{"role": "user", "content": "hi"}]) \
        .choices[0].message.content == "echo: hi"
    stream = client.chat.completions.create(model="llama-3", messages=[{"role": "user", "content": "yo"}], stream=True,
                                            stream_options={"include_usage": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "echo: yo"
    # Request headers and body each; Envoy may still send the response headers of an answer that
    # outran the processor's close of its stream (unanswered).
    assert 4 <= site.messages() - messages <= 6
    eventually(lambda: delta(tokens, site.tokens("llama-*")) == {"input": 22, "output": 14, "cached": 6, "reasoning": 4},
               "usage of two answers counted, once each")
    eventually(lambda: site.metric("extproc_requests_total", model="llama-*", outcome="ok") - ok == 2,
               "two requests counted")
    assert site.metric("extproc_requests_total", model="llama-*", client_api="chat", upstream_api="chat", backend="chat",
                       outcome="ok") - ok == 2
    # Envoy's own access-log line shows the usage it read, as the processor's metadata would
    lines = [json.loads(line) for line in site.stack.log(site.envoy_log).splitlines() if line.startswith("{")]
    last = [r for r in lines if r["model"] == "llama-3"][-1]
    assert {k: last[k] for k in ("client_api", "backend", "input_tokens", "output_tokens", "status")} == {
        "client_api": "chat", "backend": "chat", "input_tokens": 11, "output_tokens": 7, "status": 200}


def test_an_upstream_error_passed_through_is_counted_by_envoy_with_its_status(site):
    before = site.metric("extproc_requests_total", model="llama-*", outcome="upstream_4xx")
    site.chat.script.append(Reply(error=(429, {"error": {"message": "slow down", "type": "rate_limit"}})))
    with pytest.raises(openai.RateLimitError):
        site.client().chat.completions.create(model="llama-busy", messages=[{"role": "user", "content": "hi"}])
    eventually(lambda: site.metric("extproc_requests_total", model="llama-*", outcome="upstream_4xx") - before == 1,
               "the 429 counted")


@pytest.mark.parametrize("stream", [False, True])
def test_a_stored_response_is_pinned_before_the_client_sees_it_and_its_usage_counted_once(site, stream):
    client = site.client()
    tokens = site.tokens("resp-*")
    for i in range(4):  # each turn continued at once: its pin was written before its answer came back
        if stream:
            with client.responses.stream(model="resp-1", input=f"turn {i}") as s:
                first = s.get_final_response()
        else:
            first = client.responses.create(model="resp-1", input=f"turn {i}")
        holder = next(r for r in site.resp if first.id in r.stored)
        nxt = client.responses.create(model="resp-1", input="again", previous_response_id=first.id)
        assert nxt.output_text == "echo: again" and nxt.id in holder.stored
    eventually(lambda: delta(tokens, site.tokens("resp-*")) == {"input": 88, "output": 56, "cached": 24, "reasoning": 16},
               "usage of eight Responses answers counted, once each")

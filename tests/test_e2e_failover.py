"""Failover across a model group's members through the real Envoy with deploy/envoy.yaml (issue 27).

A group of a failing chat-only pool and a Responses-only pool: every client API, streamed and not, gets
one clean answer from the second member, translated, whatever the first did (503, 429 with retry-after,
a refused connection, a reset after its headers); a 400 is final; every member failing is one error
naming each; a model outside any group takes exactly today's path."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import openai
import pytest

from extproc.local.stack import Stack, free_port, wait_until

from .conformance import check_stream, validate_response
from .conftest import Closable, running
from .upstreams import ChatServer, Reply, ResponsesServer

if TYPE_CHECKING:
    import anthropic

CONFIG = """
listen: 127.0.0.1:{extproc_port}
admin_listen: 127.0.0.1:{admin_port}
failover: {{max_attempts: 3, eject_after: 50, attempt_timeout_seconds: {attempt_timeout}}}
backends:
  - name: pool-chat
    api: chat
    models: ["grouped", "solo-chat", "refused-last", "counted"]
    endpoints: ["{chat}"]
    api_key_env: POOL_CHAT_KEY
  - name: pool-down
    api: chat
    models: ["refused-first", "refused-last"]
    endpoints: ["127.0.0.1:{closed}"]
  - name: hold-chat
    api: chat
    models: ["held"]
    endpoints: ["{chat}"]
    api_key_env: POOL_CHAT_KEY
  - name: pool-resp
    api: responses
    models: ["grouped", "refused-first", "held", "counted"]
    endpoints: ["{resp}"]
  - name: w-chat
    api: chat
    models: ["weighted"]
    endpoints: ["{chat}"]
    api_key_env: POOL_CHAT_KEY
    weight: 1
  - name: w-resp
    api: responses
    models: ["weighted"]
    endpoints: ["{resp}"]
    weight: 3
  - name: conv-a
    api: chat
    models: ["chatty"]
    endpoints: ["{chat}"]
    api_key_env: POOL_CHAT_KEY
  - name: conv-b
    api: chat
    models: ["chatty"]
    endpoints: ["{chat2}"]
"""
POOL_KEY = "sk-pool-chat-secret"
ATTEMPT_TIMEOUT = 3  # seconds a member may stay silent: long enough for a loaded machine's real answers


@dataclass
class Group:
    url: str
    admin: str
    envoy_admin: str
    chat: ChatServer
    resp: ResponsesServer
    stack: Stack
    chat2: ChatServer | None = None  # a second chat pool: an attempt's member is named by its instance's address

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="client-key", max_retries=0, timeout=30)

    def anthropic(self) -> anthropic.Anthropic:
        import anthropic

        return anthropic.Anthropic(base_url=self.url, api_key="client-key", max_retries=0, timeout=30)


@contextlib.contextmanager
def _running_group(tmp: Path, template: str, chat: ChatServer, resp: ResponsesServer, servers: tuple[Closable, ...],
                   /, env: dict[str, str] | None = None, **render: str) -> Iterator[Group]:
    """This file's stack on the config `template` (its ports filled in, then `render`); `servers` closed at
    the end; the group's `chat` and `resp` members among them."""
    extproc_port, port, envoy_admin, admin_port = free_port(), free_port(), free_port(), free_port()
    cfg = tmp / "config.yaml"
    cfg.write_text(template.format(extproc_port=extproc_port, admin_port=admin_port, envoy=port,
                                   attempt_timeout=ATTEMPT_TIMEOUT, **render))
    with running(cfg, extproc_port, port, servers=servers, env=env, envoy_admin=envoy_admin) as stack:
        yield Group(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", f"http://127.0.0.1:{envoy_admin}",
                    chat, resp, stack)


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A port from the allocator that refuses connections while the block runs: bound and never listened
    on, so no other process on the machine can take it and answer there."""
    port = free_port()
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        yield port


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    chat, resp, chat2 = ChatServer(), ResponsesServer(), ChatServer()
    with refused_port() as closed, _running_group(
            tmp_path_factory.mktemp("failover"), CONFIG, chat, resp, (chat, resp, chat2), env={"POOL_CHAT_KEY": POOL_KEY},
            chat=chat.address, resp=resp.address, closed=str(closed), chat2=chat2.address) as g:
        g.chat2 = chat2
        yield g


@pytest.fixture
def g(group: Group) -> Group:
    group.chat.reset()
    group.resp.reset()
    if group.chat2 is not None:
        group.chat2.reset()
    return group


def _error(status: int, message: str) -> tuple[int, dict]:
    return status, {"object": "error", "message": message, "type": "ServiceUnavailable", "param": None, "code": status}


FAILURES = {
    "503": Reply(error=_error(503, "pool overloaded")),
    "429": Reply(error=_error(429, "rate limited"), headers={"retry-after": "0"}),  # 0 s: a longer hold
    # would put pool-chat behind pool-resp for the tests after this one (a held member is tried last)
}


def _ask(client: openai.OpenAI, api: str, stream: bool, model: str = "grouped", synthesised: bool = False) -> str:
    """One request in the client API `api`; the answer's text (a Response the sidecar made checked
    against the Open Responses schema: a Responses backend's own passes through as it is)."""
    if api == "chat":
        msgs = [{"role": "user", "content": "hi"}]
        if stream:
            chunks = list(client.chat.completions.create(model=model, messages=msgs, stream=True))
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return client.chat.completions.create(model=model, messages=msgs).choices[0].message.content or ""
    if stream:
        with client.responses.create(model=model, input="hi", stream=True) as s:
            events = [e.model_dump(mode="json", exclude_unset=True) for e in s]
        if synthesised:
            check_stream(events)
        return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    r = client.responses.with_raw_response.create(model=model, input="hi")
    if synthesised:
        validate_response(json.loads(r.text))
    return r.parse().output_text


def _ask_anthropic(client: anthropic.Anthropic, stream: bool) -> str:
    """One Messages request for the grouped model; the answer's text."""
    msgs: list[anthropic.types.MessageParam] = [{"role": "user", "content": "hi"}]
    if stream:
        with client.messages.stream(model="grouped", max_tokens=32, messages=msgs) as s:
            return "".join(s.text_stream)
    out = client.messages.create(model="grouped", max_tokens=32, messages=msgs)
    return "".join(b.text for b in out.content if b.type == "text")


def _once_held(g: Group, cluster: str = "group.pool-chat.pool-resp") -> threading.Event:
    """Set once the member's response headers are in Envoy's upstream filters (the hold filter's first
    message; polled, so an answer that filter lets go at once has been answered by the attempt's own
    processor by then too): the member resets after Envoy has its headers, not before Envoy read them,
    as a worker that crashes mid-answer does."""
    name = f"cluster.{cluster}.ext_proc.hold.stream_msgs_sent"
    held, before = threading.Event(), _stat(g, name)
    threading.Thread(target=lambda: wait_until(lambda: _stat(g, name) > before, timeout=20) and held.set(),
                     daemon=True).start()
    return held


def _once_read(g: Group, cluster: str) -> threading.Event:
    """Set once Envoy has read the member's first bytes (its response headers) on `cluster`: the fast
    twin's hold is in Envoy itself (a Lua filter), with no stream of its own to watch."""
    name = f"cluster.{cluster}.upstream_cx_rx_bytes_total"
    read, before = threading.Event(), _stat(g, name)
    threading.Thread(target=lambda: wait_until(lambda: _stat(g, name) > before, timeout=20) and read.set(),
                     daemon=True).start()
    return read


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("failure", [*sorted(FAILURES), "reset"])  # reset: its headers sent, then the connection dropped
def test_a_failing_chat_member_fails_over_to_the_responses_member(g, api, stream, failure):
    g.chat.script.append(Reply(reset=True, drop=_once_held(g)) if failure == "reset" else FAILURES[failure])
    g.resp.script.append(Reply(text="served by the second"))
    assert _ask(g.client(), api, stream) == "served by the second"
    assert [r["path"] for r in g.chat.requests] == ["/v1/chat/completions"]  # tried once, on its own API
    assert [r["path"] for r in g.resp.requests] == ["/v1/responses"]  # then translated for the second
    sent = g.resp.requests[0]
    given = sent["body"]["input"]  # the client's own request, or the chat request translated
    assert given == "hi" if api == "responses" else given[0]["content"] in ("hi", [{"type": "input_text", "text": "hi"}])
    headers = {k.lower(): v for k, v in sent["headers"].items()}
    # the first member got the pool's key; the second (keyless) the client's own, never the first's
    assert g.chat.requests[0]["headers"]["authorization"] == f"Bearer {POOL_KEY}"
    assert headers["authorization"] == "Bearer client-key" and "x-gateway-retry" not in headers


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_silent_member_is_given_up_on_and_the_next_serves(g, api, stream):
    """A member that takes the request and says nothing: after `attempt_timeout_seconds` Envoy resets
    that attempt and sends the request on, long before `limits.upstream_timeout_seconds` (its 504)."""
    _past_a_silent_member(g, g.chat, g.resp, api, stream)
    assert [r["path"] for r in g.chat.requests] == ["/v1/chat/completions"]
    assert [r["path"] for r in g.resp.requests] == ["/v1/responses"]


def _past_a_silent_member(g: Group, silent_member: ChatServer, next_member: ChatServer | ResponsesServer, api: str,
                          stream: bool, model: str = "grouped") -> None:
    """`silent_member` takes the request and says nothing; `next_member` answers it, once
    `attempt_timeout_seconds` have passed and well before the client's own timeout."""
    silent = threading.Event()
    silent_member.script.append(Reply(silent=silent))
    next_member.script.append(Reply(text="the silent one was skipped"))
    try:
        started = time.monotonic()
        assert _ask(g.client(), api, stream, model=model) == "the silent one was skipped"
        took = time.monotonic() - started
    finally:
        silent.set()
    assert ATTEMPT_TIMEOUT <= took < ATTEMPT_TIMEOUT + 20


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_a_stream_that_sends_only_its_headers_is_given_up_on_and_the_next_serves(g, api):
    """A stuck model server: the stream's headers, then nothing. They are held until its first event,
    so the answer has not started: Envoy's per-try timeout gives the attempt up and the next member
    serves the whole stream."""
    never = threading.Event()
    g.chat.script.append(Reply(reset=True, drop=never))
    g.resp.script.append(Reply(text="the stuck one was skipped"))
    try:
        started = time.monotonic()
        assert _ask(g.client(), api, True) == "the stuck one was skipped"
        took = time.monotonic() - started
    finally:
        never.set()
    assert ATTEMPT_TIMEOUT <= took < ATTEMPT_TIMEOUT + 20
    assert [r["path"] for r in g.chat.requests] == ["/v1/chat/completions"]
    assert [r["path"] for r in g.resp.requests] == ["/v1/responses"]


def test_a_silent_member_is_named_when_every_member_fails(g):
    silent = threading.Event()
    g.chat.script.append(Reply(silent=silent))
    g.resp.script.append(Reply(error=(500, {"error": {"message": "responses pool crashed", "type": "server_error",
                                                      "param": None, "code": None}})))
    try:
        with pytest.raises(openai.APIStatusError) as e:
            _ask(g.client(), "chat", False)
    finally:
        silent.set()
    assert e.value.status_code == 502 and e.value.body["code"] == "all_backends_failed"  # the last was a 500
    message = e.value.body["message"]
    assert "pool-chat: timed out" in message and "pool-resp: 500 responses pool crashed" in message


@pytest.mark.parametrize("api", ["chat", "responses", "messages"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_last_member_timing_out_is_a_504_in_the_callers_shape(g, api, stream):
    """Envoy tells the attempt after a timed-out one only its number: the sidecar tells a timeout from
    a reset by how long the attempt lasted, and every member failing with the last one silent is one
    504 `all_backends_timed_out` naming both, in the caller's API's error shape, streamed or not (the
    stream never started: an HTTP error, as the provider's own would be)."""
    import anthropic

    silent = threading.Event()
    g.chat.script.append(Reply(error=_error(503, "chat pool down")))
    g.resp.script.append(Reply(silent=silent))
    try:
        with pytest.raises((openai.APIStatusError, anthropic.APIStatusError)) as e:
            if api == "messages":
                _ask_anthropic(g.anthropic(), stream)
            else:
                _ask(g.client(), api, stream)
    finally:
        silent.set()
    assert e.value.status_code == 504
    body = e.value.response.json()
    if api == "messages":  # Anthropic's error shape: a 504 is its `timeout_error`
        assert body == {"type": "error", "error": {"type": "timeout_error", "message": body["error"]["message"]}}
    else:  # OpenAI's
        assert set(body) == {"error"} and body["error"]["code"] == "all_backends_timed_out"
    message = body["error"]["message"]
    assert "pool-chat: 503 chat pool down" in message and "pool-resp: timed out" in message
    assert len(g.chat.requests) == 1 and len(g.resp.requests) == 1


def test_an_anthropic_client_fails_over_too(g):
    g.chat.script.append(FAILURES["503"])
    g.resp.script.append(Reply(text="claude-shaped answer"))
    out = g.anthropic().messages.create(model="grouped", max_tokens=32, messages=[{"role": "user", "content": "hi"}])
    assert [(b.type, b.text) for b in out.content] == [("text", "claude-shaped answer")]
    assert [r["path"] for r in g.chat.requests] == ["/v1/chat/completions"]
    assert [r["path"] for r in g.resp.requests] == ["/v1/responses"]


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_connection_fails_over(g, api, stream):
    g.resp.script.append(Reply(text="the only one up"))
    assert _ask(g.client(), api, stream, model="refused-first") == "the only one up"
    assert len(g.resp.requests) == 1


def test_the_first_member_answering_is_one_attempt(g):
    g.chat.script.append(Reply(text="first member"))
    assert _ask(g.client(), "responses", False, synthesised=True) == "first member"
    assert len(g.chat.requests) == 1 and g.resp.requests == []


def test_a_conversation_a_responses_member_stored_continues_there(g):
    g.chat.script.append(FAILURES["503"])
    client = g.client()
    first = client.responses.create(model="grouped", input="remember 7")  # failed over: stored by pool-resp
    assert len(g.resp.requests) == 1
    second = client.responses.create(model="grouped", input="what number?", previous_response_id=first.id)
    assert second.output_text == "echo: what number?"
    # only the member that stored it can continue it: straight there, the first member not tried
    assert len(g.chat.requests) == 1 and g.resp.requests[-1]["body"]["previous_response_id"] == first.id


def test_a_400_is_final(g):
    g.chat.script.append(Reply(error=(400, {"object": "error", "message": "bad temperature", "type": "BadRequestError",
                                            "param": None, "code": 400})))
    with pytest.raises(openai.BadRequestError) as e:
        _ask(g.client(), "chat", False)
    assert "bad temperature" in str(e.value)
    assert g.resp.requests == []


def test_every_member_failing_is_one_error_naming_each(g):
    g.chat.script.append(Reply(error=_error(503, "chat pool down")))
    g.resp.script.append(Reply(error=(500, {"error": {"message": "responses pool crashed", "type": "server_error",
                                                      "param": None, "code": None}})))
    with pytest.raises(openai.APIStatusError) as e:
        _ask(g.client(), "chat", False)
    assert e.value.status_code == 502
    message = e.value.body["message"]
    assert "pool-chat: 503 chat pool down" in message and "pool-resp: 500 responses pool crashed" in message
    assert e.value.body["code"] == "all_backends_failed"


def test_a_refused_last_member_is_named_in_the_one_error(g):
    g.chat.script.append(Reply(error=_error(503, "chat pool down")))
    with pytest.raises(openai.APIStatusError) as e:
        _ask(g.client(), "chat", False, model="refused-last")
    assert e.value.status_code == 502
    message = e.value.body["message"]
    assert "pool-chat: 503 chat pool down" in message
    # refused: before its processor saw it (a failed connection), or after (Envoy heard of it late)
    assert "pool-down: connection failed" in message or "pool-down: no answer (connection refused or reset)" in message


def _metrics(g: Group) -> dict[str, float]:
    with urllib.request.urlopen(g.admin + "/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return {k: float(v) for k, _, v in (line.rpartition(" ") for line in lines if line and not line.startswith("#"))}


def test_each_attempt_is_counted_and_the_answering_backend_kept(g):
    before = _metrics(g)
    g.chat.script.append(FAILURES["429"])
    g.resp.script.append(Reply(text="counted"))
    # `counted` is `grouped`'s members under a model only this test asks for: another test's request
    # recorded late (its last attempt's stream closing after its client had the answer) cannot move its series
    assert _ask(g.client(), "chat", False, model="counted") == "counted"
    # each attempt is recorded once its upstream stream closes, which may be after the answer reached the
    # client
    counted = ('extproc_upstream_attempts_total{backend="pool-chat",outcome="rate_limited"}',
               'extproc_upstream_attempts_total{backend="pool-resp",outcome="ok"}')
    assert wait_until(lambda: all(_metrics(g).get(k, 0) > before.get(k, 0) for k in counted))
    after = _metrics(g)

    def delta(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert delta('extproc_upstream_attempts_total{backend="pool-chat",outcome="rate_limited"}') == 1
    assert delta('extproc_upstream_attempts_total{backend="pool-resp",outcome="ok"}') == 1
    # the request is counted once, by the member that answered, in the GenAI metrics too
    served = [k for k in after if k.startswith("extproc_requests_total{") and 'model="counted"' in k and delta(k)]
    assert len(served) == 1 and 'backend="pool-resp"' in served[0] and 'upstream_api="responses"' in served[0], served
    genai = [k for k in after if k.startswith("gen_ai_client_token_usage_count{") and 'model="counted"' in k and delta(k)]
    assert genai and all('gen_ai_provider_name="pool-resp"' in k for k in genai)


def test_a_member_held_off_by_retry_after_is_skipped_at_once(g):
    """`held` is hold-chat then pool-resp; a 429 asking for 30 s sends the next requests to pool-resp
    first (its own cluster, `group.pool-resp.hold-chat`), with no attempt on the held member at all."""
    g.chat.script.append(Reply(error=_error(429, "slow down"), headers={"retry-after": "30"}))
    assert _ask(g.client(), "chat", False, model="held") == "echo: hi"
    assert len(g.chat.requests) == 1 and len(g.resp.requests) == 1
    retries = _stat(g, "cluster.group.pool-resp.hold-chat.upstream_rq_retry")
    for api in ("chat", "responses"):
        assert _ask(g.client(), api, False, model="held") == "echo: hi"
    assert len(g.chat.requests) == 1 and len(g.resp.requests) == 3  # never tried while held
    assert _stat(g, "cluster.group.pool-resp.hold-chat.upstream_rq_total") >= 2
    assert _stat(g, "cluster.group.pool-resp.hold-chat.upstream_rq_retry") == retries  # no retry needed


def test_weights_spread_first_attempts_and_one_conversation_stays(g):
    """`weighted` is w-chat (weight 1) and w-resp (weight 3): first attempts by a hash of the placement
    key, so about three in four distinct keys go to w-resp, and one key always to the same member."""
    n = 120
    client = g.client()
    for i in range(n):
        client.chat.completions.create(model="weighted", messages=[{"role": "user", "content": "hi"}],
                                       prompt_cache_key=f"conversation-{i}")
    assert len(g.chat.requests) + len(g.resp.requests) == n  # each served at once, by one member
    share = len(g.resp.requests) / n
    assert abs(share - 0.75) < 4 * (0.75 * 0.25 / n) ** 0.5  # within 4 standard deviations of 3/4
    before = (len(g.chat.requests), len(g.resp.requests))
    for _ in range(6):
        client.chat.completions.create(model="weighted", messages=[{"role": "user", "content": "hi"}],
                                       prompt_cache_key="one-conversation")
    grown = (len(g.chat.requests) - before[0], len(g.resp.requests) - before[1])
    assert sorted(grown) == [0, 6]  # all six on the same member


def test_a_held_conversation_stays_on_the_member_that_served_its_last_turn(g):
    """`chatty` is two chat pools, conv-a then conv-b. Turn 1 fails over to conv-b; the sidecar holds the
    turns, so every member could continue them, but the next turns go to conv-b first (its prefix cache)
    although conv-a is in (one 503 ejects nobody: `eject_after` is 50 here)."""
    assert g.chat2 is not None
    g.chat.script.append(FAILURES["503"])
    client = g.client()
    turn = client.responses.create(model="chatty", input="remember 7")
    assert (len(g.chat.requests), len(g.chat2.requests)) == (1, 1)  # conv-a failed, conv-b served
    for i in range(3):
        turn = client.responses.create(model="chatty", input=f"question {i}", previous_response_id=turn.id)
        assert turn.output_text == f"echo: question {i}"
    assert (len(g.chat.requests), len(g.chat2.requests)) == (1, 4)  # each on conv-b at once, none on conv-a
    sent = [m["content"] for m in g.chat2.requests[-1]["body"]["messages"]]
    assert sent[0] == "remember 7" and sent[-1] == "question 2" and len(sent) == 7  # the whole history


def _route_names(g: Group) -> dict[str, str]:
    """Each route name's cluster (the last route's, where several share a name: `_route_clusters`)."""
    return {name: clusters[-1] for name, clusters in _route_clusters(g).items()}


def _route_clusters(g: Group) -> dict[str, list[str]]:
    with urllib.request.urlopen(g.envoy_admin + "/config_dump?resource=dynamic_route_configs", timeout=10) as r:
        dump = json.loads(r.read())
    out: dict[str, list[str]] = {}
    for r in dump["configs"][0]["route_config"]["virtual_hosts"][0]["routes"]:
        out.setdefault(r["name"], []).append(r.get("route", {}).get("cluster", ""))
    return out


def _stat(g: Group, name: str) -> int:
    with urllib.request.urlopen(g.envoy_admin + "/stats?filter=" + name, timeout=10) as r:
        for line in r.read().decode().splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
    return 0


def test_a_model_outside_any_group_takes_todays_path(g):
    routes = _route_names(g)
    assert routes["processor:group.pool-chat.pool-resp"] == "group.pool-chat.pool-resp"
    before = _stat(g, "cluster.group.pool-chat.pool-resp.upstream_rq_total")
    endpoints = _stat(g, "cluster.endpoints.upstream_rq_total")
    g.chat.script.append(Reply(text="plain"))
    assert _ask(g.client(), "responses", False, model="solo-chat", synthesised=True) == "plain"
    # no group cluster hop (so no attempt stream), and the instance named by the processor as before
    assert _stat(g, "cluster.group.pool-chat.pool-resp.upstream_rq_total") == before
    assert _stat(g, "cluster.endpoints.upstream_rq_total") == endpoints + 1
    assert "x-gateway-failover" not in {k.lower() for k in g.chat.requests[0]["headers"]}


# -- health and conversations: a stack whose members are taken out after two failures, for one second --

HEALTH_CONFIG = """
listen: 127.0.0.1:{extproc_port}
admin_listen: 127.0.0.1:{admin_port}
failover: {{eject_after: 2, eject_seconds: 1, max_eject_seconds: 1, attempt_timeout_seconds: {attempt_timeout}}}
backends:
  - name: flaky
    api: chat
    models: ["flaky-model"]
    endpoints: ["{flaky}"]
  - name: steady
    api: responses
    models: ["flaky-model"]
    endpoints: ["{steady}"]
  - name: conv-a
    api: chat
    models: ["conv-model"]
    endpoints: ["{conv_a}"]
  - name: conv-b
    api: chat
    models: ["conv-model"]
    endpoints: ["{conv_b}"]
  - name: fast-a
    api: chat
    models: ["fast-model"]
    endpoints: ["{fast_a}"]
  - name: fast-b
    api: chat
    models: ["fast-model"]
    endpoints: ["{fast_b}"]
  - name: fast-ra
    api: responses
    models: ["fast-resp"]
    endpoints: ["{fast_ra}"]
  - name: fast-rb
    api: responses
    models: ["fast-resp"]
    endpoints: ["{fast_rb}"]
  - name: spread-a
    api: chat
    models: ["spread-model"]
    endpoints: ["{fast_a}"]
    weight: 1
  - name: spread-b
    api: chat
    models: ["spread-model"]
    endpoints: ["{fast_b}"]
    weight: 3
"""


@dataclass
class Health:
    group: Group
    flaky: ChatServer
    conv_a: ChatServer
    conv_b: ChatServer
    fast_a: ChatServer
    fast_b: ChatServer
    fast_ra: ResponsesServer
    fast_rb: ResponsesServer


@pytest.fixture(scope="module")
def health(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Health]:
    flaky, steady, conv_a, conv_b = ChatServer(), ResponsesServer(), ChatServer(), ChatServer()
    fast_a, fast_b, fast_ra, fast_rb = ChatServer(), ChatServer(), ResponsesServer(), ResponsesServer()
    with _running_group(tmp_path_factory.mktemp("health"), HEALTH_CONFIG, flaky, steady,
                        (flaky, steady, conv_a, conv_b, fast_a, fast_b, fast_ra, fast_rb), flaky=flaky.address,
                        steady=steady.address, conv_a=conv_a.address, conv_b=conv_b.address, fast_a=fast_a.address,
                        fast_b=fast_b.address, fast_ra=fast_ra.address, fast_rb=fast_rb.address) as group:
        yield Health(group, flaky, conv_a, conv_b, fast_a, fast_b, fast_ra, fast_rb)


def test_a_failing_member_is_taken_out_and_comes_back_by_itself(health):
    g, flaky = health.group, health.flaky
    cluster = "cluster.group.flaky.steady.outlier_detection.ejections_active"
    flaky.script.extend([Reply(error=_error(503, "warming up")), Reply(error=_error(503, "warming up"))])
    for _ in range(2):  # each failed over to the steady member
        assert _ask(g.client(), "chat", False, model="flaky-model") == "echo: hi"
    assert len(flaky.requests) == 2
    # taken out: by Envoy (it routes the attempts) and in the sidecar's view (/metrics, /readyz)
    assert wait_until(lambda: _stat(g, cluster) == 1)
    assert _metrics(g)['extproc_backend_state{backend="flaky",state="ejected"}'] == 1
    assert _ask(g.client(), "chat", False, model="flaky-model") == "echo: hi"
    assert len(flaky.requests) == 2  # not tried while out
    # back by itself once its second is up: the next requests reach it again, and it serves them
    assert wait_until(lambda: _ask(g.client(), "chat", False, model="flaky-model") and len(flaky.requests) > 2)
    assert _stat(g, cluster) == 0
    assert _metrics(g)['extproc_backend_state{backend="flaky",state="healthy"}'] == 1


def test_a_same_api_group_fails_over_on_the_fast_path(health):
    """Chat clients on a group of chat pools need only Envoy: its compiled retries between the members."""
    g, fast_a, fast_b = health.group, health.fast_a, health.fast_b
    # streams and the rest to the one twin, the hold its only upstream filter
    assert set(_route_clusters(g)["fast:chat:group.fast-a.fast-b"]) == {"fast-group.fast-a.fast-b"}
    served = 'extproc_requests_total{backend="fast-b",client_api="chat",model="fast-model",outcome="ok",upstream_api="chat"}'
    before = _metrics(g).get(served, 0)
    fast_a.script.append(Reply(error=_error(503, "busy")))
    fast_b.script.append(Reply(text="from the second pool"))
    assert _ask(g.client(), "chat", False, model="fast-model") == "from the second pool"
    assert len(fast_a.requests) == 1 and len(fast_b.requests) == 1
    assert _stat(g, "cluster.fast-group.fast-a.fast-b.upstream_rq_retry") == 1
    # counted from Envoy's access log (so no processor saw it), under the member that answered
    assert wait_until(lambda: _metrics(g).get(served, 0) == before + 1)
    fast_a.script.append(Reply(text="first pool again"))
    assert _ask(g.client(), "chat", True, model="fast-model") == "first pool again"


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_reset_after_the_headers_fails_over_on_the_fast_path(health, api, stream):
    """Envoy's router retries no reset once an attempt's headers reached it: the fast group cluster's
    hold lets an answer's headers through only with its first body chunk (a stream's first event, a
    JSON answer's body), so a member that sends its headers and then drops the connection is retried
    on the next member by Envoy alone, and the client gets that member's whole answer."""
    g = health.group
    first, second = (health.fast_a, health.fast_b) if api == "chat" else (health.fast_ra, health.fast_rb)
    model, cluster = ("fast-model", "fast-group.fast-a.fast-b") if api == "chat" else \
        ("fast-resp", "fast-group.fast-ra.fast-rb")
    assert set(_route_clusters(g)[f"fast:{api}:{cluster[len('fast-'):]}"]) == {cluster}
    for server in (first, second):
        server.reset()
    retries, judged = _stat(g, f"cluster.{cluster}.upstream_rq_retry"), _stat(g, f"cluster.{cluster}.ext_proc.judge.streams_started")
    first.script.append(Reply(reset=True, drop=_once_read(g, cluster)))
    second.script.append(Reply(text="the whole stream from the second"))
    client = g.client()
    if not stream:
        said = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}]) \
            .choices[0].message.content if api == "chat" else \
            client.responses.create(model=model, input="hi", store=False).output_text
        assert said == "the whole stream from the second"
    elif api == "chat":
        chunks = list(client.chat.completions.create(  # (Envoy counts a stream's usage only if it is sent)
            model=model, messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            "the whole stream from the second"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    else:
        with client.responses.create(model=model, input="hi", stream=True, store=False) as s:
            events = [e.model_dump(mode="json", exclude_unset=True) for e in s]
        assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == \
            "the whole stream from the second"
        assert events[-1]["type"] == "response.completed"
    assert len(first.requests) == 1 and len(second.requests) == 1
    assert _stat(g, f"cluster.{cluster}.upstream_rq_retry") == retries + 1  # Envoy's own retry, on the fast route
    assert _stat(g, f"cluster.{cluster}.ext_proc.judge.streams_started") == judged  # a 200 is not judged
    # the next test finds the first member in: Envoy may have ejected it (`eject_after` is 2 here, and
    # one reset after the headers ejected it here: measured), for a second; it then serves again
    assert wait_until(lambda: _stat(g, f"cluster.{cluster}.outlier_detection.ejections_active") == 0)
    first.script.append(Reply(text="the first again"))
    assert _ask(client, api, False, model=model) == "the first again"


def test_weights_spread_first_attempts_on_the_fast_path_too(health):
    """spread-a (weight 1) and spread-b (weight 3), chat pools: Envoy picks the first member by weight
    (one order's cluster per request, at random; the other member is its next priority)."""
    g, fast_a, fast_b = health.group, health.fast_a, health.fast_b
    with urllib.request.urlopen(g.envoy_admin + "/config_dump?resource=dynamic_route_configs", timeout=10) as r:
        routes = json.loads(r.read())["configs"][0]["route_config"]["virtual_hosts"][0]["routes"]
    spread = [r["route"] for r in routes if r["name"] == "fast:chat:group.spread-a.spread-b"]  # one per condition
    assert spread and all({c["name"]: c["weight"] for c in r["weighted_clusters"]["clusters"]} == {
        "fast-group.spread-a.spread-b": 1, "fast-group.spread-b.spread-a": 3} for r in spread)
    n, before = 120, (len(fast_a.requests), len(fast_b.requests))
    for _ in range(n):
        assert _ask(g.client(), "chat", False, model="spread-model") == "echo: hi"
    on_a, on_b = len(fast_a.requests) - before[0], len(fast_b.requests) - before[1]
    assert on_a + on_b == n  # each served at once, by one member
    assert abs(on_b / n - 0.75) < 5 * (0.75 * 0.25 / n) ** 0.5  # Envoy's random pick: within 5 standard deviations
    assert _stat(g, "cluster.fast-group.spread-b.spread-a.upstream_rq_total") == on_b  # never the processor's


@pytest.mark.parametrize("stream", [False, True])
def test_a_silent_member_is_given_up_on_on_the_fast_path_too(health, stream):
    g, fast_a, fast_b = health.group, health.fast_a, health.fast_b
    fast_a.reset()
    fast_b.reset()
    _past_a_silent_member(g, fast_a, fast_b, "chat", stream, model="fast-model")
    assert len(fast_a.requests) == 1 and len(fast_b.requests) == 1


def test_a_conversation_survives_its_first_member_dying(health):
    g, conv_a, conv_b = health.group, health.conv_a, health.conv_b
    client, prev, said = g.client(), None, []
    for turn in range(1, 21):
        if turn == 11:
            conv_a.close()  # the first member dies: nothing listens there any more
        r = client.responses.create(model="conv-model", input=f"turn {turn}", previous_response_id=prev)
        assert r.output_text == f"echo: turn {turn}"
        said += [f"turn {turn}", f"echo: turn {turn}"]
        prev = r.id
    assert len(conv_a.requests) == 10 and len(conv_b.requests) == 10
    # the sidecar held the turns: the next member got the whole conversation so far, rebuilt
    first_on_b = [m["content"] for m in conv_b.requests[0]["body"]["messages"]]
    assert first_on_b == said[:21]
    assert [m["content"] for m in conv_b.requests[-1]["body"]["messages"]] == said[:-1]
    # turns 12 to 20 went to conv-b first, the member of the turn before: no attempt on the dead one
    assert _stat(g, "cluster.group.conv-b.conv-a.upstream_rq_total") == 9
    assert _stat(g, "cluster.group.conv-b.conv-a.upstream_rq_retry") == 0


# -- the rest of the Responses surface: background turns, token counts, compaction --------------------

SURFACE_CONFIG = """
listen: 127.0.0.1:{extproc_port}
admin_listen: 127.0.0.1:{admin_port}
websocket_gateway: http://127.0.0.1:{envoy}
failover: {{eject_after: 50}}
backends:
  - name: chat-a
    api: chat
    models: ["mixed", "chats"]
    endpoints: ["{chat_a}"]
  - name: chat-b
    api: chat
    models: ["chats"]
    endpoints: ["{chat_b}"]
  - name: resp-a
    api: responses
    models: ["mixed", "resps"]
    endpoints: ["{resp_a}"]
  - name: resp-b
    api: responses
    models: ["resps"]
    endpoints: ["{resp_b}"]
"""


@dataclass
class Surface:
    group: Group
    chat_a: ChatServer
    chat_b: ChatServer
    resp_a: ResponsesServer
    resp_b: ResponsesServer


@pytest.fixture(scope="module")
def surface(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Surface]:
    chat_a, chat_b, resp_a, resp_b = ChatServer(), ChatServer(), ResponsesServer(), ResponsesServer()
    with _running_group(tmp_path_factory.mktemp("surface"), SURFACE_CONFIG, chat_a, resp_a,
                        (chat_a, chat_b, resp_a, resp_b), chat_a=chat_a.address, chat_b=chat_b.address,
                        resp_a=resp_a.address, resp_b=resp_b.address) as group:
        yield Surface(group, chat_a, chat_b, resp_a, resp_b)


@pytest.fixture
def sf(surface: Surface) -> Surface:
    for server in (surface.chat_a, surface.chat_b, surface.resp_a, surface.resp_b):
        server.reset()
    return surface


def _posts(server: ChatServer | ResponsesServer) -> list[str]:
    return [r["path"] for r in server.requests if r.get("method") != "GET"]


def test_a_background_turn_on_a_chat_primary_is_run_by_the_sidecar_and_its_run_fails_over(sf):
    """The sidecar runs it (the primary keeps no state); the run's own request is an ordinary turn of
    the group: the failing chat member, then the Responses one."""
    sf.chat_a.script.append(Reply(error=_error(503, "pool overloaded")))
    sf.resp_a.script.append(Reply(text="researched"))
    client = sf.group.client()
    queued = client.responses.create(model="mixed", input="research this", background=True)
    assert (queued.status, queued.background) == ("queued", True)
    assert wait_until(lambda: client.responses.retrieve(queued.id).status == "completed", timeout=20)
    assert client.responses.retrieve(queued.id).output_text == "researched"
    assert _posts(sf.chat_a) == ["/v1/chat/completions"]
    (run,) = sf.resp_a.requests
    assert (run["path"], run["body"]["store"], run["body"]["stream"]) == ("/v1/responses", False, True)


def test_a_background_turn_on_a_group_of_responses_backends_fails_over_and_is_polled_where_it_is(sf):
    """Every member runs background turns itself: the turn fails over like any other, and is found on
    the member that stored it."""
    sf.resp_a.script.append(Reply(error=_error(503, "pool overloaded")))
    sf.resp_b.script.append(Reply(text="done in the background"))
    client = sf.group.client()
    created = client.responses.create(model="resps", input="research this", background=True)
    assert (created.status, created.background) == ("queued", True)  # as OpenAI: queued, then polled
    polls = 0
    while (polled := client.responses.retrieve(created.id)).status in ("queued", "in_progress"):
        polls += 1
        assert polls < 10  # the test upstream moves one step per poll
    assert polled.output_text == "done in the background"
    assert _posts(sf.resp_a) == ["/v1/responses"] and sf.resp_b.requests[0]["body"]["background"] is True
    assert [r.get("method", "POST") for r in sf.resp_b.requests] == ["POST"] + ["GET"] * (polls + 1)


def test_a_token_count_on_a_group_of_responses_backends_fails_over(sf):
    sf.resp_a.script.append(Reply(error=_error(503, "pool overloaded")))
    count = sf.group.client().responses.input_tokens.count(model="resps", input="one two three")
    assert count.input_tokens == 3
    assert _posts(sf.resp_a) == _posts(sf.resp_b) == ["/v1/responses/input_tokens"]


def test_a_compaction_on_a_group_of_chat_backends_fails_over_and_its_item_serves_any_member(sf):
    """The sidecar compacts for every member: its sealed item is opened whichever member serves the
    next turn."""
    sf.chat_a.script.append(Reply(error=_error(503, "pool overloaded")))
    sf.chat_b.script.append(Reply(text="The user likes blue."))
    client = sf.group.client()
    compacted = client.responses.compact(model="chats", input="my favourite colour is blue")
    item = compacted.output[-1].model_dump(exclude_none=True)
    assert item["type"] == "compaction"
    assert _posts(sf.chat_a) == _posts(sf.chat_b) == ["/v1/chat/completions"]
    r = client.responses.create(model="chats", input=[item, {"role": "user", "content": "so?"}])
    assert r.output_text == "echo: so?"
    sent = sf.chat_a.requests[-1]["body"]["messages"]  # the primary again, the summary in the item's place
    assert sent[-2] == {"role": "user", "content": "Summary of the earlier conversation (compacted):\n\n"
                                                   "The user likes blue."}


def test_a_compaction_on_a_mixed_group_goes_to_the_primary_alone(sf):
    """A Responses member's compaction item is its own: the primary could not read it on the next turn."""
    sf.chat_a.script.append(Reply(error=_error(503, "pool overloaded")))
    with pytest.raises(openai.APIStatusError) as e:
        sf.group.client().responses.compact(model="mixed", input="my favourite colour is blue")
    assert e.value.status_code == 503
    assert sf.resp_a.requests == []

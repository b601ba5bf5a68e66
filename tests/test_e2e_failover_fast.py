"""Failover on the fast path, through the real Envoy with deploy/envoy.yaml (issue 27): a model group of
`endpoints:` pools that speak the client's API is carried by Envoy alone (its fast cluster), judged and
recorded as the processor's attempts are.

- Every attempt is counted in `extproc_upstream_attempts_total` and told to its member's health (Envoy's
  router logs each, a refused connection included): a member failing on the fast path is `ejected` in
  `/readyz` and `extproc_backend_state`, and `healthy` again once its time is up and it serves.
- An answer is judged by its body as on the processor path: a 500 naming a context overflow is final
  (never sent to the next member), and a request failing on every member gets one error naming each
  attempt, for Chat and Responses clients, streamed and not; a success is never seen by the processor.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import openai
import pytest

from extproc.local.stack import free_port, wait_until

from .test_e2e_failover import Group, Surface, _error, _metrics, _running_group, _stat
from .upstreams import ChatServer, Reply, ResponsesServer

CONFIG = """
listen: 127.0.0.1:{extproc_port}
admin_listen: 127.0.0.1:{admin_port}
failover: {{eject_after: 2, eject_seconds: 1, max_eject_seconds: 1, attempt_timeout_seconds: {attempt_timeout}}}
backends:
  - name: chat-a
    api: chat
    models: ["fast-chat", "down-last"]
    endpoints: ["{chat_a}"]
  - name: chat-b
    api: chat
    models: ["fast-chat"]
    endpoints: ["{chat_b}"]
  - name: resp-a
    api: responses
    models: ["fast-resp"]
    endpoints: ["{resp_a}"]
  - name: resp-b
    api: responses
    models: ["fast-resp"]
    endpoints: ["{resp_b}"]
  - name: down-first                 # nothing listens there: every attempt on it is refused
    api: chat
    models: ["down-first"]
    endpoints: ["127.0.0.1:{closed}"]
  - name: down-last
    api: chat
    models: ["down-last"]
    endpoints: ["127.0.0.1:{closed}"]
  - name: chat-c                     # chat-b's instance, under another name
    api: chat
    models: ["down-first"]
    endpoints: ["{chat_b}"]
"""


@pytest.fixture(scope="module")
def fast_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Surface]:
    chat_a, chat_b, resp_a, resp_b = ChatServer(), ChatServer(), ResponsesServer(), ResponsesServer()
    with _running_group(tmp_path_factory.mktemp("fast"), CONFIG, chat_a, resp_a, (chat_a, chat_b, resp_a, resp_b),
                        chat_a=chat_a.address, chat_b=chat_b.address, resp_a=resp_a.address, resp_b=resp_b.address,
                        closed=str(free_port())) as g:
        yield Surface(g, chat_a, chat_b, resp_a, resp_b)


@pytest.fixture
def fs(fast_stack: Surface) -> Surface:
    for server in (fast_stack.chat_a, fast_stack.chat_b, fast_stack.resp_a, fast_stack.resp_b):
        server.reset()
    # each test finds every member in: Envoy's ejections (eject_after 2, for a second) over, and the
    # sidecar's view of them
    g = fast_stack.group
    assert wait_until(lambda: all(_stat(g, f"cluster.{c}.outlier_detection.ejections_active") == 0 for c in (
        "fast-group.chat-a.chat-b", "fast-group.resp-a.resp-b", "fast-group.down-first.chat-c",
        "fast-group.chat-a.down-last")), timeout=10)
    assert wait_until(lambda: _states(g).get("chat-a") == "healthy", timeout=10)
    return fast_stack


def _states(g: Group) -> dict[str, str]:
    with urllib.request.urlopen(g.admin + "/readyz", timeout=10) as r:
        return {b["name"]: b["state"] for b in json.loads(r.read())["backends"]}


def _ask(client: openai.OpenAI, api: str, stream: bool, model: str) -> str:
    """One fast-path request (a chat stream asks for its usage, a Responses turn stores nothing: both stay
    on the fast path); the answer's text."""
    if api == "chat":
        msgs = [{"role": "user", "content": "hi"}]
        if stream:
            chunks = list(client.chat.completions.create(model=model, messages=msgs, stream=True,
                                                         stream_options={"include_usage": True}))
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return client.chat.completions.create(model=model, messages=msgs).choices[0].message.content or ""
    if stream:
        with client.responses.create(model=model, input="hi", stream=True, store=False) as s:
            return "".join(e.delta for e in s if e.type == "response.output_text.delta")
    return client.responses.create(model=model, input="hi", store=False).output_text


def _members(fs: Surface, api: str) -> tuple[ChatServer | ResponsesServer, ChatServer | ResponsesServer, str, str]:
    """The first and second member of `api`'s group, their model, and their fast cluster."""
    if api == "chat":
        return fs.chat_a, fs.chat_b, "fast-chat", "fast-group.chat-a.chat-b"
    return fs.resp_a, fs.resp_b, "fast-resp", "fast-group.resp-a.resp-b"


def _counted(g: Group, before: dict[str, float], **moved: int) -> bool:
    """Whether each `backend__outcome` series of extproc_upstream_attempts_total moved by exactly its count
    (`moved`); polled: Envoy's router log reaches the sidecar batched, after the client's answer."""
    now = _metrics(g)

    def key(name: str) -> str:
        backend, outcome = name.split("__")
        return f'extproc_upstream_attempts_total{{backend="{backend.replace("_", "-")}",outcome="{outcome}"}}'

    return all(now.get(key(k), 0) - before.get(key(k), 0) == n for k, n in moved.items())


def test_a_failing_fast_path_member_is_counted_taken_out_and_comes_back(fs):
    """chat-a fails twice on the fast path (`eject_after: 2`): each attempt is counted, and the sidecar's
    health takes chat-a out as Envoy does (`/readyz`, `extproc_backend_state`); a second later it is back
    by itself, and its next success is counted too."""
    g = fs.group
    before, judged = _metrics(g), _stat(g, "cluster.fast-group.chat-a.chat-b.ext_proc.judge.streams_started")
    fs.chat_a.script.extend([Reply(error=_error(503, "warming up")), Reply(error=_error(503, "warming up"))])
    for _ in range(2):
        assert _ask(g.client(), "chat", False, "fast-chat") == "echo: hi"
    assert len(fs.chat_a.requests) == 2 and len(fs.chat_b.requests) == 2
    assert wait_until(lambda: _counted(g, before, chat_a__failed=2, chat_b__ok=2))
    assert _stat(g, "cluster.fast-group.chat-a.chat-b.ext_proc.judge.streams_started") == judged + 2  # the 503s alone
    assert _states(g)["chat-a"] == "ejected" and _states(g)["chat-b"] == "healthy"
    assert _metrics(g)['extproc_backend_state{backend="chat-a",state="ejected"}'] == 1
    # no processor saw these requests: the fast route, never the processor's group cluster
    assert _stat(g, "cluster.group.chat-a.chat-b.upstream_rq_total") == 0
    # back by itself (one second), in the sidecar's view and Envoy's; then it serves, and that is counted
    assert wait_until(lambda: _states(g)["chat-a"] == "healthy")
    assert _metrics(g)['extproc_backend_state{backend="chat-a",state="healthy"}'] == 1
    assert wait_until(lambda: _stat(g, "cluster.fast-group.chat-a.chat-b.outlier_detection.ejections_active") == 0)
    fs.chat_a.script.append(Reply(text="chat-a again"))
    before = _metrics(g)
    assert _ask(g.client(), "chat", True, "fast-chat") == "chat-a again"
    assert wait_until(lambda: _counted(g, before, chat_a__ok=1, chat_b__ok=0))


def test_a_refused_connection_on_the_fast_path_is_counted(fs):
    """No upstream filter sees a refused connection; Envoy's router log does."""
    g = fs.group
    before = _metrics(g)
    with urllib.request.urlopen(g.envoy_admin + "/config_dump?resource=dynamic_route_configs", timeout=10) as r:
        routes = json.loads(r.read())["configs"][0]["route_config"]["virtual_hosts"][0]["routes"]
    assert {r["route"]["cluster"] for r in routes if r["name"] == "fast:chat:group.down-first.chat-c"} == \
        {"fast-group.down-first.chat-c"}
    assert _ask(g.client(), "chat", False, "down-first") == "echo: hi"
    assert len(fs.chat_b.requests) == 1
    assert wait_until(lambda: _counted(g, before, down_first__connect_failure=1, chat_c__ok=1))


FINAL = {  # answers every member would repeat: given to the client as they are, whatever their status
    "context": (500, {"error": {"message": "This model's maximum context length is 8192 tokens. However, you "
                                "requested 9000 tokens.", "type": "invalid_request_error", "param": "messages",
                                "code": "context_length_exceeded"}}),
    "400": (400, {"error": {"message": "bad temperature", "type": "invalid_request_error", "param": None,
                            "code": None}}),
}


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("final", sorted(FINAL))
def test_an_error_every_member_would_repeat_is_not_failed_over_on_the_fast_path(fs, api, stream, final):
    g = fs.group
    first, second, model, _ = _members(fs, api)
    status, body = FINAL[final]
    before = _metrics(g)
    first.script.append(Reply(error=(status, body)))
    with pytest.raises(openai.APIStatusError) as e:
        _ask(g.client(), api, stream, model)
    assert e.value.status_code == status and e.value.body["message"] == body["error"]["message"]
    assert len(first.requests) == 1 and second.requests == []  # not tried: another member would say the same
    a = "chat_a" if api == "chat" else "resp_a"
    assert wait_until(lambda: _counted(g, before, **{f"{a}__rejected": 1}))
    assert _states(g)[a.replace("_", "-")] == "healthy"  # the request's fault, not the member's


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("stream", [False, True])
def test_every_member_failing_on_the_fast_path_is_one_error_naming_each(fs, api, stream):
    g = fs.group
    first, second, model, _ = _members(fs, api)
    first.script.append(Reply(error=_error(503, "first pool down")))
    second.script.append(Reply(error=(500, {"error": {"message": "second pool crashed", "type": "server_error",
                                                      "param": None, "code": None}})))
    with pytest.raises(openai.APIStatusError) as e:
        _ask(g.client(), api, stream, model)
    assert e.value.status_code == 502
    body = e.value.response.json()
    assert set(body) == {"error"} and body["error"]["code"] == "all_backends_failed"
    a, b = ("chat-a", "chat-b") if api == "chat" else ("resp-a", "resp-b")
    message = body["error"]["message"]
    assert f"{a}: 503 first pool down" in message and f"{b}: 500 second pool crashed" in message
    assert len(first.requests) == 1 and len(second.requests) == 1
    assert "x-gateway-retry" not in e.value.response.headers


@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_last_member_on_the_fast_path_is_named_in_the_one_error(fs, stream):
    """The last member got no answer: Envoy makes one more attempt, which the processor answers at once
    with the error naming each attempt (not Envoy's bare 503)."""
    g = fs.group
    # chat-a serves once first: Envoy's count of its failures in this cluster starts again (two 503s in a
    # row would eject it, and the attempt after the last would then find only the refused member)
    assert _ask(g.client(), "chat", False, "down-last") == "echo: hi"
    fs.chat_a.reset()
    before = _metrics(g)
    fs.chat_a.script.append(Reply(error=_error(503, "chat-a down")))
    with pytest.raises(openai.APIStatusError) as e:
        _ask(g.client(), "chat", stream, "down-last")
    assert e.value.status_code == 502 and e.value.body["code"] == "all_backends_failed"
    message = e.value.body["message"]
    assert "chat-a: 503 chat-a down" in message and "down-last: no answer" in message
    assert len(fs.chat_a.requests) == 1  # the extra attempt is the sidecar's answer: no upstream saw it
    # counted: the two real attempts, not the sidecar's answer
    assert wait_until(lambda: _counted(g, before, chat_a__failed=1, down_last__connect_failure=1, chat_a__rejected=0))


def test_every_member_rate_limiting_on_the_fast_path_is_a_429_with_the_soonest_retry_after(fs):
    g = fs.group
    fs.chat_a.script.append(Reply(error=_error(429, "slow down"), headers={"retry-after": "7"}))
    fs.chat_b.script.append(Reply(error=_error(429, "slow down too"), headers={"retry-after": "3"}))
    with pytest.raises(openai.RateLimitError) as e:
        _ask(g.client().with_options(max_retries=0), "chat", False, "fast-chat")
    assert e.value.body["code"] == "all_backends_rate_limited"
    assert e.value.response.headers["retry-after"] == "3"


def test_a_fast_path_success_is_never_seen_by_the_processor(fs):
    """The cost of a group on the fast path when the first member answers: Envoy alone (its Lua filter
    holds a JSON answer whole), no processor stream, streamed or not, except a stream's hold until its
    first event."""
    g = fs.group
    judged = _stat(g, "cluster.fast-group.chat-a.chat-b.ext_proc.judge.streams_started")
    held = _stat(g, "cluster.fast-group.chat-a.chat-b.ext_proc.hold.streams_started")
    for _ in range(3):
        assert _ask(g.client(), "chat", False, "fast-chat") == "echo: hi"
    assert _stat(g, "cluster.fast-group.chat-a.chat-b.ext_proc.hold.streams_started") == held
    assert _ask(g.client(), "chat", True, "fast-chat") == "echo: hi"
    assert _stat(g, "cluster.fast-group.chat-a.chat-b.ext_proc.judge.streams_started") == judged
    assert _stat(g, "cluster.fast-group.chat-a.chat-b.ext_proc.hold.streams_started") == held + 1
    assert len(fs.chat_a.requests) == 4 and fs.chat_b.requests == []


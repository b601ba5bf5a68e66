"""Every member of a model group down, through the real Envoy with deploy/envoy.yaml (issue 27): one error
naming each attempt, in the caller's API shape, streamed or not, never Envoy's bare 503.

The members that get no answer are refused ports (from the allocator, bound and never listened on), a member that resets
after its headers, and members that take the request and say nothing. Envoy's last attempt then goes to
a member that is down too, so no attempt's processor is left to answer: the client's own exchange
replaces Envoy's reply with the error built from the attempts recorded."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator

import anthropic
import openai
import pytest

from .test_e2e_failover import ATTEMPT_TIMEOUT, Group, _error, _running_group, _stat, refused_port
from .upstreams import ChatServer, Reply, ResponsesServer

CONFIG = """
listen: 127.0.0.1:{extproc_port}
admin_listen: 127.0.0.1:{admin_port}
failover: {{max_attempts: 3, eject_after: 50, attempt_timeout_seconds: {attempt_timeout}}}
backends:
  - name: down-a
    api: chat
    models: ["all-down", "refused-reset", "mixed", "refused-silent", "silent-twice"]
    endpoints: ["127.0.0.1:{closed_a}"]
    api_key_env: DOWN_KEY  # keyed: no fast route, so every client API takes the processor's attempts
  - name: busy
    api: responses
    models: ["mixed", "first-answers"]
    endpoints: ["{resp}"]
  - name: crash
    api: chat
    models: ["refused-reset", "silent-twice", "first-answers"]
    endpoints: ["{chat}"]
  - name: stuck
    api: chat
    models: ["refused-silent", "silent-twice"]
    endpoints: ["{chat2}"]
  - name: down-b
    api: chat
    models: ["all-down", "mixed"]
    endpoints: ["127.0.0.1:{closed_b}"]
"""


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    chat, resp, chat2 = ChatServer(), ResponsesServer(), ChatServer()
    with refused_port() as closed_a, refused_port() as closed_b, _running_group(tmp_path_factory.mktemp("failover-down"), CONFIG, chat, resp, (chat, resp, chat2),
                        env={"DOWN_KEY": "sk-down"}, chat=chat.address, resp=resp.address, chat2=chat2.address, closed_a=str(closed_a),
                        closed_b=str(closed_b)) as g:
        g.chat2 = chat2
        yield g


@pytest.fixture
def g(group: Group) -> Group:
    for server in (group.chat, group.resp, group.chat2):
        assert server is not None
        server.reset()
    return group


def _fail(g: Group, api: str, stream: bool, model: str) -> tuple[int, dict]:
    """One request every member fails, in the client API `api`, through its official SDK; the error's
    status and JSON body (nothing of the answer started: an HTTP error, streamed or not)."""
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises((openai.APIStatusError, anthropic.APIStatusError)) as e:
        if api == "messages":
            client = anthropic.Anthropic(base_url=g.url, api_key="client-key", max_retries=0, timeout=60)
            if stream:
                with client.messages.stream(model=model, max_tokens=32, messages=msgs) as s:  # type: ignore[arg-type]
                    list(s.text_stream)
            else:
                client.messages.create(model=model, max_tokens=32, messages=msgs)  # type: ignore[arg-type]
        elif api == "chat":
            list(g.client().chat.completions.create(model=model, messages=msgs, stream=True)) if stream else \
                g.client().chat.completions.create(model=model, messages=msgs)  # type: ignore[arg-type]
        elif stream:
            with g.client().responses.create(model=model, input="hi", stream=True) as s:
                list(s)
        else:
            g.client().responses.create(model=model, input="hi")
    assert "x-gateway-answered" not in e.value.response.headers  # the attempts' mark stays inside
    return e.value.status_code, e.value.response.json()


def _message(api: str, status: int, body: dict, code: str) -> str:
    """The error's message, once its shape is checked: Anthropic's for Messages clients, OpenAI's else."""
    if api == "messages":
        kind = {502: "api_error", 504: "timeout_error"}[status]
        assert body == {"type": "error", "error": {"type": kind, "message": body["error"]["message"]}}
    else:
        assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["type"]
    return str(body["error"]["message"])


def _refused(member: str, message: str) -> bool:
    """Whether `message` names `member` refused: as a failed connection when its processor never saw
    the attempt, or as no answer when Envoy heard of the refusal only after the attempt's headers had
    reached it."""
    return f"{member}: connection failed" in message or f"{member}: no answer (connection refused or reset)" in message


APIS = ["chat", "responses", "messages"]


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("stream", [False, True])
def test_every_member_refused_is_one_error_naming_each(g, api, stream):
    status, body = _fail(g, api, stream, "all-down")
    message = _message(api, status, body, "all_backends_failed")
    assert status == 502
    assert message.startswith("every backend of model 'all-down' failed (2 attempts): ")
    assert "down-a: no answer" in message and _refused("down-b", message)
    assert "upstream connect error" not in message


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_member_then_one_that_resets_is_one_error_naming_both(g, api, stream):
    g.chat.script.append(Reply(reset=True))
    status, body = _fail(g, api, stream, "refused-reset")
    message = _message(api, status, body, "all_backends_failed")
    assert status == 502
    assert "down-a: no answer" in message and "crash: no answer (connection refused or reset)" in message
    assert len(g.chat.requests) == 1  # tried once: Envoy's last attempt went to down-a again


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("stream", [False, True])
def test_a_503_between_refused_members_is_named_with_them(g, api, stream):
    g.resp.script.append(Reply(error=_error(503, "busy pool overloaded")))
    status, body = _fail(g, api, stream, "mixed")
    message = _message(api, status, body, "all_backends_failed")
    assert status == 502
    assert message.startswith("every backend of model 'mixed' failed (3 attempts): ")
    assert "down-a: no answer" in message and "busy: 503 busy pool overloaded" in message
    assert _refused("down-b", message)
    assert message.index("down-a") < message.index("busy") < message.index("down-b")  # in the order tried


@pytest.mark.parametrize("api", APIS)
def test_a_silent_last_member_after_a_refused_one_is_a_504(g, api):
    silent = threading.Event()
    assert g.chat2 is not None
    g.chat2.script.append(Reply(silent=silent))
    try:
        started = time.monotonic()
        status, body = _fail(g, api, False, "refused-silent")
        took = time.monotonic() - started
    finally:
        silent.set()
    message = _message(api, status, body, "all_backends_timed_out")
    assert status == 504 and ATTEMPT_TIMEOUT <= took < ATTEMPT_TIMEOUT + 20
    assert "down-a: no answer" in message and "stuck: timed out" in message


def test_two_silent_members_in_a_row_are_both_named_timed_out(g):
    """down-a refused, then crash and stuck each take the request and say nothing: both are given up on
    by Envoy's per-try timeout, and both are named so (the second's start is recorded by that attempt)."""
    silent = threading.Event()
    assert g.chat2 is not None
    g.chat.script.append(Reply(silent=silent))
    g.chat2.script.append(Reply(silent=silent))
    try:
        started = time.monotonic()
        status, body = _fail(g, "chat", False, "silent-twice")
        took = time.monotonic() - started
    finally:
        silent.set()
    message = _message("chat", status, body, "all_backends_timed_out")
    assert status == 504 and 2 * ATTEMPT_TIMEOUT <= took < 2 * ATTEMPT_TIMEOUT + 20
    assert "down-a: no answer" in message and "crash: timed out" in message and "stuck: timed out" in message


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("stream", [False, True])
def test_the_first_member_answering_is_untouched(g, api, stream):
    """The answer goes as it came, and costs the client-side processor no message more than the hand-over
    did before: the attempt that answers ends that stream first, so Envoy sends it no answer's headers."""
    g.resp.script.append(Reply(text="busy served it"))
    sent = _stat(g, "http.llm.ext_proc.stream_msgs_sent")
    msgs = [{"role": "user", "content": "hi"}]
    client = g.client()
    if api == "chat" and stream:
        chunks = list(client.chat.completions.create(model="first-answers", messages=msgs, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    elif api == "chat":
        raw = client.chat.completions.with_raw_response.create(model="first-answers", messages=msgs)
        assert "x-gateway-answered" not in raw.headers  # the attempt's mark stays inside
        text = raw.parse().choices[0].message.content
    elif stream:
        with client.responses.create(model="first-answers", input="hi", stream=True) as s:
            text = "".join(e.delta for e in s if e.type == "response.output_text.delta")
    else:
        text = client.responses.create(model="first-answers", input="hi").output_text
    assert text == "busy served it" and g.chat.requests == []
    assert _stat(g, "http.llm.ext_proc.stream_msgs_sent") - sent == 2  # the request's headers and body


def test_envoy_takes_as_many_failovers_at_once_as_requests(g):
    """Each group cluster as Envoy loaded it allows 1024 retries at once (its requests' limit), not
    Envoy's default of 3: a burst of requests failing on a member that went down all fail over."""
    with urllib.request.urlopen(g.envoy_admin + "/clusters", timeout=10) as r:
        lines = r.read().decode().splitlines()
    limits = {line.split("::")[0]: line.rsplit("::", 1)[1] for line in lines
              if line.startswith(("group.", "fast-group.")) and "::default_priority::max_retries::" in line}
    assert "group.down-a.busy.down-b" in limits  # the model `mixed`'s processor-path cluster
    assert set(limits.values()) == {"1024"}, limits

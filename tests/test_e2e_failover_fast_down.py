"""Every member of a fast-path model group down, through the real Envoy with deploy/envoy.yaml (issue 27):
one error naming each member, for Chat and Responses clients, streamed and not, never Envoy's bare 503.

On the fast path no processor watches the request from the client's side, so Envoy must reach the
sidecar itself: the group's fast cluster ends on an Envoy-internal listener (the sentinel) that always
takes the connection, so the attempt after the last member (which would otherwise start over on the
first, refused, member) reaches the last-word filter, which answers at the request's headers. The
members that get no answer are refused ports (bound and never listened on), a member that resets after
its headers and one that takes the request and says nothing. Envoy's outlier detection takes refused
members out after two failures here: a request arriving while every member is out reaches the sentinel
at once and is answered with the same error, however many requests in a row."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest

from extproc.local.stack import wait_until

from .test_e2e_failover import Group, _error, _metrics, _running_group, _stat, refused_port
from .test_e2e_failover_fast import _ask, _counted
from .upstreams import ChatServer, Reply, ResponsesServer

CONFIG = """
listen: 127.0.0.1:{extproc_port}
admin_listen: 127.0.0.1:{admin_port}
failover: {{max_attempts: 3, eject_after: 2, eject_seconds: 1, max_eject_seconds: 1,
            attempt_timeout_seconds: {attempt_timeout}}}
backends:
  - name: gone-chat-a
    api: chat
    models: ["chat-down", "chat-refused-reset", "chat-refused-silent"]
    endpoints: ["127.0.0.1:{closed_a}"]
  - name: gone-chat-b
    api: chat
    models: ["chat-down"]
    endpoints: ["127.0.0.1:{closed_b}"]
  - name: crash-chat
    api: chat
    models: ["chat-refused-reset", "chat-busy-refused"]
    endpoints: ["{chat}"]
  - name: stuck-chat
    api: chat
    models: ["chat-refused-silent"]
    endpoints: ["{chat2}"]
  - name: gone-chat-c
    api: chat
    models: ["chat-busy-refused"]
    endpoints: ["127.0.0.1:{closed_c}"]
  - name: gone-resp-a
    api: responses
    models: ["resp-down", "resp-refused-reset", "resp-refused-silent"]
    endpoints: ["127.0.0.1:{closed_d}"]
  - name: gone-resp-b
    api: responses
    models: ["resp-down"]
    endpoints: ["127.0.0.1:{closed_e}"]
  - name: crash-resp
    api: responses
    models: ["resp-refused-reset"]
    endpoints: ["{resp}"]
  - name: stuck-resp
    api: responses
    models: ["resp-refused-silent"]
    endpoints: ["{resp2}"]
"""
NO_ANSWER = "no answer (connection refused, reset or timed out)"


@dataclass
class Down:
    group: Group
    servers: dict[str, ChatServer | ResponsesServer]


@pytest.fixture(scope="module")
def down_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Down]:
    servers: dict[str, ChatServer | ResponsesServer] = {
        "crash-chat": ChatServer(), "stuck-chat": ChatServer(), "crash-resp": ResponsesServer(),
        "stuck-resp": ResponsesServer()}
    chat, resp = servers["crash-chat"], servers["crash-resp"]
    assert isinstance(chat, ChatServer) and isinstance(resp, ResponsesServer)
    with refused_port() as a, refused_port() as b, refused_port() as c, refused_port() as d, refused_port() as e, \
            _running_group(tmp_path_factory.mktemp("fast-down"), CONFIG, chat, resp, tuple(servers.values()),
                           chat=chat.address, chat2=servers["stuck-chat"].address, resp=resp.address,
                           resp2=servers["stuck-resp"].address, closed_a=str(a), closed_b=str(b), closed_c=str(c),
                           closed_d=str(d), closed_e=str(e)) as g:
        yield Down(g, servers)


def _fast_clusters(g: Group) -> list[str]:
    """The fast group clusters Envoy has (its admin's /clusters)."""
    with urllib.request.urlopen(g.envoy_admin + "/clusters", timeout=10) as r:
        names = {line.partition("::")[0] for line in r.read().decode().splitlines()}
    return sorted(c for c in names if c.startswith("fast-group."))


@pytest.fixture
def d(down_stack: Down) -> Down:
    """Every server's script cleared, and every member in again in Envoy's eyes (ejections last a second)."""
    for server in down_stack.servers.values():
        server.reset()
    g = down_stack.group
    assert wait_until(lambda: all(_stat(g, f"cluster.{c}.outlier_detection.ejections_active") == 0
                                  for c in _fast_clusters(g)), timeout=10)
    return down_stack


def _fail(g: Group, api: str, stream: bool, model: str) -> tuple[int, dict]:
    """One fast-path request (`_ask`: a chat stream asks for its usage, a Responses turn stores nothing)
    that every member fails; the error's status and JSON body."""
    with pytest.raises(openai.APIStatusError) as e:
        _ask(g.client(), api, stream, model)
    assert "x-gateway-retry" not in e.value.response.headers and "x-gateway-answered" not in e.value.response.headers
    return e.value.status_code, e.value.response.json()


def _message(status: int, body: dict) -> str:
    assert status == 502 and set(body) == {"error"} and body["error"]["code"] == "all_backends_failed", body
    message = str(body["error"]["message"])
    assert "upstream connect error" not in message and "reset reason" not in message  # not Envoy's own reply
    return message


APIS = ["chat", "responses"]


def _names(api: str, *members: str) -> list[str]:
    """The members' names for the client API `api` (`{k}`: chat or resp)."""
    return [m.format(k="chat" if api == "chat" else "resp") for m in members]


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("stream", [False, True])
def test_every_member_refused_on_the_fast_path_is_one_error_naming_each(d, api, stream):
    a, b = _names(api, "gone-{k}-a", "gone-{k}-b")
    message = _message(*_fail(d.group, api, stream, "chat-down" if api == "chat" else "resp-down"))
    assert message == f"every backend of this model failed (2 attempts): {a}: {NO_ANSWER}; {b}: {NO_ANSWER}"


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_member_then_one_that_resets_on_the_fast_path_is_one_error_naming_both(d, api, stream):
    gone, crash = _names(api, "gone-{k}-a", "crash-{k}")
    d.servers[crash].script.append(Reply(reset=True))
    message = _message(*_fail(d.group, api, stream, f"{'chat' if api == 'chat' else 'resp'}-refused-reset"))
    assert message == f"every backend of this model failed (2 attempts): {gone}: {NO_ANSWER}; {crash}: {NO_ANSWER}"
    assert len(d.servers[crash].requests) == 1  # tried once: the attempt after it went to the sentinel


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_member_then_a_silent_one_on_the_fast_path_is_one_error_naming_both(d, api, stream):
    gone, stuck = _names(api, "gone-{k}-a", "stuck-{k}")
    silent = threading.Event()
    d.servers[stuck].script.append(Reply(silent=silent))
    try:  # the silent member is given up on after attempt_timeout_seconds (Envoy's per-try timeout)
        message = _message(*_fail(d.group, api, stream, f"{'chat' if api == 'chat' else 'resp'}-refused-silent"))
    finally:
        silent.set()
    assert message == f"every backend of this model failed (2 attempts): {gone}: {NO_ANSWER}; {stuck}: {NO_ANSWER}"
    assert len(d.servers[stuck].requests) == 1


def test_every_member_taken_out_by_envoy_is_still_the_one_error_however_many_requests(d):
    """Two refusals take each member out (eject_after 2) for a second, again and again: meanwhile Envoy
    has no member left to try and sends the request to the sentinel, whose answer is the same error,
    naming the members taken out as such. Envoy counts the sidecar's errors against the sentinel's hosts
    too; it never takes them all out (one more than the members', at most as many out as the members
    have), so the attempt after the last never goes back to a refused member (measured before that: four
    requests in ten were Envoy's bare 503 over such a run)."""
    g = d.group
    ejected = "cluster.fast-group.gone-chat-a.gone-chat-b.outlier_detection.ejections_active"
    seen, t0 = [], time.monotonic()
    while time.monotonic() - t0 < 4 or len(seen) < 10:  # several ejections over, and made again
        seen.append((_message(*_fail(g, "chat", False, "chat-down")), _stat(g, ejected)))
    assert all(m.startswith("every backend of this model failed (2 attempts): gone-chat-a: ") and "; gone-chat-b: " in m
               for m, _ in seen), seen
    assert any("gone-chat-a: taken out (ejected after failing); gone-chat-b: taken out" in m for m, _ in seen), seen
    assert max(out for _, out in seen) <= 2, seen  # the cluster's members have two hosts: at most two out


def test_the_attempt_after_the_last_is_not_counted_as_an_attempt_of_the_first_member(d):
    """crash-chat 503, then gone-chat-c refused: two real attempts per request, counted as such; the
    attempt after the last (the sentinel's, answered by the sidecar) is nobody's: no phantom reset of the
    first member, which would also take it out early."""
    g = d.group
    before = _metrics(g)
    for _ in range(2):  # each failure followed by a success: no member is taken out (eject_after 2)
        d.servers["crash-chat"].script.append(Reply(error=_error(503, "crash-chat busy")))
        message = _message(*_fail(g, "chat", False, "chat-busy-refused"))
        assert message == f"every backend of this model failed (2 attempts): crash-chat: 503 crash-chat busy; " \
            f"gone-chat-c: {NO_ANSWER}"
        assert _ask(g.client(), "chat", False, "chat-busy-refused") == "echo: hi"
    assert len(d.servers["crash-chat"].requests) == 4
    # the last success counted means every earlier attempt's log entry has been read (Envoy sends them in order)
    assert wait_until(lambda: _counted(g, before, crash_chat__ok=2))
    assert _counted(g, before, crash_chat__failed=2, crash_chat__reset=0, crash_chat__connect_failure=0,
                    crash_chat__rejected=0, gone_chat_c__connect_failure=2)

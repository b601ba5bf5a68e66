"""Large bodies on a processor-path request whose attempts run an upstream processor filter, through the
real Envoy with deploy/envoy.yaml.

A grouped model's attempts and a first contact on an `api: auto` backend pass through the processor as
an upstream filter, which reads the request whole (`request_body_mode: BUFFERED`); the processor on the
listener then reads the answer whole to translate it or read its usage. Each body goes to the sidecar as
one gRPC message. Envoy 1.40 crashed (SIGSEGV) once such a message was over 1 MiB: it filled the write
buffer of the connection to the sidecar (the `extproc` cluster's default 1 MiB limit), and the
high-watermark callback reached an upstream request whose upstream filter chain had no stream any more.
Every body up to `limits.max_body_bytes` (and its answer, which the test upstreams echo) must now be
served, failover included, and one over it must be the sidecar's 413 in the caller's shape; Envoy alive
after each."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest
import yaml

from extproc.local.stack import ENVOY_YAML

from .test_e2e_failover import Group, _error, _running_group
from .upstreams import ChatServer, Reply, ResponsesServer

MAX_BODY = 8 * 1024 * 1024  # the sidecar's configured maximum here (a smaller one than the default keeps
# the test quick on a loaded machine; the crash was at any size over 1 MiB)
CONFIG = """
listen: 127.0.0.1:{extproc_port}
admin_listen: 127.0.0.1:{admin_port}
failover: {{max_attempts: 3, eject_after: 50, attempt_timeout_seconds: 60}}
limits: {{max_body_bytes: {max_body}}}
backends:
  - name: g-chat
    api: chat
    models: ["grouped"]
    endpoints: ["{chat}"]
  - name: g-resp
    api: responses
    models: ["grouped"]
    endpoints: ["{resp}"]
  - name: learner
    api: auto
    models: ["learn-over-1mib", "learn-near-max"]
    endpoints: ["{learner}"]
"""

OVER_1_MIB = 1024 * 1024 + 200 * 1024
NEAR_MAX = MAX_BODY - 64 * 1024  # the content; the JSON around it stays well under the 64 KiB left


@dataclass
class Site:
    g: Group
    learner: ChatServer

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.g.url + "/v1", api_key="client-key", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    chat, resp, learner = ChatServer(), ResponsesServer(), ChatServer()
    with _running_group(tmp_path_factory.mktemp("large"), CONFIG, chat, resp, (chat, resp, learner),
                        chat=chat.address, resp=resp.address, learner=learner.address, max_body=str(MAX_BODY)) as g:
        yield Site(g, learner)


@pytest.fixture
def s(site: Site) -> Site:
    for server in (site.g.chat, site.g.resp, site.learner):
        server.reset()
    return site


def _ask(s: Site, api: str, model: str, content: str) -> str:
    c = s.client()
    if api == "chat":
        out = c.chat.completions.create(model=model, messages=[{"role": "user", "content": content}])
        return out.choices[0].message.content or ""
    return c.responses.create(model=model, input=content).output_text


def _assert_envoy_alive(s: Site) -> None:
    """Envoy's process still runs, its admin says ready, and it still answers a small request."""
    assert [p.poll() for p in s.g.stack.procs] == [None] * len(s.g.stack.procs)
    with urllib.request.urlopen(s.g.envoy_admin + "/ready", timeout=10) as f:
        assert f.status == 200 and f.read().strip() == b"LIVE"
    s.g.chat.script.append(Reply(text="still here"))
    assert _ask(s, "chat", "grouped", "small") == "still here"


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("size", [OVER_1_MIB, NEAR_MAX], ids=["over-1MiB", "near-max"])
@pytest.mark.parametrize("failover", [False, True], ids=["first-member", "failed-over"])
def test_a_large_body_on_a_grouped_model_is_served_whole(s, api, size, failover):
    """The member's answer echoes the request's text: as large an answer, read whole by the processor."""
    content = "x" * size
    if failover:
        s.g.chat.script.append(Reply(error=_error(503, "pool overloaded")))
    assert _ask(s, api, "grouped", content) == f"echo: {content}"
    assert len(s.g.chat.requests) == 1
    assert s.g.chat.requests[0]["body"]["messages"][-1]["content"] in (content, [{"type": "text", "text": content}])
    if failover:  # the whole body again, translated for the Responses member where the client spoke chat
        assert len(s.g.resp.requests) == 1 and content.encode() in s.g.resp.requests[0]["raw"]
    else:
        assert s.g.resp.requests == []
    _assert_envoy_alive(s)


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_a_body_over_the_configured_maximum_is_a_413_in_the_callers_shape(s, api):
    with pytest.raises(openai.APIStatusError) as e:
        _ask(s, api, "grouped", "x" * (MAX_BODY + 1024))
    assert e.value.status_code == 413
    err = e.value.response.json()["error"]
    assert err["code"] == "request_too_large" and str(MAX_BODY) in err["message"]
    assert s.g.chat.requests == [] and s.g.resp.requests == []
    _assert_envoy_alive(s)


@pytest.mark.parametrize(("model", "size"), [("learn-over-1mib", OVER_1_MIB), ("learn-near-max", NEAR_MAX)])
def test_a_large_first_contact_on_an_auto_backend_is_retried_whole(s, model, size):
    """A Responses client to a chat-only server of unknown API: the first attempt's 404 turns into the
    retry, translated to chat, the whole body both times."""
    content = "x" * size
    assert _ask(s, "responses", model, content) == f"echo: {content}"
    paths = [r["path"] for r in s.learner.requests]
    assert paths == ["/v1/responses", "/v1/chat/completions"]
    assert all(content.encode() in r["raw"] for r in s.learner.requests)
    _assert_envoy_alive(s)


def test_the_sidecars_connection_buffers_whatever_the_listener_does():
    """Any body Envoy buffers for the processor (up to the listener's limit) fits the write buffer of the
    connection to the sidecar, so no gRPC message to it raises that connection's high watermark."""
    resources = yaml.safe_load(ENVOY_YAML.read_text())["static_resources"]
    listener = resources["listeners"][0]["per_connection_buffer_limit_bytes"]
    sidecar = next(c for c in resources["clusters"] if c["name"] == "extproc")
    assert sidecar.get("per_connection_buffer_limit_bytes", 1024 * 1024) >= listener == 64 * 1024 * 1024

"""End to end: what Envoy itself answers (upstream unreachable, an upstream timeout, a body over its
buffer, a request it cannot read, the sidecar down, a tenant's rate limit, a refused key) reaches an
Anthropic client in Anthropic's error shape, {"type": "error", "error": {type, message}}, with the status
the anthropic SDK turns into its exception class, on the processor path (Messages translated to a chat
backend) and on the fast path (Messages to an `api: messages` backend, Envoy alone); OpenAI clients keep
the OpenAI shape, a chat client on the Messages backend too (its request goes upstream on /v1/messages).
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import openai
import pytest

from extproc.local.stack import Stack, free_port, wait_for_port, wait_until

from .test_e2e_passthrough import post_watching
from .upstreams import ChatServer, MessagesServer, Reply

CONFIG = """
listen: 127.0.0.1:{extproc}
admin_listen: 127.0.0.1:{admin}
limits: {{upstream_timeout_seconds: 1}}
backends:
  - name: chat
    api: chat
    models: ["llama-*"]
    endpoints: ["{chat}"]
  - name: claude
    api: messages
    models: ["claude-*"]
    endpoints: ["{msgs}"]
  - name: gone-chat
    api: chat
    models: ["gone-llama"]
    endpoints: ["{gone}"]
  - name: gone-claude
    api: messages
    models: ["gone-claude"]
    endpoints: ["{gone}"]
clients:
  - {{key_env: MSG_KEY, tenant: team}}
  - {{key_env: ONCE_KEY, tenant: once, requests_per_minute: 1}}
"""
KEYS = {"MSG_KEY": "sk-msg-client", "ONCE_KEY": "sk-once-a-minute"}
HI = [{"role": "user", "content": "hi"}]
TIMEOUT = "the upstream did not answer within limits.upstream_timeout_seconds"


@dataclass
class Site:
    url: str
    chat: ChatServer
    msgs: MessagesServer
    stack: Stack
    tmp: Path
    envoy_admin: str

    def processed(self) -> int:
        """ext_proc streams Envoy opened: one per request that reached the processor."""
        with urllib.request.urlopen(f"{self.envoy_admin}/stats?filter=^http.llm.ext_proc.streams_started$&format=json",
                                    timeout=5) as r:
            stats = json.loads(r.read())["stats"]
        return int(stats[0]["value"]) if stats else 0

    def anthropic(self, key: str = KEYS["MSG_KEY"]) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key=key, max_retries=0, timeout=30)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEYS["MSG_KEY"], max_retries=0, timeout=30)

    def raw(self, path: str, body: dict, key: str = KEYS["MSG_KEY"]) -> tuple[int, dict]:
        return raw(self.url, path, json.dumps(body).encode(), {"x-api-key": key, "content-type": "application/json",
                                                               "anthropic-version": "2023-06-01"})


def raw(url: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    """(status, JSON body) as Envoy sent them, read without an SDK."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", path, body=body, headers=headers)
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


def start_site(stack: Stack, tmp: Path, chat: ChatServer, msgs: MessagesServer, gone: str) -> tuple[str, str]:
    """Envoy's URL and its admin's."""
    extproc, admin, port, envoy_admin = free_port(), free_port(), free_port(), free_port()
    cfg = tmp / f"config-{port}.yaml"
    cfg.write_text(CONFIG.format(extproc=extproc, admin=admin, chat=chat.address, msgs=msgs.address, gone=gone))
    wait_for_port(extproc, proc=stack.start_sidecar(cfg, env=KEYS, name=f"sidecar-{port}"))
    stack.start_envoy(port, envoy_admin, extproc)
    return f"http://127.0.0.1:{port}", f"http://127.0.0.1:{envoy_admin}"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    chat, msgs, gone = ChatServer(), MessagesServer(), ChatServer()
    gone.close()  # a crashed instance: nothing listens on its address any more
    tmp = Path(tmp_path_factory.mktemp("msg-envoy-errors"))
    stack = Stack()
    try:
        url, envoy_admin = start_site(stack, tmp, chat, msgs, gone.address)
        yield Site(url, chat, msgs, stack, tmp, envoy_admin)
    finally:
        stack.stop()
        chat.close()
        msgs.close()


def anthropic_error(kind: str, message: str) -> dict:
    return {"type": "error", "error": {"type": kind, "message": message}}


UNREACHABLE = "upstream connect error or disconnect/reset before headers"


@pytest.mark.parametrize("model", ["gone-llama", "gone-claude"])  # translated by the sidecar; the fast path
def test_an_unreachable_upstream_is_an_overloaded_error_503(site, model):
    before = site.processed()
    with pytest.raises(anthropic.ServiceUnavailableError) as e:
        site.anthropic().messages.create(model=model, max_tokens=8, messages=HI)
    assert e.value.status_code == 503 and e.value.type == "overloaded_error"
    for stream in (False, True):
        status, body = site.raw("/v1/messages", {"model": model, "max_tokens": 8, "messages": HI, "stream": stream})
        assert status == 503 and set(body) == {"type", "error"} and body["type"] == "error", body
        assert body["error"]["type"] == "overloaded_error" and body["error"]["message"].startswith(UNREACHABLE), body
    assert site.processed() - before == (3 if model == "gone-llama" else 0)  # the fast path: Envoy's reply alone


@pytest.mark.parametrize("model", ["gone-llama", "gone-claude"])  # passed through; translated to /v1/messages
def test_openai_clients_keep_the_openai_shape_for_an_unreachable_upstream(site, model):
    with pytest.raises(openai.InternalServerError) as e:
        site.openai().chat.completions.create(model=model, messages=HI)
    assert e.value.status_code == 503
    status, body = site.raw("/v1/chat/completions", {"model": model, "messages": HI})
    assert status == 503 and set(body) == {"error"}, body
    err = body["error"]
    assert (err["type"], err["param"]) == ("gateway_error", None) and err["message"].startswith(UNREACHABLE)
    assert err["code"].startswith("upstream_reset_before_response_started")


@pytest.mark.parametrize("model", ["llama-3", "claude-3-haiku"])
def test_a_silent_upstream_is_a_timeout_error_504(site, model):
    server = site.chat if model.startswith("llama") else site.msgs
    server.script.append(Reply(stall=3))
    t0 = time.monotonic()
    with pytest.raises(anthropic.GatewayTimeoutError) as e:
        site.anthropic().messages.create(model=model, max_tokens=8, messages=HI)
    assert time.monotonic() - t0 < 2.5
    assert e.value.body == anthropic_error("timeout_error", TIMEOUT)
    server.script.append(Reply(stall=3))
    assert site.raw("/v1/messages", {"model": model, "max_tokens": 8, "messages": HI, "stream": True}) == \
        (504, anthropic_error("timeout_error", TIMEOUT))
    server.script.append(Reply(stall=3))  # and an OpenAI client, on the same backend, as it was
    status, body = site.raw("/v1/chat/completions", {"model": model, "messages": HI})
    assert (status, body) == (504, {"error": {"message": TIMEOUT, "type": "gateway_error", "param": None,
                                              "code": "upstream_timeout"}})


@pytest.mark.parametrize(("size", "message"), [
    (50 * 1024 * 1024, "request body"),  # over the sidecar's 48 MiB: its own answer
    (70 * 1024 * 1024, "Payload Too Large"),  # over Envoy's 64 MiB buffer: Envoy's
])
def test_a_body_too_large_is_request_too_large_413(site, size, message):
    body = b'{"model": "llama-3", "max_tokens": 8, "messages": [{"role": "user", "content": "' + b"x" * size + b'"}]}'
    status, raw_body = post_watching(site, "/v1/messages", body, {"x-api-key": KEYS["MSG_KEY"]})
    doc = json.loads(raw_body)
    assert status == 413 and doc["type"] == "error" and doc["error"]["type"] == "request_too_large", doc
    assert message in doc["error"]["message"], doc


def send(url: str, request: bytes) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(request)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        return resp.status, json.loads(resp.read())


REFUSED_UNREAD = "the request was refused before it was read"


@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/messages HTTP/1.1\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",  # no host
    b"POST /v1/messages/%00 HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",  # a path Envoy cannot normalise
], ids=["no_host", "unnormalisable_path"])
def test_a_request_envoy_cannot_read_is_an_invalid_request_error_400(site, request_bytes):
    status, doc = send(site.url, request_bytes)
    assert status == 400 and doc["type"] == "error" and set(doc["error"]) == {"type", "message"}, doc
    assert doc["error"]["type"] == "invalid_request_error" and doc["error"]["message"].startswith(REFUSED_UNREAD)


def test_a_malformed_header_comes_before_any_path_and_keeps_the_openai_shape(site):
    """Envoy's codec refuses two content-length values before it has a request with a path: the one reply
    for every API, in the OpenAI shape, whose error.message and error.type an Anthropic SDK reads too."""
    status, doc = send(site.url, b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n"
                                 b"content-length: 5\r\n\r\n{}")
    assert status == 400 and set(doc) == {"error"}, doc
    assert doc["error"]["type"] == "invalid_request_error" and doc["error"]["code"] == "http1.codec_error"
    assert doc["error"]["message"].startswith(REFUSED_UNREAD)


def test_a_tenant_over_its_rate_limit_gets_a_rate_limit_error_429(site):
    """The rate-limit filter's 429 (the sidecar's rate-limit service writes the body in the caller's shape),
    on the processor path and on the fast path alike."""
    assert wait_until(lambda: time.time() % 60 < 40, timeout=25)  # the minute's counter will not renew mid-test
    client = site.anthropic(KEYS["ONCE_KEY"])
    assert client.messages.create(model="llama-3", max_tokens=8, messages=HI).content[0].text == "echo: hi"
    for model in ("llama-3", "claude-3-haiku"):
        with pytest.raises(anthropic.RateLimitError) as e:
            client.messages.create(model=model, max_tokens=8, messages=HI)
        assert e.value.type == "rate_limit_error" and e.value.body["type"] == "error"
        assert "tenant once (limit 1)" in e.value.message
        assert 1 <= int(e.value.response.headers["retry-after"]) <= 60


def test_a_key_envoy_refuses_is_an_authentication_error_401(site):
    with pytest.raises(anthropic.AuthenticationError) as e:
        site.anthropic("sk-wrong").messages.create(model="claude-3-haiku", max_tokens=8, messages=HI)
    assert e.value.body == anthropic_error(
        "authentication_error", "a valid API key is required: this gateway takes only the keys its clients section lists")


def test_the_sidecar_down_is_an_overloaded_error_503(site):
    """A stack of its own: its sidecar is killed (ext_proc fails closed, failure_mode_allow: false)."""
    stack = Stack(workdir=site.tmp / "down")
    stack.workdir.mkdir()
    try:
        url, _ = start_site(stack, site.tmp, site.chat, site.msgs, site.chat.address)
        headers = {"x-api-key": KEYS["MSG_KEY"], "content-type": "application/json"}
        messages = json.dumps({"model": "llama-3", "max_tokens": 8, "messages": HI}).encode()
        chat = json.dumps({"model": "gone-claude", "messages": HI}).encode()
        assert raw(url, "/v1/messages", messages, headers)[0] == 200
        sidecar = stack.procs[0]
        sidecar.send_signal(signal.SIGKILL)
        sidecar.wait(timeout=10)
        assert raw(url, "/v1/messages", messages, headers) == (
            503, anthropic_error("overloaded_error", "the gateway sidecar is unavailable"))
        with pytest.raises(anthropic.ServiceUnavailableError) as e:
            anthropic.Anthropic(base_url=url, api_key=KEYS["MSG_KEY"], max_retries=0, timeout=30).messages.create(
                model="llama-3", max_tokens=8, messages=HI)
        assert e.value.type == "overloaded_error"
        assert raw(url, "/v1/chat/completions", chat, headers) == (503, {"error": {
            "message": "the gateway sidecar is unavailable", "type": "gateway_error", "param": None,
            "code": "sidecar_unavailable"}})
    finally:
        stack.stop()

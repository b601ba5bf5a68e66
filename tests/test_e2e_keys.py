"""End to end: who may use the gateway's key, and what comes back, through the real Envoy on deploy/envoy.yaml.

- Keys only where they belong: a keyed backend is reached with the key only on its API's paths and its
  `key_paths`; every other path is a 404 in the OpenAI shape that no upstream sees.
- Never reflected: an upstream that hands the key back (a header, a redirect, an error event inside a 200
  stream, passed through or translated, a JSON-escaped body, an echo of the request's headers) never
  gets it to the client.
- Model names with control characters or over 256 bytes are a 400 naming `model`, on either path.
- The gateway's own headers never reach an upstream, and `x-forwarded-for` is the edge's.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import openai
import pytest

from extproc.local.stack import Stack, free_port, wait_for_port, wait_until

from .upstreams import ChatServer, Reply, ResponsesServer

KEY = "sk-keys-test-0123456789abcdefXYZ"
CONFIG = """
listen: 127.0.0.1:{extproc}
admin_listen: 127.0.0.1:{admin}
backends:
  - name: keyed  # the default backend: body-less requests go here
    api: chat
    models: ["keyed-*"]
    endpoints: ["{chat}"]
    api_key_env: KEYS_TEST_KEY
    key_paths: ["/anything"{default_paths}]
  - name: listed
    api: chat
    models: ["listed-*"]
    endpoints: ["{chat}"]
    api_key_env: KEYS_TEST_KEY
    key_paths: ["/v1/embeddings"]
  - name: keyed-resp
    api: responses
    models: ["kresp-*"]
    endpoints: ["{resp}"]
    api_key_env: KEYS_TEST_KEY
  - name: open
    api: chat
    models: ["open-*"]
    endpoints: ["{chat}"]
  - name: unknown
    api: auto
    models: ["auto-*"]
    endpoints: ["{chat}"]
"""


@dataclass
class Site:
    url: str
    chat: ChatServer
    resp: ResponsesServer
    stack: Stack
    config: Path
    render: dict[str, Any]

    def client(self, api_key: str = "client-key") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=30)

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             ) -> tuple[int, dict[str, str], bytes]:
        """One raw request, no credential unless given: what the SDK cannot send, and the bytes as they come."""
        host = urlsplit(self.url)
        conn = http.client.HTTPConnection(host.hostname, host.port, timeout=30)
        raw = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
        hdrs = {"content-type": "application/json", **(headers or {})} if raw is not None else dict(headers or {})
        conn.request(method, path, body=raw, headers=hdrs)
        r = conn.getresponse()
        out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        conn.close()
        return out

    @property
    def seen(self) -> list[dict[str, Any]]:
        return self.chat.requests + self.resp.requests


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = Path(tmp_path_factory.mktemp("keys"))
    chat, resp = ChatServer(), ResponsesServer()
    stack = Stack()
    render = {"extproc": free_port(), "admin": free_port(), "chat": chat.address, "resp": resp.address,
              "default_paths": ""}
    cfg = tmp / "config.yaml"
    cfg.write_text(CONFIG.format(**render))
    try:
        sidecar = stack.start_sidecar(cfg, env={"KEYS_TEST_KEY": KEY})
        wait_for_port(render["extproc"], proc=sidecar)
        port = free_port()
        stack.start_envoy(port, free_port(), render["extproc"])
        yield Site(f"http://127.0.0.1:{port}", chat, resp, stack, cfg, render)
    finally:
        stack.stop()
        chat.close()
        resp.close()


@pytest.fixture
def s(site: Site) -> Site:
    site.chat.reset()
    site.resp.reset()
    return site


def no_key_in(data: bytes | str) -> bool:
    """Neither the key nor any usual encoding of it, decoded independently of the gateway's matcher."""
    text = data.decode("latin-1") if isinstance(data, bytes) else data
    decoded = [text, text.replace("\\/", "/")]
    try:
        decoded.append(json.dumps(json.loads(text)))  # escapes read back as characters
        decoded.append(json.dumps(json.loads(text), ensure_ascii=False))
    except ValueError:
        decoded += [json.dumps(json.loads(line[5:]), ensure_ascii=False) for line in text.splitlines()
                    if line.startswith("data: {")]
    return not any(KEY in d or quote(KEY, safe="") in d or base64.b64encode(KEY.encode()).decode()[:-4] in d
                   for d in decoded)


# -- keys only where they belong ------------------------------------------------------------------

ELSEWHERE = [("GET", "/v1/files", None), ("GET", "/v1/batches", None), ("GET", "/v1/organization/users", None),
             ("GET", "/v1/vector_stores/vs_1", None), ("GET", "/v1/chat/completions/chatcmpl-1", None),
             ("GET", "/v1/models/keyed-a", None), ("GET", "/anything-else", None),
             ("POST", "/v1/embeddings", {"model": "keyed-a", "input": "x"}),
             ("POST", "/v1/images/generations", {"model": "keyed-a", "prompt": "x"}),
             ("POST", "/v1/audio/speech", {"model": "keyed-a", "input": "x", "voice": "alloy"})]


@pytest.mark.parametrize(("method", "path", "body"), ELSEWHERE)
def test_a_keyed_backend_is_reached_only_on_its_paths(s, method, path, body):
    """With no credential at all, none of these reaches the keyed default backend (or the keyed backend of
    its model): a 404 in the OpenAI shape, and the upstream sees nothing."""
    status, headers, raw = s.call(method, path, body)
    assert status == 404 and headers["content-type"] == "application/json"
    assert json.loads(raw) == {"error": {"message": f"Invalid URL ({method} {path})", "type": "invalid_request_error",
                                         "param": None, "code": "invalid_url"}}
    assert s.seen == []


def test_conversations_are_the_sidecars_own_never_the_keyed_backends(s):
    """The Conversations API is answered by the sidecar for every backend: an id nobody created is its
    own 404, and neither the key nor the request reaches an upstream."""
    status, headers, raw = s.call("GET", "/v1/conversations/conv_1")
    assert status == 404 and headers["content-type"] == "application/json"
    assert json.loads(raw)["error"]["code"] == "conversation_not_found"
    assert s.seen == []


def test_the_sdk_gets_the_404_too(s):
    client = s.client()
    for call in (client.files.list, client.batches.list, lambda: client.models.retrieve("keyed-a"),
                 lambda: client.embeddings.create(model="keyed-a", input="x")):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["code"] == "invalid_url"
    assert s.seen == []
    assert client.chat.completions.create(model="keyed-a", messages=[{"role": "user", "content": "hi"}]).choices
    assert s.chat.last["headers"]["authorization"] == "Bearer " + KEY  # its own API still has the key


def test_key_paths_lists_what_else_gets_the_key(s):
    """`key_paths: [/v1/embeddings]` on one backend: its embeddings go with the key, another keyed backend's
    do not; a backend without a key passes any path, with the client's own credential."""
    client = s.client()
    assert client.embeddings.create(model="listed-a", input="x").data[0].embedding == [0.5]
    assert s.chat.last["path"] == "/v1/embeddings" and s.chat.last["headers"]["authorization"] == "Bearer " + KEY
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="keyed-a", input="x")
    client.embeddings.create(model="open-a", input="x")
    assert s.chat.last["headers"]["authorization"] == "Bearer client-key"


def test_get_v1_files_gets_the_key_once_key_paths_lists_it(s):
    assert s.call("GET", "/v1/files")[0] == 404
    s.config.write_text(CONFIG.format(**{**s.render, "default_paths": ', "/v1/files", "/v1/files/*"'}))
    sidecar = s.stack.procs[0]
    sidecar.send_signal(signal.SIGHUP)
    try:
        assert wait_until(lambda: s.call("GET", "/v1/files")[0] == 200, timeout=15, interval=0.2)
        status, _, raw = s.call("GET", "/v1/files/file-1/content")
        assert status == 200 and json.loads(raw)["data"][0]["id"] == "file-secret-training-data"
        assert [r["headers"]["authorization"] for r in s.chat.requests][-1] == "Bearer " + KEY
        assert s.call("GET", "/v1/filesystem")[0] == 404  # `/v1/files/*` is below /v1/files, not a prefix
    finally:
        s.config.write_text(CONFIG.format(**s.render))
        sidecar.send_signal(signal.SIGHUP)
        assert wait_until(lambda: s.call("GET", "/v1/files")[0] == 404, timeout=15, interval=0.2)


# -- never reflected ------------------------------------------------------------------------------

def chat(s: Site, model: str = "keyed-a", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return s.call("POST", "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}]},
                  headers)


def test_a_key_echoed_in_headers_never_reaches_the_client(s):
    """Response headers: an echo of the request's authorization, `www-authenticate` quoting it, and a
    credential header, on a 200 and on a 401."""
    echo = {"x-echo-authorization": f"Bearer {KEY}", "www-authenticate": f'Bearer realm="api", key="{KEY}"',
            "x-api-key": KEY}
    s.chat.script.append(Reply(text="ok", headers=echo))
    s.chat.script.append(Reply(error=(401, {"error": {"message": "no", "type": "invalid_request_error",
                                                      "code": "invalid_api_key"}}), headers=echo))
    for status in (200, 401):
        got, headers, raw = chat(s)
        assert got == status and all(no_key_in(v) for v in headers.values()), headers
        assert headers["x-echo-authorization"] == "Bearer [redacted]" and "x-api-key" not in headers
        assert no_key_in(raw)


def test_a_redirect_from_a_keyed_backend_is_neither_followed_nor_passed_on_with_the_key(s):
    elsewhere = ChatServer()
    try:
        for location in (f"http://{elsewhere.address}/v1/chat/completions?api_key={quote(KEY, safe='')}",
                         f"http://{elsewhere.address}/v1/chat/completions?token="
                         + base64.urlsafe_b64encode(f"gw:{KEY}".encode()).decode()):
            s.chat.script.append(Reply(error=(307, {"moved": True}), headers={"location": location}))
            status, headers, _ = chat(s)
            assert status == 307 and no_key_in(headers["location"]) and "[redacted]" in headers["location"]
            assert headers["location"].startswith(f"http://{elsewhere.address}/v1/chat/completions?")
        assert elsewhere.requests == []  # Envoy did not follow it
    finally:
        elsewhere.close()


def chunk(delta: dict[str, Any]) -> bytes:
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}).encode()


CHAT_ERROR_STREAM = [chunk({"role": "assistant", "content": ""}), chunk({"content": "hel"}),
                     json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}", "type": "invalid_request_error",
                                           "code": "invalid_api_key"}}).encode()]
RESPONSES_ERROR_STREAM = [
    json.dumps({"type": "response.created", "sequence_number": 0, "response": {
        "id": "resp_1", "object": "response", "created_at": 1, "status": "in_progress", "model": "m", "output": []}}).encode(),
    json.dumps({"type": "error", "sequence_number": 1, "code": "invalid_api_key",
                "message": f"Incorrect API key provided: {KEY}", "param": None}).encode()]


@pytest.mark.parametrize(("path", "model", "events"), [
    ("/v1/chat/completions", "keyed-a", CHAT_ERROR_STREAM),  # passed through
    ("/v1/responses", "keyed-a", CHAT_ERROR_STREAM),  # a chat stream translated for a Responses client
    ("/v1/responses", "kresp-a", RESPONSES_ERROR_STREAM),  # passed through
    ("/v1/chat/completions", "kresp-a", RESPONSES_ERROR_STREAM),  # a Responses stream translated for chat
], ids=["chat", "chat-translated", "responses", "responses-translated"])
def test_an_error_event_quoting_the_key_inside_a_200_stream_arrives_without_it(s, path, model, events):
    server = s.resp if model.startswith("kresp") else s.chat
    server.script.append(Reply(events=events))
    body = {"model": model, "stream": True, **({"messages": [{"role": "user", "content": "hi"}]}
                                                if path.endswith("completions") else {"input": "hi"})}
    status, _, raw = s.call("POST", path, body)
    assert status == 200 and b"data: " in raw
    assert no_key_in(raw) and b"Incorrect API key provided" in raw  # the upstream's message, without the key
    assert server.last["headers"]["authorization"] == "Bearer " + KEY


def test_a_json_escaped_key_in_a_body_never_reaches_the_client(s):
    """A 200 body whose JSON writes the key with escapes (every character, some, `\\/`): a JSON reader sees
    the key, so the gateway must too."""
    escaped = "".join(f"\\u{ord(c):04x}" if i % 2 else c for i, c in enumerate(KEY))
    doc = ('{"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "keyed-a", "choices": [{"index": 0, '
           '"message": {"role": "assistant", "content": "your key is ' + escaped + '"}, "finish_reason": "stop"}], '
           '"usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}')
    assert KEY in json.loads(doc)["choices"][0]["message"]["content"]  # the test's own premise
    s.chat.script.append(Reply(body=doc.encode()))
    r = s.client().chat.completions.create(model="keyed-a", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "your key is [redacted]"


def test_an_upstream_echoing_the_request_headers_never_shows_the_key(s):
    """httpbin's `/anything`, listed in the default backend's key_paths: it echoes the authorization the
    gateway sent it, which the client never had."""
    status, _, raw = s.call("GET", "/anything?x=1", headers={"authorization": "Bearer client-key"})
    assert status == 200 and s.chat.last["headers"]["authorization"] == "Bearer " + KEY
    assert json.loads(raw)["headers"]["authorization"] == "Bearer [redacted]" and no_key_in(raw)


# -- model names ----------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["keyed-a\x00b", "keyed-a\nINFO fake line", "open-a\r\nx: y", "open-\x7f",
                                   "open-\u0085", "open-" + "a" * 252, "open-" + "é" * 126, "keyed-" + "a" * 1_000_000],
                         ids=["nul", "newline", "crlf-fast-path-glob", "del", "c1", "257-bytes", "257-bytes-utf8", "1-mb"])
def test_odd_model_names_are_refused_naming_the_field(s, model):
    for path in ("/v1/chat/completions", "/v1/responses"):
        body = {"model": model, **({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else
                                   {"input": "hi", "store": False})}
        status, _, raw = s.call("POST", path, body)
        assert status == 400, raw[:300]
        assert json.loads(raw)["error"]["param"] == "model"
    assert s.seen == []


def test_names_up_to_256_bytes_are_served_on_either_path(s):
    client = s.client()
    for model in ("open-" + "a" * 251, "open-é", "keyed-" + "a" * 250):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        assert s.chat.last["body"]["model"] == model


# -- headers --------------------------------------------------------------------------------------

OURS = {"x-gateway-model-mode": "responses", "x-gateway-retry": "responses", "x-gateway-retried-as": "chat",
        "x-extproc-role": "first-contact", "x-gateway-backend": "keyed", "x-gateway-cluster": "openai",
        "x-gateway-destination-endpoint": "10.0.0.1:80", "x-gateway-first-contact": "t"}


@pytest.mark.parametrize("model", ["open-a", "keyed-a", "auto-a"], ids=["fast-path", "processor", "first-contact"])
def test_the_gateways_own_headers_never_reach_an_upstream(s, model):
    status, headers, _raw = chat(s, model, headers=OURS)
    assert status == 200, (status, _raw)
    sent = {k.lower() for k in s.chat.last["headers"]}
    assert not {h for h in sent if h.startswith(("x-gateway-", "x-extproc-"))}, sent
    assert not {h for h in headers if h.startswith(("x-gateway-", "x-extproc-"))}  # none in the answer either


def test_a_first_contacts_retry_carries_none_of_them(s):
    """A Responses client on a model of unknown API at a chat-only server: the first attempt is rejected
    and retried translated, on the same instance (Envoy picks it from metadata, not from the header).
    Neither attempt carries the gateway's headers."""
    s.client().responses.create(model="auto-a", input="hi", extra_headers=OURS)
    first, retry = s.chat.requests
    assert (first["path"], retry["path"]) == ("/v1/responses", "/v1/chat/completions")
    for attempt in (first, retry):
        assert not {h for h in (k.lower() for k in attempt["headers"]) if h.startswith(("x-gateway-", "x-extproc-"))}


def test_a_translated_request_carries_none_of_them_either(s):
    s.client().responses.create(model="open-a", input="hi", extra_headers=OURS)
    assert s.chat.last["path"] == "/v1/chat/completions"
    assert not {h for h in (k.lower() for k in s.chat.last["headers"]) if h.startswith(("x-gateway-", "x-extproc-"))}


def test_x_forwarded_for_is_the_edges(s):
    """Envoy is the edge (`use_remote_address`, no trusted hops): it appends one hop to what the client
    claims, and the address it trusts as the client's (`x-envoy-external-address`) is the peer's, whatever
    the client says; a client cannot pose as an internal caller either. (For a loopback peer Envoy appends
    its host's own address rather than 127.0.0.1.)"""
    for model in ("open-a", "keyed-a"):  # fast path and processor path
        for claim in ("203.0.113.7", "10.0.0.1, 198.51.100.9"):
            chat(s, model, headers={"x-forwarded-for": claim, "x-envoy-internal": "true"})
            sent = {k.lower(): v for k, v in s.chat.last["headers"].items()}
            hops = [h.strip() for h in sent["x-forwarded-for"].split(",")]
            assert hops[:-1] == [h.strip() for h in claim.split(",")] and ipaddress.ip_address(hops[-1])
            assert sent["x-envoy-external-address"] == "127.0.0.1" and "x-envoy-internal" not in sent


def test_the_sdk_reads_those_stream_errors_without_the_key(s):
    """The same streams as the SDK reads them, passed through and translated: the error it raises holds
    the upstream's message, without the key."""
    client = s.client()
    calls = [lambda: client.chat.completions.create(model="keyed-a", messages=[{"role": "user", "content": "hi"}],
                                                    stream=True),
             lambda: client.responses.create(model="keyed-a", input="hi", stream=True)]  # translated
    for call in calls:
        s.chat.script.append(Reply(events=CHAT_ERROR_STREAM))
        with pytest.raises(openai.APIError) as e:
            list(call())
        assert e.value.message == "Incorrect API key provided: [redacted]"
        assert no_key_in(json.dumps(e.value.body))

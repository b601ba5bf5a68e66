"""End to end: with a `clients` section only listed keys use the gateway, and each key's tenant and models hold.

The real Envoy on deploy/envoy.yaml (its Lua filter checks the key, on the hashes the sidecar serves
over ADS), the official openai SDK and a raw WebSocket upgrade: no key and a wrong key get a 401 in
OpenAI's shape on the fast path, the processor path and the socket's upgrade, and reach no upstream;
a listed key reaches every path; a key's `models` hold on both paths and on a socket's turns; stored
state belongs to the listed tenant (two keys of one tenant share it, a forged tenant header changes
nothing); keys of every length around SHA-256's block boundaries are recognised; a reload changes
the accepted keys.
"""

from __future__ import annotations

import hashlib
import json
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from extproc.local.stack import Stack, free_port, wait_until

from .conftest import metric, running
from .test_e2e_surface import text_of, ws_turn
from .upstreams import ChatServer, Reply, ResponsesServer

# Keys whose SHA-256 padding falls on each side of the 55/56 and 64-byte boundaries (one and two blocks).
LENGTHS = (1, 55, 56, 63, 64, 65, 119, 120, 200)
KEYS = {"ALICE_KEY": "sk-alice-1", "ALICE_KEY_2": "sk-alice-2",
        **{f"LEN_KEY_{n}": ("k" * n)[:n - 1] + "Z" for n in LENGTHS}}
BOB = "sk-bob"
CONFIG = """
listen: 127.0.0.1:{extproc}
admin_listen: 127.0.0.1:{admin}
websocket_listen: 127.0.0.1:{ws}
websocket_gateway: http://127.0.0.1:{port}
backends:
  - name: chat
    api: chat
    models: ["llama-*"]
    endpoints: ["{chat}"]
  - name: resp
    api: responses
    models: ["gpt-5.3-codex", "resp-*"]
    endpoints: ["{resp}"]
clients:
  - {{key_env: ALICE_KEY, tenant: alice}}
  - {{key_env: ALICE_KEY_2, tenant: alice}}
  - {{key_sha256: "{bob}", tenant: bob, models: ["llama-3*", "resp-?"]}}
{lengths}{extra}"""


@dataclass
class Keyed:
    url: str
    ws_url: str
    envoy_admin: str
    admin: str
    chat: ChatServer
    resp: ResponsesServer
    config: Path
    render: dict
    stack: Stack

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30)

    def raw(self, path: str, body: dict | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method="POST" if body is not None else "GET",
                                     headers={"content-type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def seen(self) -> float:
        """Request headers the processor was asked about."""
        return metric(self.admin, "extproc_phase_seconds_count", phase="request_headers")

    def processed(self) -> int:
        """ext_proc streams Envoy opened: one per request that reached the processor."""
        with urllib.request.urlopen(f"{self.envoy_admin}/stats?filter=^http.llm.ext_proc.streams_started$&format=json",
                                    timeout=5) as r:
            stats = json.loads(r.read())["stats"]
        return int(stats[0]["value"]) if stats else 0

    def reconfigure(self, extra: str) -> None:
        self.config.write_text(CONFIG.format(**{**self.render, "extra": extra}))
        next(p for p in self.stack.procs if "serve" in p.args).send_signal(signal.SIGHUP)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    chat, resp = ChatServer(), ResponsesServer()
    extproc, admin, port, envoy_admin, ws = (free_port() for _ in range(5))
    lengths = "".join(f"  - {{key_env: LEN_KEY_{n}, tenant: len-{n}}}\n" for n in LENGTHS)
    render = {"extproc": extproc, "admin": admin, "port": port, "ws": ws, "chat": chat.address, "resp": resp.address,
              "bob": hashlib.sha256(BOB.encode()).hexdigest(), "lengths": lengths, "extra": ""}
    cfg = Path(tmp_path_factory.mktemp("clients")) / "config.yaml"
    cfg.write_text(CONFIG.format(**render))
    with running(cfg, extproc, port, servers=(chat, resp), env=KEYS, ready=(ws,), envoy_admin=envoy_admin,
                 websocket=ws) as stack:
        yield Keyed(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/responses", f"http://127.0.0.1:{envoy_admin}",
                    f"http://127.0.0.1:{admin}", chat, resp, cfg, render, stack)


@pytest.fixture
def kd(keyed: Keyed) -> Keyed:
    keyed.chat.reset()
    keyed.resp.reset()
    return keyed


CHAT = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}]}
REFUSED = {"message": "a valid API key is required: this gateway takes only the keys its clients section lists",
           "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer sk-wrong"}, {"x-api-key": "sk-wrong"},
                                     {"authorization": "Basic " + KEYS["ALICE_KEY"]},
                                     {"authorization": "Bearer " + KEYS["ALICE_KEY"] + "x"}])
def test_no_key_or_a_wrong_key_is_a_401_before_anything_is_routed(kd, headers):
    before = kd.seen(), kd.processed()
    for path, body in [("/v1/chat/completions", CHAT), ("/v1/chat/completions", {**CHAT, "model": "gpt-5.3-codex"}),
                       ("/v1/responses", {"model": "llama-3-8b", "input": "hi"}),
                       ("/v1/responses", {"model": "resp-a", "input": "hi", "store": False}), ("/v1/models", None)]:
        assert kd.raw(path, body, headers) == (401, {"error": REFUSED}), (path, body)
    assert kd.chat.requests == [] and kd.resp.requests == []
    assert (kd.seen(), kd.processed()) == before  # refused by Envoy: not even a stream to the processor


def test_the_refusal_on_anthropic_messages_is_in_its_shape(kd):
    status, body = kd.raw("/v1/messages", {"model": "claude-x", "max_tokens": 8, "messages": []},
                          {"x-api-key": "sk-wrong", "anthropic-version": "2023-06-01"})
    assert (status, body) == (401, {"type": "error", "error": {"type": "authentication_error",
                                                               "message": REFUSED["message"]}})


def test_the_sdks_see_an_authentication_error_on_both_apis(kd):
    client = kd.client("sk-wrong")
    with pytest.raises(openai.AuthenticationError) as chat:
        client.chat.completions.create(**CHAT)
    with pytest.raises(openai.AuthenticationError) as responses:
        client.responses.create(model="gpt-5.3-codex", input="hi", stream=True)
    for e in (chat.value, responses.value):
        assert e.status_code == 401 and e.code == "invalid_api_key"
        assert e.response.headers["www-authenticate"] == "Bearer"


def test_a_listed_key_reaches_the_fast_path_and_the_processor(kd):
    client = kd.client(KEYS["ALICE_KEY"])
    kd.chat.script.extend([Reply(text="fast"), Reply(text="processed")])
    before = kd.processed()
    assert client.chat.completions.create(**CHAT).choices[0].message.content == "fast"
    assert kd.processed() == before  # the fast path: Envoy alone
    assert kd.chat.last["headers"].get("x-gateway-tenant") is None  # the tenant header stays in the gateway
    assert client.responses.create(model="llama-3-8b", input="hi").output_text == "processed"  # translated
    assert client.responses.create(model="resp-a", input="hi", store=False).status == "completed"  # fast, Responses
    assert client.chat.completions.create(model="gpt-5.3-codex", messages=CHAT["messages"]).choices[0].message.content
    assert kd.processed() == before + 2


def test_keys_of_every_length_around_sha256s_block_boundaries_are_recognised(kd):
    for n in LENGTHS:
        status, body = kd.raw("/v1/chat/completions", CHAT, {"authorization": "Bearer " + KEYS[f"LEN_KEY_{n}"]})
        assert status == 200, (n, body)


def test_a_keys_models_hold_on_the_fast_path_and_the_processor_path(kd):
    bob = kd.client(BOB)
    assert bob.chat.completions.create(**CHAT).choices  # llama-3* is allowed
    assert bob.responses.create(model="resp-a", input="hi", store=False).status == "completed"  # resp-? too
    for call in (lambda: bob.chat.completions.create(**{**CHAT, "model": "llama-2-7b"}),  # fast path
                 lambda: bob.chat.completions.create(model="gpt-5.3-codex", messages=CHAT["messages"]),  # processor
                 lambda: bob.responses.create(model="resp-ab", input="hi")):
        with pytest.raises(openai.PermissionDeniedError) as e:
            call()
        assert e.value.status_code == 403 and e.value.code == "model_not_allowed"
    assert [r["body"]["model"] for r in kd.chat.requests + kd.resp.requests] == ["llama-3-8b", "resp-a"]


@pytest.mark.parametrize("path", ["/v1/responses/compact", "/v1/embeddings"])
def test_a_keys_models_hold_on_the_other_paths_too(kd, path):
    status, body = kd.raw(path, {"model": "gpt-5.3-codex", "input": "hi"}, {"authorization": f"Bearer {BOB}"})
    assert (status, body["error"]["code"]) == (403, "model_not_allowed")
    assert kd.chat.requests == [] and kd.resp.requests == []


# JSON as the sidecar reads it (any case, a structured +json type, space before the parameters): Envoy's
# model reader must read these too, or the models stage sees no model and lets any model through.
@pytest.mark.parametrize("ctype", ["Application/JSON", "application/vnd.api+json", "application/json ; charset=utf-8"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/embeddings"])
def test_a_keys_models_hold_whatever_spelling_of_json_the_sidecar_accepts(kd, ctype, path):
    body = {**CHAT, "model": "gpt-5.3-codex"} if "chat" in path else {"model": "gpt-5.3-codex", "input": "hi"}
    status, answer = kd.raw(path, body, {"authorization": f"Bearer {BOB}", "content-type": ctype})
    assert (status, answer["error"]["code"]) == (403, "model_not_allowed")
    assert kd.chat.requests == [] and kd.resp.requests == []


def test_a_websocket_upgrade_needs_a_listed_key_and_its_turns_keep_the_keys_models(kd):
    for headers in ({}, {"authorization": "Bearer sk-wrong"}):
        with pytest.raises(InvalidStatus) as e:
            connect(kd.ws_url, additional_headers=headers, open_timeout=30)
        assert e.value.response.status_code == 401
        assert json.loads(e.value.response.body) == {"error": REFUSED}
    kd.chat.script.append(Reply(text="over a socket"))
    with connect(kd.ws_url, additional_headers={"authorization": f"Bearer {BOB}"}, open_timeout=30) as ws:
        assert text_of(ws_turn(ws, model="llama-3-8b", input="hi")) == "over a socket"
        (refused,) = ws_turn(ws, model="gpt-5.3-codex", input="hi")
    assert refused["type"] == "error" and refused["status"] == 403 and refused["error"]["code"] == "model_not_allowed"
    assert len(kd.chat.requests) == 1 and kd.resp.requests == []


def test_stored_state_belongs_to_the_listed_tenant_not_the_raw_key(kd):
    kd.chat.script.extend([Reply(text="one"), Reply(text="two")])
    first = kd.client(KEYS["ALICE_KEY"]).responses.create(model="llama-3-8b", input="remember me")
    # Alice's second key is the same tenant: her conversation continues.
    second = kd.client(KEYS["ALICE_KEY_2"]).responses.create(model="llama-3-8b", input="and?",
                                                             previous_response_id=first.id)
    assert second.output_text == "two"
    assert [m["content"] for m in kd.chat.last["body"]["messages"]] == ["remember me", "one", "and?"]
    # Bob, even naming Alice's tenant in the header Envoy sets, cannot see it.
    bob = kd.client(BOB)
    for headers in ({}, {"x-gateway-tenant": "alice"}):
        with pytest.raises(openai.NotFoundError):
            bob.responses.retrieve(first.id, extra_headers=headers)
    assert len(kd.chat.requests) == 2


def test_a_reload_changes_the_accepted_keys(kd):
    new = "sk-added-by-reload"
    assert kd.raw("/v1/chat/completions", CHAT, {"authorization": f"Bearer {new}"})[0] == 401
    try:
        kd.reconfigure(f'  - {{key_sha256: "{hashlib.sha256(new.encode()).hexdigest()}", tenant: carol}}\n')
        assert wait_until(lambda: kd.raw("/v1/chat/completions", CHAT, {"authorization": f"Bearer {new}"})[0] == 200,
                          timeout=20)
    finally:
        kd.reconfigure("")
    assert wait_until(lambda: kd.raw("/v1/chat/completions", CHAT, {"authorization": f"Bearer {new}"})[0] == 401,
                      timeout=20)

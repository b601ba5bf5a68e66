"""End to end: stored conversations belong to the caller that made them, in every store.

Two tenants (two API keys) through the real Envoy and sidecar, with the official openai SDK. Alice
makes a conversation on a chat-only backend (the sidecar holds it) and one on a Responses backend
the sidecar sends its own key to (the backend cannot tell callers apart); Bob, holding the ids, gets
the same 404 as for an unknown id on every path, and changes nothing.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from extproc.local.stack import free_port

from .conftest import running
from .upstreams import ChatServer, ResponsesServer

CONFIG = """
listen: 127.0.0.1:{port}
admin_listen: off
state: {state}
backends:
  - name: chat
    api: chat
    models: ["llama-*"]
    endpoints: ["{chat}"]
  - name: resp
    api: responses
    models: ["gpt-oss-*"]
    endpoints: ["{resp}"]
    api_key_env: RESP_KEY
"""


@dataclass
class Tenanted:
    url: str
    resp: ResponsesServer

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30)

    def raw(self, method: str, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
        return json_call(self.url, method, path, body, key)


def json_call(base: str, method: str, path: str, body: dict | None, key: str | None) -> tuple[int, dict]:
    """One JSON request as a plain client sends it (no credential at all when `key` is None): status, body."""
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module", params=["memory", "sqlite", "redis"])
def tenanted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenanted]:
    tmp = Path(tmp_path_factory.mktemp("tenancy"))
    state = {"memory": "{store: memory}", "sqlite": f"{{store: sqlite, sqlite_path: {tmp / 'state.db'}}}"}.get(
        request.param)
    if state is None:
        state = f"{{store: redis, redis_url: '{request.getfixturevalue('redis_server').url}'}}"
    chat, resp = ChatServer(), ResponsesServer()
    port, listen = free_port(), free_port()
    cfg = tmp / "config.yaml"
    cfg.write_text(CONFIG.format(port=port, state=state, chat=chat.address, resp=resp.address))
    with running(cfg, port, listen, servers=(chat, resp), env={"RESP_KEY": "sk-gateway-own"}):
        yield Tenanted(f"http://127.0.0.1:{listen}", resp)


@pytest.mark.parametrize("model", ["llama-3", "gpt-oss-1"])
def test_another_tenant_sees_an_unknown_id_on_every_path(tenanted: Tenanted, model: str):
    alice, bob = tenanted.client("sk-alice"), tenanted.client("sk-bob")
    first = alice.responses.create(model=model, input="my name is Zed")
    rid = first.id
    for attempt in (
        lambda: bob.responses.retrieve(rid),
        lambda: bob.responses.input_items.list(rid),
        lambda: bob.responses.delete(rid),
        lambda: bob.responses.cancel(rid),
        lambda: bob.responses.create(model=model, input="what is my name?", previous_response_id=rid),
    ):
        with pytest.raises(openai.NotFoundError) as e:
            attempt()
        assert e.value.body["code"] in ("response_not_found", "previous_response_not_found")
    if model.startswith("gpt-oss"):  # counting tokens continues a conversation too: the same check
        count = {"model": model, "input": "how long?", "previous_response_id": rid}
        status, err = tenanted.raw("POST", "/v1/responses/input_tokens", count, key="sk-bob")
        assert (status, err["error"]["code"]) == (404, "previous_response_not_found")
        status, counted = tenanted.raw("POST", "/v1/responses/input_tokens", count, key="sk-alice")
        assert status == 200 and counted["object"] == "response.input_tokens"
        assert tenanted.resp.last["body"]["previous_response_id"] == rid
    # An id nobody made gets exactly the same answer as Alice's id gets for Bob.
    status, unknown = tenanted.raw("GET", "/v1/responses/resp_doesnotexist", key="sk-bob")
    status_b, theirs = tenanted.raw("GET", f"/v1/responses/{rid}", key="sk-bob")
    assert (status, status_b) == (404, 404)
    assert theirs["error"]["message"].replace(rid, "X") == unknown["error"]["message"].replace("resp_doesnotexist", "X")
    # Bob changed nothing: Alice still reads and continues her conversation.
    assert alice.responses.retrieve(rid).id == rid
    second = alice.responses.create(model=model, input="what is my name?", previous_response_id=rid)
    assert second.status == "completed"


def test_callers_without_a_credential_share_the_anonymous_tenant(tenanted: Tenanted):
    status, made = tenanted.raw("POST", "/v1/responses", {"model": "llama-3", "input": "hi"})
    assert status == 200
    assert tenanted.raw("GET", f"/v1/responses/{made['id']}")[0] == 200  # another anonymous caller
    assert tenanted.raw("GET", f"/v1/responses/{made['id']}", key="sk-alice")[0] == 404


def test_a_conversation_is_held_in_every_store_and_only_for_its_tenant(tenanted: Tenanted):
    """The Conversations API on a chat-only backend in each store: a turn naming the conversation gets
    its items as history and is appended; another tenant's calls on the id are the unknown id's 404."""
    alice, bob = tenanted.client("sk-alice"), tenanted.client("sk-bob")
    conv = alice.conversations.create(items=[{"type": "message", "role": "user", "content": "my name is Zed"}])
    answer = alice.responses.create(model="llama-3", conversation=conv.id, input="what is my name?")
    assert answer.status == "completed"
    items = list(alice.conversations.items.list(conv.id, order="asc"))
    assert [(i.role, i.content[0].text) for i in items[:2]] == [("user", "my name is Zed"), ("user", "what is my name?")]
    assert len(items) == 3 and items[2].id == answer.output[0].id
    for attempt in (lambda: bob.conversations.retrieve(conv.id), lambda: list(bob.conversations.items.list(conv.id)),
                    lambda: bob.conversations.delete(conv.id),
                    lambda: bob.responses.create(model="llama-3", conversation=conv.id, input="and mine?")):
        with pytest.raises(openai.NotFoundError) as e:
            attempt()
        assert e.value.body["code"] == "conversation_not_found"
    assert len(list(alice.conversations.items.list(conv.id))) == 3  # Bob changed nothing

"""`conversations: passthrough`, sans-IO through the exchange: the create call goes to the backend that
holds conversations and its id is pinned for the tenant; calls and turns on a pinned id pass through
to that instance untouched; another tenant, an unknown id and a model of another backend are refused
before any upstream; the config's checks. Without the flag the sidecar holds them (test_conversations_api)."""

from __future__ import annotations

import json

import pytest

from extproc.config import ConfigError, parse_config
from extproc.errors import GatewayError
from extproc.exchange import STREAMED
from extproc.routing.gateway import Gateway
from extproc.routing.key_paths import key_allowed
from extproc.state.records import Pin

from .exchanges import Store, endpoint, send

CFG = """
usage_accounting: translated  # so that pinning alone decides which phases are asked for
backends:
  - name: resp
    api: responses
    models: ["gpt-oss-*"]
    endpoints: ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
    conversations: passthrough
  - name: other
    api: responses
    models: ["codex-*"]
    endpoints: ["10.0.2.1:80"]
  - name: chat
    api: chat
    models: ["llama-*"]
    endpoints: ["10.0.1.1:80"]
"""
PIN = Pin("resp", "10.0.0.2:80")


@pytest.fixture
def gateway() -> Gateway:
    return Gateway(parse_config(CFG, env={}))


def tenant_of(gateway: Gateway, key: str) -> str:
    return gateway.tenants.tenant_of({"authorization": f"Bearer {key}"})


def test_a_create_call_goes_to_the_holder_and_its_id_is_pinned_for_the_tenant(gateway):
    store = Store()
    ex, act = send(gateway, "/v1/conversations", {"metadata": {"topic": "x"}}, store, key="k1")
    where = endpoint(act)
    assert where in {"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"} and act.body is None  # the bytes untouched
    assert not act.done  # the answer's id is needed
    assert ex.response_headers({":status": "200", "content-type": "application/json"}).response_body_mode == STREAMED
    body = b'{"id":"conv_abc","object":"conversation","created_at":1,"metadata":{"topic":"x"}}'
    assert store.run(ex.response_body(body[:20], False)).writes == []
    act = store.run(ex.response_body(body[20:], True))
    assert act.writes == [(f"convpin:{tenant_of(gateway, 'k1')}:conv_abc", Pin("resp", where).dumps())]
    assert not any(k.startswith(("pin:", "owner:", "conv:")) for k in store)  # not a response's records


def test_a_failed_create_pins_nothing(gateway):
    store = Store()
    ex, _ = send(gateway, "/v1/conversations", {}, store, key="k1")
    act = ex.response_headers({":status": "400", "content-type": "application/json"})
    assert act.done and act.writes == [] and store == {}


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/v1/conversations/conv_abc", None),
    ("POST", "/v1/conversations/conv_abc", {"metadata": {"a": "b"}}),
    ("DELETE", "/v1/conversations/conv_abc", None),
    ("GET", "/v1/conversations/conv_abc/items?limit=2&order=asc&include=message.output_text.logprobs", None),
    ("POST", "/v1/conversations/conv_abc/items", {"items": [{"role": "user", "content": "hi"}]}),
    ("GET", "/v1/conversations/conv_abc/items/msg_1", None),
    ("DELETE", "/v1/conversations/conv_abc/items/msg_1", None),
])
def test_every_call_on_a_pinned_id_passes_through_to_its_instance(gateway, method, path, body):
    store = Store({f"convpin:{tenant_of(gateway, 'k1')}:conv_abc": PIN.dumps()})
    ex, act = send(gateway, path, body, store, method, key="k1")
    assert endpoint(act) == "10.0.0.2:80" and act.body is None and ex.pin_decision == "pin_hit"
    assert ":path" not in dict(act.set_headers)  # the path (and its query) as the client sent it
    act = ex.response_headers({":status": "503", "content-type": "text/plain"})  # Envoy: the instance is gone
    explained = json.loads(ex.response_body(b"upstream connect error or disconnect/reset before headers", True).body)
    assert explained["error"]["code"] == "pinned_backend_unavailable" and "10.0.0.2:80" in explained["error"]["message"]


@pytest.mark.parametrize(("path", "status", "forgotten"), [
    ("/v1/conversations/conv_abc", "200", True),  # deleted by the backend: the pin goes too
    ("/v1/conversations/conv_abc", "404", False),  # the backend refused: nothing is known to be gone
    ("/v1/conversations/conv_abc", "500", False),
    ("/v1/conversations/conv_abc/items/msg_1", "200", False),  # an item deleted: the conversation stays
])
def test_a_delete_the_backend_answers_with_success_removes_the_pin(gateway, path, status, forgotten):
    pin = f"convpin:{tenant_of(gateway, 'k1')}:conv_abc"
    store = Store({pin: PIN.dumps()})
    ex, act = send(gateway, path, None, store, "DELETE", key="k1")
    assert endpoint(act) == "10.0.0.2:80"
    act = store.run(ex.response_headers({":status": status, "content-type": "application/json"}))
    assert act.writes == ([(pin, None)] if forgotten else [])
    assert (pin in store) is not forgotten


@pytest.mark.parametrize("cid", ["conv_abc", "conv_nobody_made"])
def test_another_tenant_or_an_unknown_id_is_a_404_that_reaches_no_backend(gateway, cid):
    store = Store({f"convpin:{tenant_of(gateway, 'k1')}:conv_abc": PIN.dumps()})
    for method, path, body in [("GET", f"/v1/conversations/{cid}", None),
                               ("POST", f"/v1/conversations/{cid}/items", {"items": [{"role": "user", "content": "x"}]}),
                               ("POST", "/v1/responses", {"model": "gpt-oss-1", "input": "x", "conversation": cid})]:
        with pytest.raises(GatewayError) as e:
            send(gateway, path, body, store, method, key="k2")
        assert (e.value.status, e.value.code) == (404, "conversation_not_found")


@pytest.mark.parametrize("conversation", ["conv_abc", {"id": "conv_abc"}])
def test_a_turn_in_a_pinned_conversation_passes_through_to_its_instance(gateway, conversation):
    store = Store({f"convpin:{tenant_of(gateway, 'k1')}:conv_abc": PIN.dumps()})
    body = {"model": "gpt-oss-1", "input": "x", "conversation": conversation, "prompt_cache_key": "anything"}
    ex, act = send(gateway, "/v1/responses", body, store, key="k1")
    assert endpoint(act) == "10.0.0.2:80" and act.body is None  # `conversation` reaches the backend as sent
    ex.response_headers({":status": "200", "content-type": "application/json"})
    act = store.run(ex.response_body(b'{"id":"resp_1","object":"response","status":"completed","output":[]}', True))
    assert [k for k, _ in act.writes] == [f"pin:{tenant_of(gateway, 'k1')}:resp_1", "owner:resp_1"]
    assert not any(k.startswith("conv:") for k in store)  # nothing appended by the sidecar


@pytest.mark.parametrize("model", ["llama-3", "codex-1"])
def test_a_model_of_another_backend_cannot_continue_a_pinned_conversation(gateway, model):
    store = Store({f"convpin:{tenant_of(gateway, 'k1')}:conv_abc": PIN.dumps()})
    with pytest.raises(GatewayError) as e:
        send(gateway, "/v1/responses", {"model": model, "input": "x", "conversation": "conv_abc"}, store, key="k1")
    assert (e.value.status, e.value.param) == (400, "conversation") and "'resp'" in e.value.message


def test_a_pin_whose_instance_left_the_config_is_explained(gateway):
    store = Store({f"convpin:{tenant_of(gateway, 'k1')}:conv_abc": Pin("resp", "10.0.0.9:80").dumps()})
    with pytest.raises(GatewayError) as e:
        send(gateway, "/v1/conversations/conv_abc", None, store, "GET", key="k1")
    assert (e.value.status, e.value.code) == (409, "pinned_backend_gone") and "10.0.0.9:80" in e.value.message


def test_a_conversation_the_sidecar_holds_is_still_its_own(gateway):
    """A record the sidecar holds (made before the flag was set) is answered by the sidecar."""
    tenant = tenant_of(gateway, "k1")
    store = Store({f"conv:{tenant}:conv_old": json.dumps({"id": "conv_old", "created_at": 1, "metadata": {},
                                                           "items": []}).encode()})
    _, act = send(gateway, "/v1/conversations/conv_old", None, store, "GET", key="k1")
    assert act.immediate is not None and json.loads(act.immediate[1])["id"] == "conv_old"


def test_the_holder_gets_its_key_on_the_conversations_paths_only():
    cfg = parse_config(CFG.replace("    conversations: passthrough\n", "    conversations: passthrough\n"
                                   "    api_key_env: KEY\n").replace('endpoints: ["10.0.2.1:80"]',
                                                                     'endpoints: ["10.0.2.1:80"]\n    api_key_env: KEY'),
                       env={"KEY": "sk-1"})
    holder, other = cfg.backend("resp"), cfg.backend("other")
    assert holder is not None and other is not None
    for path in ("/v1/conversations", "/v1/conversations/conv_1/items?limit=2"):
        assert key_allowed(holder, path) and not key_allowed(other, path)


@pytest.mark.parametrize(("change", "problem"), [
    (("api: chat\n    models: [\"llama-*\"]", "api: chat\n    models: [\"llama-*\"]\n    conversations: passthrough"),
     "backends[2].conversations: passthrough needs a backend declared api: responses or both"),
    (("models: [\"codex-*\"]", "models: [\"codex-*\"]\n    conversations: passthrough"),
     "backends[1].conversations: only one backend may hold conversations ('resp' does already)"),
    (("conversations: passthrough", "conversations: backend"), "backends[0].conversations: must be one of"),
])
def test_the_config_checks_who_holds_conversations(change, problem):
    with pytest.raises(ConfigError) as e:
        parse_config(CFG.replace(*change), env={})
    assert problem in str(e.value)


def test_by_default_the_sidecar_holds_every_conversation():
    cfg = parse_config(CFG.replace("    conversations: passthrough\n", ""), env={})
    assert [b.conversations for b in cfg.backends] == ["sidecar"] * 3 and Gateway(cfg).conversations_backend is None

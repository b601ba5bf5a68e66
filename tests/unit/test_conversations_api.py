"""The Conversations API the sidecar holds, sans-IO through the exchange: records, tenancy, pagination,
metadata limits, errors, and `conversation` on /v1/responses."""

from __future__ import annotations

import json

import pytest

from extproc.config import parse_config
from extproc.errors import GatewayError
from extproc.exchange import Exchange
from extproc.exchange.paths import allowed_methods, check_request_line
from extproc.routing.gateway import Gateway
from extproc.state.conversations import Record, conversation_key

from .exchanges import Store, send
from .test_state_flow import CFG


@pytest.fixture
def gateway():
    return Gateway(parse_config(CFG, env={}))


def call(gateway, store: Store, method: str, path: str, body: dict | None = None, key: str = "k1") -> tuple[int, dict]:
    """One request through a fresh exchange; the sidecar's own answer (status, JSON) or its error."""
    try:
        _, act = send(gateway, path, body, store, method, key)
    except GatewayError as e:
        return e.status, json.loads(e.body())
    assert act.immediate is not None and act.done
    status, raw, _ = act.immediate
    return status, json.loads(raw)


def test_paths_and_methods():
    assert allowed_methods("/v1/conversations") == ("POST",)
    assert allowed_methods("/v1/conversations/conv_1?x=1") == ("GET", "POST", "DELETE")
    assert allowed_methods("/v1/conversations/conv_1/items") == ("GET", "POST")
    assert allowed_methods("/v1/conversations/conv_1/items/msg_1") == ("GET", "DELETE")
    with pytest.raises(GatewayError) as e:
        check_request_line("PUT", "/v1/conversations/conv_1", has_body=True)
    assert e.value.status == 405 and dict(e.value.headers)["allow"] == "GET, POST, DELETE"
    for other in ("/v1/conversations/", "/v1/conversations/conv_1/items/", "/v1/Conversations/conv_1"):
        with pytest.raises(GatewayError) as e:
            check_request_line("GET", other, has_body=False)
        assert e.value.status == 404  # never passed on to a backend that may read it as its own


def test_create_retrieve_update_delete(gateway):
    store = Store()
    status, conv = call(gateway, store, "POST", "/v1/conversations",
                        {"metadata": {"topic": "trip"}, "items": [{"role": "user", "content": "hello"}]})
    assert status == 200 and conv["object"] == "conversation" and conv["id"].startswith("conv_")
    assert conv["metadata"] == {"topic": "trip"} and isinstance(conv["created_at"], int)
    cid = conv["id"]
    assert call(gateway, store, "GET", f"/v1/conversations/{cid}") == (200, conv)
    status, updated = call(gateway, store, "POST", f"/v1/conversations/{cid}", {"metadata": {"topic": "food"}})
    assert (status, updated) == (200, {**conv, "metadata": {"topic": "food"}})
    assert call(gateway, store, "DELETE", f"/v1/conversations/{cid}") == (
        200, {"id": cid, "object": "conversation.deleted", "deleted": True})
    status, err = call(gateway, store, "GET", f"/v1/conversations/{cid}")
    assert status == 404 and err["error"]["message"] == f"Conversation with id '{cid}' not found."


def test_another_tenant_sees_an_unknown_id_on_every_path(gateway):
    store = Store()
    _, conv = call(gateway, store, "POST", "/v1/conversations", {"items": [{"role": "user", "content": "x"}]})
    cid = conv["id"]
    _, items = call(gateway, store, "GET", f"/v1/conversations/{cid}/items")
    item_id = items["data"][0]["id"]
    before = dict(store)
    for method, path, body in (("GET", f"/v1/conversations/{cid}", None),
                               ("POST", f"/v1/conversations/{cid}", {"metadata": {}}),
                               ("DELETE", f"/v1/conversations/{cid}", None),
                               ("GET", f"/v1/conversations/{cid}/items", None),
                               ("POST", f"/v1/conversations/{cid}/items", {"items": [{"role": "user", "content": "y"}]}),
                               ("GET", f"/v1/conversations/{cid}/items/{item_id}", None),
                               ("DELETE", f"/v1/conversations/{cid}/items/{item_id}", None),
                               ("POST", "/v1/responses", {"model": "llama-3", "input": "z", "conversation": cid})):
        status, err = call(gateway, store, method, path, body, key="k2")
        assert (status, err["error"]["code"]) == (404, "conversation_not_found"), (method, path)
    assert store == before  # nothing of the owner's changed


def test_items_pages_as_the_api_documents(gateway):
    store = Store()
    _, conv = call(gateway, store, "POST", "/v1/conversations",
                   {"items": [{"role": "user", "content": f"m{n}"} for n in range(3)]})
    cid = conv["id"]
    status, added = call(gateway, store, "POST", f"/v1/conversations/{cid}/items",
                         {"items": [{"role": "assistant", "content": "m3"}, {"role": "user", "content": "m4"}]})
    assert status == 200 and added["object"] == "list" and len(added["data"]) == 2 and added["has_more"] is False
    assert added["data"][0]["content"] == [{"type": "output_text", "text": "m3", "annotations": []}]

    def texts(page: dict) -> list[str]:
        return [i["content"][0]["text"] for i in page["data"]]

    _, page = call(gateway, store, "GET", f"/v1/conversations/{cid}/items")
    assert texts(page) == ["m4", "m3", "m2", "m1", "m0"] and page["has_more"] is False  # desc by default
    _, page = call(gateway, store, "GET", f"/v1/conversations/{cid}/items?order=asc&limit=2")
    assert texts(page) == ["m0", "m1"] and page["has_more"] is True
    _, page = call(gateway, store, "GET", f"/v1/conversations/{cid}/items?order=asc&limit=2&after={page['last_id']}")
    assert texts(page) == ["m2", "m3"] and page["has_more"] is True
    one = page["data"][0]
    assert call(gateway, store, "GET", f"/v1/conversations/{cid}/items/{one['id']}") == (200, one)
    status, after_delete = call(gateway, store, "DELETE", f"/v1/conversations/{cid}/items/{one['id']}")
    assert (status, after_delete) == (200, conv)  # the conversation, as OpenAI's
    _, page = call(gateway, store, "GET", f"/v1/conversations/{cid}/items?order=asc")
    assert texts(page) == ["m0", "m1", "m3", "m4"]
    status, err = call(gateway, store, "GET", f"/v1/conversations/{cid}/items/{one['id']}")
    assert (status, err["error"]["code"]) == (404, "item_not_found")
    for query, param in (("limit=0", "limit"), ("limit=101", "limit"), ("order=up", "order")):
        status, err = call(gateway, store, "GET", f"/v1/conversations/{cid}/items?{query}")
        assert (status, err["error"]["param"]) == (400, param)


@pytest.mark.parametrize(("body", "param"), [
    ({"metadata": {f"k{n}": "v" for n in range(17)}}, "metadata"),
    ({"metadata": {"k" * 65: "v"}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata.k"),
    ({"metadata": {"k": 1}}, "metadata.k"),
    ({"metadata": "x"}, "metadata"),
    ({"items": [{"role": "user", "content": "x"}] * 21}, "items"),
    ({"items": "x"}, "items"),
    ({"items": [{"role": "user", "content": "x"}, "x"]}, "items[1]"),
    ({"items": [{"type": 7}]}, "items[0].type"),
    ({"title": "x"}, "title"),
])
def test_create_refusals(gateway, body, param):
    status, err = call(gateway, Store(), "POST", "/v1/conversations", body)
    assert (status, err["error"]["param"]) == (400, param)


def test_added_items_are_refused_by_their_own_name(gateway):
    """A bad item of `POST .../items` is named `items[n]`, the call's parameter, not a turn's `input`."""
    store = Store()
    _, conv = call(gateway, store, "POST", "/v1/conversations")
    status, err = call(gateway, store, "POST", f"/v1/conversations/{conv['id']}/items",
                       {"items": [{"role": "user", "content": "fine"}, ["not", "an", "item"]]})
    assert (status, err["error"]["param"], err["error"]["type"]) == (400, "items[1]", "invalid_request_error")
    assert call(gateway, store, "GET", f"/v1/conversations/{conv['id']}/items")[1]["data"] == []  # nothing added


def test_metadata_at_its_limits_is_accepted(gateway):
    metadata = {f"{n:02d}" + "k" * 62: "v" * 512 for n in range(16)}
    status, conv = call(gateway, Store(), "POST", "/v1/conversations", {"metadata": metadata})
    assert status == 200 and conv["metadata"] == metadata


def test_update_needs_metadata_and_items_need_items(gateway):
    store = Store()
    _, conv = call(gateway, store, "POST", "/v1/conversations")
    assert conv["metadata"] == {}
    assert call(gateway, store, "POST", f"/v1/conversations/{conv['id']}")[0] == 400
    status, err = call(gateway, store, "POST", f"/v1/conversations/{conv['id']}/items", {"items": []})
    assert (status, err["error"]["code"]) == (400, "missing_required_parameter")


def test_a_store_outage_is_a_503(gateway):
    ex = Exchange(gateway)
    step = ex.request_headers({":method": "GET", ":path": "/v1/conversations/conv_1", "authorization": "Bearer k"}, True)
    with pytest.raises(GatewayError) as e:
        step.then(None)
    assert (e.value.status, e.value.code) == (503, "state_unavailable")



def test_an_item_id_is_held_once(gateway):
    """OpenAI's rule: an item whose id the conversation holds already, or that a call gives twice, is a
    400 ("Duplicate item found with id ..."), on create, on adding items and on a turn's input; the
    conversation stays as it was and nothing reaches a backend."""
    store = Store()
    twice = [{"id": "msg_1", "role": "user", "content": "a"}, {"id": "msg_1", "role": "user", "content": "b"}]
    status, err = call(gateway, store, "POST", "/v1/conversations", {"items": twice})
    assert (status, err["error"]["param"]) == (400, "items")
    assert err["error"]["message"] == ("Duplicate item found with id msg_1. Remove duplicate items from your input "
                                       "and try again.")
    _, conv = call(gateway, store, "POST", "/v1/conversations", {"items": twice[:1]})
    cid = conv["id"]
    status, err = call(gateway, store, "POST", f"/v1/conversations/{cid}/items", {"items": twice[1:]})
    assert (status, err["error"]["param"]) == (400, "items")
    status, err = call(gateway, store, "POST", "/v1/responses",
                       {"model": "llama-3", "conversation": cid, "input": [{**twice[1], "type": "message"}]})
    assert (status, err["error"]["param"], err["error"]["type"]) == (400, "input", "invalid_request_error")
    _, page = call(gateway, store, "GET", f"/v1/conversations/{cid}/items")
    assert [i["content"][0]["text"] for i in page["data"]] == ["a"]
    status, added = call(gateway, store, "POST", f"/v1/conversations/{cid}/items",
                         {"items": [{"id": "msg_2", "role": "user", "content": "b"}]})  # a new id is fine
    assert status == 200 and added["data"][0]["id"] == "msg_2"



def test_a_turn_that_would_pass_the_record_limit_is_refused_before_any_upstream():
    """state.max_record_bytes: a turn whose input already takes the conversation past it is a 400 (its
    answer could not be appended), like an items call that would; one that fits goes on."""
    small = Gateway(parse_config(CFG + "state: {max_record_bytes: 1024}\n", env={}))
    store = Store()
    _, conv = call(small, store, "POST", "/v1/conversations", {"items": [{"role": "user", "content": "x" * 500}]})
    status, err = call(small, store, "POST", "/v1/responses",
                       {"model": "llama-3", "conversation": conv["id"], "input": "y" * 600})
    assert (status, err["error"]["code"], err["error"]["param"]) == (400, "conversation_too_large", "input")
    status, err = call(small, store, "POST", f"/v1/conversations/{conv['id']}/items",
                       {"items": [{"role": "user", "content": "y" * 600}]})
    assert (status, err["error"]["code"]) == (400, "conversation_too_large")
    ex = Exchange(small)
    ex.request_headers({":method": "POST", ":path": "/v1/responses", "content-type": "application/json",
                        "authorization": "Bearer k1"}, False)
    act = store.run(ex.request_body(json.dumps({"model": "llama-3", "conversation": conv["id"],
                                                "input": "short"}).encode()))
    assert json.loads(act.body)["messages"][-1] == {"role": "user", "content": "short"}  # sent on


CHAT_ANSWER = {"id": "c", "created": 1, "model": "llama-3", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "Zed"}, "finish_reason": "stop"}]}


@pytest.mark.parametrize("conversation", ["id", "object"])
def test_a_turn_in_a_conversation_reads_its_items_and_appends_its_own(gateway, conversation):
    store = Store()
    _, conv = call(gateway, store, "POST", "/v1/conversations", {"items": [
        {"role": "user", "content": "I am Zed"}, {"role": "assistant", "content": "hi Zed"}]})
    cid = conv["id"]
    ex = Exchange(gateway)
    ex.request_headers({":method": "POST", ":path": "/v1/responses", "content-type": "application/json",
                        "authorization": "Bearer k1"}, False)
    ref = cid if conversation == "id" else {"id": cid}
    act = store.run(ex.request_body(json.dumps({"model": "llama-3", "input": "who am I?", "conversation": ref,
                                                "store": False}).encode()))
    sent = json.loads(act.body)
    assert "conversation" not in sent
    assert [(m["role"], m["content"]) for m in sent["messages"]] == [
        ("user", "I am Zed"), ("assistant", "hi Zed"), ("user", "who am I?")]
    ex.response_headers({":status": "200", "content-type": "application/json"})
    out = store.run(ex.response_body(json.dumps(CHAT_ANSWER).encode(), True))
    answer = json.loads(out.body)
    assert [k for k, _ in out.writes] == [conversation_key(ex.req.pinning.tenant, cid)]  # store: false, no turn
    record = Record.loads(store[conversation_key(ex.req.pinning.tenant, cid)])
    assert [i["type"] for i in record.items] == ["message"] * 4
    assert record.items[2]["content"] == [{"type": "input_text", "text": "who am I?"}]
    assert record.items[3] == answer["output"][0]


def test_conversation_refusals_on_responses(gateway):
    store = Store()
    _, conv = call(gateway, store, "POST", "/v1/conversations")
    for body, status, code in (
            ({"model": "llama-3", "input": "x", "conversation": conv["id"], "previous_response_id": "r1"},
             400, "mutually_exclusive_parameters"),
            ({"model": "llama-3", "input": "x", "conversation": 3}, 400, "invalid_value"),
            ({"model": "llama-3", "input": "x", "conversation": {"name": "x"}}, 400, "invalid_value"),
            ({"model": "llama-3", "input": "x", "conversation": "conv_unknown"}, 404, "conversation_not_found")):
        got, err = call(gateway, store, "POST", "/v1/responses", body)
        assert (got, err["error"]["code"], err["error"]["param"]) == (status, code, "conversation"), body


@pytest.mark.parametrize("stream", [False, True])
def test_a_responses_backend_gets_the_items_as_input_and_its_answer_is_appended(gateway, stream):
    store = Store()
    _, conv = call(gateway, store, "POST", "/v1/conversations", {"items": [{"role": "user", "content": "I am Zed"}]})
    cid = conv["id"]
    ex = Exchange(gateway)
    ex.request_headers({":method": "POST", ":path": "/v1/responses", "content-type": "application/json",
                        "authorization": "Bearer k1"}, False)
    act = store.run(ex.request_body(json.dumps({"model": "gpt-oss-1", "input": "who am I?", "conversation": cid,
                                                "stream": stream}).encode()))
    sent = json.loads(act.body)
    assert "conversation" not in sent and [i["content"][0]["text"] for i in sent["input"]] == ["I am Zed", "who am I?"]
    response = {"id": "resp_up", "object": "response", "status": "completed", "output": [
        {"type": "message", "id": "msg_up", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "Zed", "annotations": []}]}]}
    ctype = "text/event-stream" if stream else "application/json"
    ex.response_headers({":status": "200", "content-type": ctype})
    if stream:
        events = [{"type": "response.created", "response": {**response, "status": "in_progress", "output": []}},
                  {"type": "response.completed", "response": response}]
        raw = b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)
        chunks = [raw[:40], raw[40:]]
    else:
        raw = json.dumps(response).encode()
        chunks = [raw[:10], raw[10:]]
    first = store.run(ex.response_body(chunks[0], False))
    assert first.body is None and not first.done  # passed through untouched, read on the way
    last = store.run(ex.response_body(chunks[1], True))
    assert last.body is None and last.done
    record = Record.loads(store[conversation_key(ex.req.pinning.tenant, cid)])
    assert [i["content"][0]["text"] for i in record.items] == ["I am Zed", "who am I?", "Zed"]
    assert record.items[1]["id"] == sent["input"][1]["id"]  # the items as the backend saw them
    assert store[f"pin:{ex.req.pinning.tenant}:resp_up"]  # and its id pinned, as any stored answer

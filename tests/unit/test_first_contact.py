"""First contact from the upstream side, sans-IO: which answers become a retry, and what the retry does."""

from __future__ import annotations

import json

import orjson
import pytest

from extproc.config import parse_config
from extproc.exchange import BUFFERED, Exchange
from extproc.exchange.first_contact import FirstContact, first_attempt_key
from extproc.routing.gateway import Gateway

from .exchanges import answered

CFG = """
backends:
  - name: mixed
    api: auto
    models: ["m-*"]
    endpoints: ["127.0.0.1:8001"]
    path_prefix: /proxy
"""
CHAT_BODY = {"model": "m-1", "messages": [{"role": "user", "content": "hi"}]}
REJECTION = b'{"error": {"message": "This model is only supported in v1/responses and not in v1/chat/completions."}}'


def upstream_headers(attempt: int, **extra: str) -> dict[str, str]:
    return {":method": "POST", ":path": "/proxy/v1/chat/completions", "content-type": "application/json",
            "x-gateway-backend": "mixed", "x-request-id": "rid-1", "x-envoy-attempt-count": str(attempt),
            "x-gateway-first-contact": "tenant-a", **extra}


def probe(gateway: Gateway, status: int, body: bytes, store: dict[str, bytes]):
    fc = FirstContact(gateway)
    act = answered(fc.request_headers(upstream_headers(1), False), store)
    assert set(act.remove_headers) == {"x-gateway-first-contact", "x-gateway-backend", "x-gateway-cluster",
                                       "x-gateway-destination-endpoint"}  # never sent to the backend
    assert answered(fc.request_body(json.dumps(CHAT_BODY).encode()), store).body is None
    head = fc.response_headers({":status": str(status), "content-type": "application/json"})
    if head.done:
        return head
    assert head.response_body_mode == BUFFERED
    act = fc.response_body(body, True)
    store.update({k: v for k, v in act.writes if v is not None})
    return act


def test_a_rejection_naming_the_other_api_becomes_a_retry_and_a_learned_fact():
    gw, store = Gateway(parse_config(CFG, env={})), {}
    act = probe(gw, 400, REJECTION, store)
    assert act.done and act.body is None  # the answer itself is dropped by Envoy's retry
    assert ("x-gateway-retry", "responses") in act.set_headers
    assert json.loads(store["mode:mixed:m-1"])["mode"] == "responses"
    first = json.loads(store[first_attempt_key("rid-1")])
    assert first == {"api": "chat", "status": 400, "tenant": "tenant-a", "backend": "mixed",
                     "message": "This model is only supported in v1/responses and not in v1/chat/completions."}
    assert act.write_ttl == gw.config.state.learn_ttl_seconds


@pytest.mark.parametrize(("status", "body"), [(401, b'{"error": {"message": "use /v1/responses"}}'),
                                              (429, b'{"error": {"message": "slow down"}}'),
                                              (400, b'{"error": {"message": "messages must not be empty"}}'),
                                              (200, b'{}')])
def test_other_answers_pass_untouched(status, body):
    act = probe(Gateway(parse_config(CFG, env={})), status, body, {})
    assert act.done and not act.set_headers and not act.writes


def test_the_retry_is_translated_for_the_callers_tenant_and_its_failure_names_both_messages():
    gw, store = Gateway(parse_config(CFG, env={})), {}
    probe(gw, 400, REJECTION, store)
    fc = FirstContact(gw)
    headers = upstream_headers(2)
    for h in ("x-gateway-first-contact", "x-gateway-backend"):  # attempt 1 removed them from the request Envoy retries
        del headers[h]
    act = answered(fc.request_headers(headers, False), store)
    assert "x-gateway-first-contact" in act.remove_headers
    act = answered(fc.request_body(json.dumps(CHAT_BODY).encode()), store)
    sent = dict(act.set_headers)
    assert sent[":path"] == "/proxy/v1/responses" and not act.clear_route_cache
    assert orjson.loads(act.body)["input"][0]["content"] == "hi"
    assert fc.attempt.ex.req.pinning.tenant == "tenant-a"
    head = fc.response_headers({":status": "422", "content-type": "application/json"})
    assert ("x-gateway-retried-as", "responses") in head.set_headers
    out = fc.response_body(b'{"error": {"message": "input too long", "code": "too_long"}}', True)
    err = orjson.loads(out.body)["error"]
    assert err["code"] == "too_long"
    assert err["message"] == ("The model 'm-1' was tried on both APIs. /v1/chat/completions answered 400: This model "
                              "is only supported in v1/responses and not in v1/chat/completions.; /v1/responses "
                              "answered 422: input too long")


@pytest.mark.parametrize("record", ["older", "lost"])
def test_a_retry_whose_record_names_no_backend_still_takes_the_prefix_off_and_puts_it_back(record):
    """An older replica's record has no `backend`, a failed write none at all: the retry finds the client's
    path under a configured prefix, and the exchange, which resolves the backend itself, sends it prefixed."""
    other = '  - {name: other, api: auto, models: ["o-*"], endpoints: ["127.0.0.1:8003"], path_prefix: /other}\n'
    gw, store = Gateway(parse_config(CFG + other, env={})), {}
    probe(gw, 400, REJECTION, store)  # learned here, so known to this replica even when the write is lost
    key = first_attempt_key("rid-1")
    if record == "older":
        store[key] = orjson.dumps({k: v for k, v in json.loads(store[key]).items() if k != "backend"})
    else:
        del store[key], store["mode:mixed:m-1"]
    fc = FirstContact(gw)
    headers = {k: v for k, v in upstream_headers(2).items() if k not in ("x-gateway-first-contact", "x-gateway-backend")}
    head = answered(fc.request_headers(headers, False), store)
    assert head.immediate is None  # not answered at the headers
    act = answered(fc.request_body(json.dumps(CHAT_BODY).encode()), store)
    assert dict(act.set_headers)[":path"] == "/proxy/v1/responses"
    assert orjson.loads(act.body)["input"][0]["content"] == "hi"


def test_the_client_side_exchange_marks_first_contacts_and_reads_the_retried_answer():
    gw = Gateway(parse_config(CFG, env={}))
    ex = Exchange(gw)
    ex.request_headers({":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json",
                        "authorization": "Bearer k"}, False)
    act = answered(ex.request_body(json.dumps(CHAT_BODY).encode()), {})
    mark = dict(act.set_headers)["x-gateway-first-contact"]
    assert mark == gw.tenants.tenant_of({"authorization": "Bearer k"})
    head = ex.response_headers({":status": "200", "content-type": "application/json",
                                "x-gateway-retried-as": "responses"})
    assert ex.learned_fact == "needs_responses" and not head.writes  # the upstream side recorded it
    if not head.done:
        ex.response_body(orjson.dumps({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}), True)
    assert ex.usage is not None and ex.usage.output_tokens == 2


def test_a_first_contact_attempt_keeps_the_exchanges_phases():
    fc = FirstContact(Gateway(parse_config(CFG, env={})))
    with pytest.raises(RuntimeError, match="request_body before request_headers"):
        fc.request_body(b"{}")
    answered(fc.request_headers(upstream_headers(1), False), {})
    with pytest.raises(RuntimeError, match="response_body in phase request_body"):
        fc.response_body(b"", True)
    with pytest.raises(RuntimeError, match="request_headers twice"):
        fc.request_headers(upstream_headers(1), False)


RESPONSES_CFG = """
backends:
  - name: oai
    api: responses
    models: ["gpt-*"]
    endpoints: ["127.0.0.1:8002"]
"""
INVALID_URL = b'{"error": {"message": "Invalid URL (POST /v1/responses/compact)", "type": "invalid_request_error"}}'


def compact_probe(gw: Gateway, status: int, body: bytes, store: dict[str, bytes]):
    fc = FirstContact(gw)
    headers = {**upstream_headers(1), ":path": "/v1/responses/compact", "x-gateway-backend": "oai"}
    answered(fc.request_headers(headers, False), store)
    answered(fc.request_body(json.dumps({"model": "gpt-5", "input": "hi"}).encode()), store)
    if fc.response_headers({":status": str(status), "content-type": "application/json"}).done:
        return None
    act = fc.response_body(body, True)
    store.update({k: v for k, v in act.writes if v is not None})
    return act


def test_a_compact_endpoint_missing_becomes_a_retry_as_a_trigger_turn_and_is_learned():
    gw, store = Gateway(parse_config(RESPONSES_CFG, env={})), {}
    act = compact_probe(gw, 404, INVALID_URL, store)
    assert act.done and ("x-gateway-retry", "responses") in act.set_headers
    assert json.loads(store["mode:oai:gpt-5"]) == {"mode": None, "ok": [], "lacks": ["/v1/responses/compact"]}
    fc = FirstContact(gw)
    headers = {**upstream_headers(2), ":path": "/v1/responses/compact"}
    for h in ("x-gateway-first-contact", "x-gateway-backend"):
        del headers[h]
    answered(fc.request_headers(headers, False), store)
    act = answered(fc.request_body(json.dumps({"model": "gpt-5", "input": "hi", "prompt_cache_retention": "24h"}).encode()),
                  store)
    assert dict(act.set_headers)[":path"] == "/v1/responses"
    assert orjson.loads(act.body) == {"model": "gpt-5", "store": False,
                                      "input": [{"role": "user", "content": "hi"}, {"type": "compaction_trigger"}]}
    fc.response_headers({":status": "200", "content-type": "application/json"})
    answer = fc.response_body(orjson.dumps({"id": "resp_1", "created_at": 5, "output": [
        {"type": "compaction", "id": "cmp_1", "encrypted_content": "x"}], "usage": None}), True)
    doc = orjson.loads(answer.body)
    assert doc["object"] == "response.compaction" and doc["id"] == "resp_1" and doc["created_at"] == 5
    assert [o["type"] for o in doc["output"]] == ["message", "compaction"] and doc["output"][1]["id"] == "cmp_1"
    assert doc["usage"]["total_tokens"] == 0


@pytest.mark.parametrize(("status", "body"), [(404, b'{"error": {"message": "The model gpt-5 does not exist"}}'),
                                              (400, INVALID_URL), (401, INVALID_URL)])
def test_other_compact_rejections_pass_untouched(status, body):
    act = compact_probe(Gateway(parse_config(RESPONSES_CFG, env={})), status, body, {})
    assert act is None or (act.done and not act.set_headers and not act.writes)


def test_an_answer_without_one_compaction_item_is_a_502():
    from extproc.errors import GatewayError
    from extproc.translate.compact_trigger import CompactAsTurn

    pair = CompactAsTurn()
    pair.request({"model": "gpt-5", "input": "hi"})
    for output in ([], [{"type": "message"}], [{"type": "compaction"}, {"type": "compaction"}]):
        with pytest.raises(GatewayError) as e:
            pair.response({"output": output})
        assert e.value.status == 502

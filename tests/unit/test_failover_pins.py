"""A grouped model's turn that continues a response a stateful Responses backend stored (its pin), sans-IO:
only that backend can continue it, so it is never handed to the group's attempts, whichever backend the
pin names (a member, a backend outside the group, one no longer configured)."""

from __future__ import annotations

import json

import pytest

from extproc.config import parse_config
from extproc.errors import GatewayError
from extproc.exchange import Exchange
from extproc.routing.gateway import Gateway
from extproc.state import records as rec
from extproc.state.lookup import Lookup

CFG = """
backends:
  - name: chat-first
    api: chat
    models: ["g"]
    endpoints: ["10.0.0.1:8000"]
  - name: resp
    api: responses
    models: ["g"]
    endpoints: ["10.0.0.2:8000"]
  - name: outside
    api: responses
    models: ["o"]
    endpoints: ["10.0.0.5:8000"]
    api_key_env: OUTSIDE_KEY
"""
CLIENT = {":method": "POST", ":path": "/v1/responses", ":authority": "gw", "content-type": "application/json",
          "authorization": "Bearer client-key", "x-request-id": "rid"}


def _continue(pin: rec.Pin) -> tuple[Exchange, dict[str, str]]:
    """A Responses client's turn for model g continuing resp_1, pinned as given: the exchange and the
    headers it sets."""
    gw = Gateway(parse_config(CFG, env={"OUTSIDE_KEY": "sk-outside"}), tenant_secret=b"s" * 32)
    store = {rec.pin_key(gw.tenants.tenant_of(CLIENT), "resp_1"): pin.dumps()}
    ex = Exchange(gw)
    step = ex.request_headers(dict(CLIENT), False)
    for body in (None, json.dumps({"model": "g", "input": "so?", "previous_response_id": "resp_1"}).encode()):
        if body is not None:
            step = ex.request_body(body)
        while isinstance(step, Lookup):
            step = step.then([store.get(k) for k in step.keys])
    return ex, dict(step.set_headers)


def test_a_pin_to_a_member_goes_to_that_member_alone():
    ex, sets = _continue(rec.Pin("resp", "10.0.0.2:8000"))
    assert not ex.handed_over and sets["x-gateway-destination-endpoint"] == "10.0.0.2:8000"
    assert ":path" not in sets  # the member's own API: not translated for the chat primary


def test_a_pin_to_a_backend_outside_the_group_is_never_sent_to_a_member():
    """Its turn takes today's path: the model's backend (the chat primary) cannot continue it, so it is
    the clear 400 a model on a chat backend gets (tests/test_e2e_failover_more.py: with a Responses
    primary it goes to the holder); an attempt on a member would have carried the holder's key there."""
    with pytest.raises(GatewayError) as e:
        _continue(rec.Pin("outside", "10.0.0.5:8000"))
    assert (e.value.status, e.value.code) == (400, "previous_response_not_found")
    assert "'outside'" in e.value.message


@pytest.mark.parametrize("pin", [rec.Pin("resp", "10.0.0.9:8000"), rec.Pin("removed", "10.0.0.7:8000")],
                         ids=["instance removed", "backend removed"])
def test_a_pin_to_what_is_no_longer_configured_is_a_409_even_with_a_chat_primary(pin):
    with pytest.raises(GatewayError) as e:
        _continue(pin)
    assert (e.value.status, e.value.code) == (409, "pinned_backend_gone")
    assert "resp_1" in e.value.message and f"backend '{pin.backend}'" in e.value.message

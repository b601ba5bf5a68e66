"""The sans-IO conversation records and the API shapes built from them."""

from __future__ import annotations

import json

import pytest

from extproc.errors import GatewayError
from extproc.state import records as conv


def test_input_items_are_typed_with_ids():
    items = conv.input_items([{"role": "assistant", "content": "x"}, {"type": "function_call_output",
                                                                    "call_id": "c", "output": "o"}])
    assert items[0]["content"] == [{"type": "output_text", "text": "x", "annotations": []}]
    assert items[0]["id"].startswith("msg_") and items[1]["id"].startswith("fco_")
    assert conv.input_items("") == []
    with pytest.raises(GatewayError):
        conv.input_items(5)


def test_pin_round_trip_and_garbage():
    pin = conv.Pin("b", "1.2.3.4:5")
    assert conv.Pin.loads(pin.dumps()) == pin
    assert conv.Pin.loads(b"nope") is None
    assert conv.load_turn(b"{}") is None and conv.load_turn(None) is None


def test_history_is_input_then_output_per_turn():
    t1 = json.loads(conv.turn_record({"output": [{"id": "o1"}]}, [{"id": "i1"}], [], None))
    t2 = json.loads(conv.turn_record({"output": [{"id": "o2"}]}, [{"id": "i2"}], ["r1"], None))
    assert [i["id"] for i in conv.history([t1, t2])] == ["i1", "o1", "i2", "o2"]
    assert conv.chain(t2, "r2") == ["r1", "r2"]


def test_input_items_page():
    items = [{"id": f"i{n}"} for n in range(5)]
    page = json.loads(conv.input_items_page(items, ""))
    assert [i["id"] for i in page["data"]] == ["i4", "i3", "i2", "i1", "i0"] and not page["has_more"]
    page = json.loads(conv.input_items_page(items, "order=asc&limit=2&after=i0"))
    assert [i["id"] for i in page["data"]] == ["i1", "i2"] and page["has_more"]
    assert (page["first_id"], page["last_id"]) == ("i1", "i2")
    for bad in ("order=up", "limit=0", "limit=x"):
        with pytest.raises(GatewayError):
            conv.input_items_page(items, bad)

"""Compaction on chat backends, sans-IO: sealing, reading items back, the summary request and answer."""

from __future__ import annotations

import pytest

from extproc.errors import GatewayError
from extproc.translate.compact import (
    SUMMARY_INSTRUCTIONS,
    SUMMARY_REQUEST,
    Sealer,
    chat_request,
    check_request,
    compaction_resource,
    derive_key,
    open_items,
)

KEY = bytes(range(32))


def test_sealed_summaries_open_only_for_their_tenant_and_key():
    sealer = Sealer(KEY)
    token = sealer.seal("the summary", "tenant-a")
    assert token.startswith("xpc1.") and "summary" not in token
    assert sealer.open(token, "tenant-a") == "the summary"
    assert sealer.seal("the summary", "tenant-a") != token  # a fresh nonce each time
    for bad in (lambda: sealer.open(token, "tenant-b"), lambda: Sealer(bytes(32)).open(token, "tenant-a"),
                lambda: sealer.open(token[:-2] + ("AA" if token[-2:] != "AA" else "BB"), "tenant-a"),
                lambda: sealer.open("xpc1.!!", "tenant-a"), lambda: sealer.open("xpc1.", "tenant-a")):
        with pytest.raises(GatewayError) as e:
            bad()
        assert (e.value.status, e.value.code) == (400, "invalid_encrypted_content")


def test_items_are_opened_in_place_and_foreign_ones_refused_only_for_chat():
    sealer = Sealer(KEY)
    ours = {"type": "compaction", "id": "cmp_1", "encrypted_content": sealer.seal("S", "")}
    foreign = {"type": "compaction", "encrypted_content": "gAAAA-backend"}
    user = {"role": "user", "content": "next"}
    assert open_items("text", sealer, "", True) is None and open_items([user], sealer, "", True) is None
    assert open_items([ours, user], sealer, "", True) == [
        {"type": "message", "role": "user", "content": "Summary of the earlier conversation (compacted):\n\nS"}, user]
    assert open_items([foreign, user], sealer, "", False) == [foreign, user]
    with pytest.raises(GatewayError, match="not produced by this gateway"):
        open_items([foreign], sealer, "", True)


def test_the_summary_request_carries_the_conversation_between_its_instructions():
    items = [{"type": "message", "role": "user", "content": "a"}, {"type": "message", "role": "assistant", "content": "b"}]
    req = chat_request({"model": "m", "instructions": "be kind", "prompt_cache_key": "k"}, items, "max_tokens")
    assert req == {"model": "m", "prompt_cache_key": "k", "messages": [
        {"role": "system", "content": SUMMARY_INSTRUCTIONS}, {"role": "system", "content": "be kind"},
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": SUMMARY_REQUEST}]}


def test_the_answer_keeps_user_messages_and_seals_the_summary():
    sealer = Sealer(KEY)
    user = {"type": "message", "role": "user", "id": "msg_1", "content": [{"type": "input_text", "text": "a"}]}
    items = [user, {"type": "message", "role": "assistant", "content": "b"}]
    chat = {"choices": [{"message": {"role": "assistant", "content": "SUMMARY"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    out = compaction_resource(chat, items, sealer, "t")
    assert out["object"] == "response.compaction" and out["id"].startswith("resp_")
    assert out["output"][0] == user and len(out["output"]) == 2
    assert sealer.open(out["output"][1]["encrypted_content"], "t") == "SUMMARY"
    assert out["usage"]["input_tokens"] == 5 and out["usage"]["total_tokens"] == 7
    with pytest.raises(GatewayError) as e:
        compaction_resource({"choices": [{"message": {"content": "  "}}]}, items, sealer, "t")
    assert e.value.status == 502


@pytest.mark.parametrize(("body", "param"), [({"model": "m", "stream": True}, "stream"),
                                             ({"model": "m", "instructions": 3}, "instructions")])
def test_compact_bodies_are_checked(body, param):
    with pytest.raises(GatewayError) as e:
        check_request(body)
    assert e.value.status == 400 and e.value.param == param


def test_the_key_is_derived_from_the_deployment_secret():
    assert derive_key(b"secret") == derive_key(b"secret") != derive_key(b"other")
    token = Sealer(derive_key(b"secret")).seal("S", "t")
    assert Sealer(derive_key(b"secret")).open(token, "t") == "S"
    with pytest.raises(GatewayError):
        Sealer(derive_key(b"other")).open(token, "t")

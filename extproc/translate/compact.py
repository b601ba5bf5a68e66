"""`POST /v1/responses/compact` on a chat-only backend, and reading its items back (sans-IO).

A Responses backend compacts by itself (the request passes through). A chat backend cannot, so the
sidecar asks the model for a summary of the conversation with one chat completion, and answers with
a `response.compaction` object: the conversation's user messages, then one `compaction` item whose
`encrypted_content` is the summary sealed with AES-GCM under the deployment's key, with the tenant
as associated data. When a later request carries that item in `input`, the sidecar opens it and
sends the summary in its place; a client cannot read it, forge one, or use another tenant's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from extproc.api import CHAT, COMPACT_PATH, RESPONSES
from extproc.config import Backend
from extproc.errors import GatewayError, invalid
from extproc.state.records import input_items
from extproc.translate.common import new_id, now
from extproc.translate.pairs import Answer, StreamTranslator
from extproc.translate.req_responses_to_chat import translate_request
from extproc.translate.wire import ChatCompletion, ChatUsage, convert

PATH = COMPACT_PATH
TOKEN_PREFIX = "xpc1."  # sealed by this gateway (format version 1); other items belong to the backend
_AD_PREFIX = b"extproc-compaction-v1\x00"
_NONCE = 12
FIELDS = ("model", "input", "previous_response_id", "instructions", "prompt_cache_key", "service_tier",
          # cache and image-context hints with no chat equivalent: accepted, not forwarded
          "prompt_cache_retention", "prompt_cache_options", "image")
SUMMARY_INSTRUCTIONS = (
    "You compact a conversation so it can continue in a smaller context. Write a summary that lets the "
    "assistant carry on without the original messages: the user's goals and constraints, decisions made, "
    "facts and results established (file names, commands, values, tool results), work done and what is "
    "still open. Be complete and specific; do not add anything that was not in the conversation.")
SUMMARY_REQUEST = "Summarise the conversation above as instructed. Answer with the summary only."
SUMMARY_INTRO = "Summary of the earlier conversation (compacted):\n\n"


def derive_key(deployment_secret: bytes) -> bytes:
    """The AES-256 key, from the deployment's secret (the tenancy secret, shared by its replicas)."""
    return hmac.new(deployment_secret, b"extproc compaction key v1", hashlib.sha256).digest()


class Sealer:
    """AES-256-GCM over compaction summaries, bound to a tenant (associated data)."""

    def __init__(self, key: bytes):
        self._aead = AESGCM(key)

    def seal(self, summary: str, tenant: str) -> str:
        nonce = os.urandom(_NONCE)
        sealed = self._aead.encrypt(nonce, summary.encode(), _AD_PREFIX + tenant.encode())
        return TOKEN_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def open(self, token: str, tenant: str) -> str:
        """The summary; a 400 when the token was not sealed by this deployment for this tenant."""
        try:
            raw = base64.urlsafe_b64decode(token.removeprefix(TOKEN_PREFIX) + "==")
            return self._aead.decrypt(raw[:_NONCE], raw[_NONCE:], _AD_PREFIX + tenant.encode()).decode()
        except (binascii.Error, ValueError, InvalidTag):
            raise GatewayError(400, "This compaction item cannot be read: it was not produced by this gateway for "
                                    "this account, or it was altered", param="input",
                               code="invalid_encrypted_content") from None


def is_sealed_here(item: Any) -> bool:
    return (isinstance(item, dict) and item.get("type") == "compaction"
            and isinstance(item.get("encrypted_content"), str) and item["encrypted_content"].startswith(TOKEN_PREFIX))


def open_items(inp: Any, sealer: Sealer, tenant: str, chat_backend: bool) -> list[Any] | None:
    """`input` with this gateway's compaction items replaced by their summaries, or None when it has
    none. A chat backend cannot read anybody else's compaction items: those are refused."""
    if not isinstance(inp, list) or not any(isinstance(i, dict) and i.get("type") == "compaction" for i in inp):
        return None
    out: list[Any] = []
    for n, item in enumerate(inp):
        if is_sealed_here(item):
            out.append({"type": "message", "role": "user",
                        "content": SUMMARY_INTRO + sealer.open(item["encrypted_content"], tenant)})
        elif isinstance(item, dict) and item.get("type") == "compaction" and chat_backend:
            raise invalid(f"input[{n}]", "this compaction item was not produced by this gateway, and the model's "
                                         "backend cannot read it")
        else:
            out.append(item)
    return out


def check_request(body: dict[str, Any]) -> None:
    """The compact body's own fields (CompactResponseMethodPublicBody); the model is checked by the caller."""
    for key in body:
        if key not in FIELDS:
            raise GatewayError(400, f"Unknown parameter: '{key}'.", param=key, code="unknown_parameter")
    for key in ("instructions", "prompt_cache_key", "service_tier"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise invalid(key, "expected a string")


def chat_request(body: dict[str, Any], items: list[dict[str, Any]], max_tokens_field: str) -> dict[str, Any]:
    """The chat completion that writes the summary of `items` (the whole conversation, earlier turns
    included); the client's own instructions go first, as context."""
    head = [{"type": "message", "role": "system", "content": body["instructions"]}] if body.get("instructions") else []
    convo = {"model": body["model"], "instructions": SUMMARY_INSTRUCTIONS,
             "input": [*head, *items, {"type": "message", "role": "user", "content": SUMMARY_REQUEST}]}
    for key in ("prompt_cache_key", "service_tier"):
        if body.get(key):
            convo[key] = body[key]
    return translate_request(convo, max_tokens_field=max_tokens_field)


def compaction_resource(chat: dict[str, Any], items: list[dict[str, Any]], sealer: Sealer,
                        tenant: str) -> dict[str, Any]:
    """The client's answer to a successful summary completion: a `response.compaction` object."""
    answer = convert(chat, ChatCompletion, "body")
    message = answer.choices[0].message if answer.choices else None
    summary = message.content if message is not None else None
    if not isinstance(summary, str) or not summary.strip():
        raise GatewayError(502, "the upstream returned no summary text for the compaction", code="bad_upstream_response")
    kept = [i for i in items if i.get("type") == "message" and i.get("role") == "user"]
    compaction = {"type": "compaction", "id": new_id("cmp_"), "encrypted_content": sealer.seal(summary, tenant)}
    usage = (answer.usage or ChatUsage()).as_responses()  # zeros when none came
    return {"id": new_id("resp_"), "object": "response.compaction", "created_at": now(),
            "output": [*kept, compaction], "usage": usage}


@dataclass(slots=True)
class CompactOnChat:
    """`/v1/responses/compact` for a chat-only model: one chat completion writes the summary.
    The conversation (earlier held turns included) arrives merged into `input`, like any Responses turn."""

    backend: Backend
    sealer: Sealer
    tenant: str
    client_api: str = RESPONSES
    upstream_api: str = CHAT
    dropped_tools: list[str] = field(default_factory=list)
    dropped_fields: list[str] = field(default_factory=list)
    items: list[dict[str, Any]] = field(default_factory=list)  # the conversation summarised

    def request(self, body: dict[str, Any]) -> dict[str, Any]:
        self.items = input_items(body.get("input"))
        return chat_request(body, self.items, self.backend.chat_max_tokens_field)

    def response(self, doc: dict[str, Any]) -> Answer:
        return Answer(compaction_resource(doc, self.items, self.sealer, self.tenant))

    def stream(self) -> StreamTranslator:
        raise GatewayError(400, "compaction answers are not streamed", code="unsupported_parameter")

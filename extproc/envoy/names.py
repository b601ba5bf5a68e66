"""Every name the sidecar shares with Envoy, in one place, and the Envoy filter rules made from them.

Pure data (no gRPC): the headers the processor sets or reads for Envoy's routes, the dynamic-metadata
namespace and keys (written by `json_to_metadata` and `sse_to_metadata`, read by the compiled routes,
the access log and the access-log service), and the statuses that may teach a model's API.
`deploy/envoy.yaml` holds the rules `json_to_metadata_rules` and `sse_to_metadata_rules` return, as
data; tests/unit/test_envoy_names.py checks it does, and `extproc envoy-rules` prints them to paste.
"""

from __future__ import annotations

import re
from typing import Any

from extproc.api import PATHS

# Headers the sidecar sets for Envoy's route table; client-sent copies are always removed.
H_BACKEND = "x-gateway-backend"
H_CLUSTER = "x-gateway-cluster"
H_ENDPOINT = "x-gateway-destination-endpoint"
ROUTING_HEADERS = (H_BACKEND, H_CLUSTER, H_ENDPOINT)
# A background response's stream, sent to the sidecar's front door: the sealed ticket naming it (client
# copies are removed at the edge, like every header of the gateway's).
H_FOLLOW = "x-gateway-follow"
# First contact with a model of unknown API (exchange/first_contact.py): the request's mark (its value
# the caller's tenant), the first attempt's "retry on this API", the retry's "translated to this API".
H_FIRST_CONTACT, H_RETRY, H_RETRIED = "x-gateway-first-contact", "x-gateway-retry", "x-gateway-retried-as"
# gRPC metadata of the upstream filter's streams (the endpoints_first_contact cluster), and its value.
ROLE_METADATA, FIRST_CONTACT_ROLE = "x-extproc-role", "first-contact"
TENANT_HEADER = "x-gateway-tenant"  # the header tenancy.header conventionally names; deploy/envoy.yaml strips it
# (with a `clients` section Envoy's key check sets it: extproc/clients.lua), and the key check's mark on a
# request it refuses, which the compiled routes send to a route without the processor.
REFUSED_HEADER = "x-gateway-refused"
MODE_HEADER = "x-gateway-model-mode"  # a client's per-request mode override, when discovery.allow_mode_header
# Headers that place a session on one instance: the processor's ring and the fast path's hash policy.
SESSION_HEADERS = ("session-id", "x-session-id", "conversation-id", "thread-id")

# The API paths (query string allowed) whose JSON bodies json_to_metadata reads; every other path skips it.
API_PATH_REGEX = "/v1/(" + "|".join(re.escape(p.removeprefix("/v1/")) for p in PATHS.values()) + r")(\?.*)?"

NAMESPACE = "llm_gateway"  # dynamic metadata: Envoy's filters write it, the processor too (metadata_options)

# Upstream statuses whose body may say the model needs the other API (routing.modes.rejection_needs).
LEARNABLE_STATUSES = (400, 404, 405, 422)


class Key:
    """Keys in NAMESPACE (plain strings: they are dict keys orjson and protobuf take as they are)."""

    MODEL = "model"
    STREAM = "stream"
    INCLUDE_USAGE = "include_usage"
    STORE = "store"
    PREVIOUS_RESPONSE_ID = "previous_response_id"
    CONVERSATION = "conversation"
    INPUT_TOKENS = "input_tokens"
    OUTPUT_TOKENS = "output_tokens"
    CACHED_TOKENS = "cached_tokens"
    REASONING_TOKENS = "reasoning_tokens"
    CACHE_WRITE_TOKENS = "cache_creation_tokens"  # Anthropic's cache writes: input it counts apart
    USAGE_ESTIMATED = "usage_estimated"  # the processor's, like the three below
    CLIENT_API = "client_api"
    UPSTREAM_API = "upstream_api"
    BACKEND = "backend"
    TENANT = "tenant"  # Envoy's key check's (extproc/clients.lua), like the two below
    CLIENT = "client"  # the key's hash, for the models stage
    LIMITED = "limited"  # the tenant, when it has limits: the rate-limit filter's descriptor


Path = tuple[str, ...]

# The request body fields the compiled routes match on (`routing.needs.Facts` reads the same ones).
REQUEST_FIELDS: tuple[tuple[Path, str], ...] = (
    (("model",), Key.MODEL),
    (("stream",), Key.STREAM),
    (("stream_options", "include_usage"), Key.INCLUDE_USAGE),
    (("store",), Key.STORE),
    (("previous_response_id",), Key.PREVIOUS_RESPONSE_ID),
    (("conversation",), Key.CONVERSATION),
    (("conversation", "id"), Key.CONVERSATION),  # the object form
)
# Token usage inside a `usage` object, in each API's naming.
CHAT_USAGE: tuple[tuple[Path, str], ...] = (
    (("prompt_tokens",), Key.INPUT_TOKENS),
    (("completion_tokens",), Key.OUTPUT_TOKENS),
    (("prompt_tokens_details", "cached_tokens"), Key.CACHED_TOKENS),
    (("completion_tokens_details", "reasoning_tokens"), Key.REASONING_TOKENS),
)
RESPONSES_USAGE: tuple[tuple[Path, str], ...] = (
    (("input_tokens",), Key.INPUT_TOKENS),
    (("output_tokens",), Key.OUTPUT_TOKENS),
    (("input_tokens_details", "cached_tokens"), Key.CACHED_TOKENS),
    (("output_tokens_details", "reasoning_tokens"), Key.REASONING_TOKENS),
)
# Anthropic's Messages: cached input (read and written) apart from input_tokens (the access-log service
# adds it back, as OpenAI counts input).
MESSAGES_USAGE: tuple[tuple[Path, str], ...] = (
    (("input_tokens",), Key.INPUT_TOKENS),
    (("output_tokens",), Key.OUTPUT_TOKENS),
    (("cache_read_input_tokens",), Key.CACHED_TOKENS),
    (("cache_creation_input_tokens",), Key.CACHE_WRITE_TOKENS),
)
# JSON as the sidecar reads it (exchange/body.py: any case, structured `+json` types, space before the
# parameters): a spelling only the sidecar took would hide the model from the key check's models stage.
JSON_CONTENT_TYPES = r"(?i)application/([^;]*\+)?json\s*(;.*)?"
MAX_SSE_EVENT_BYTES = 8 * 1024 * 1024


def _rule(path: Path, key: str, kind: str) -> dict[str, Any]:
    return {"selectors": [{"key": p} for p in path],
            "on_present": {"metadata_namespace": NAMESPACE, "key": key, "type": kind}}


def json_to_metadata_rules() -> dict[str, Any]:
    """`request_rules` and `response_rules` of deploy/envoy.yaml's json_to_metadata filter: the request
    fields the routes match on, and a JSON answer's `usage` (any API's naming) for the access log."""
    usage = list(dict.fromkeys((*CHAT_USAGE, *RESPONSES_USAGE, *MESSAGES_USAGE)))  # Messages shares two
    return {
        "request_rules": {"allow_content_types_regex": {"regex": JSON_CONTENT_TYPES},
                          "rules": [_rule(path, key, "PROTOBUF_VALUE") for path, key in REQUEST_FIELDS]},
        "response_rules": {"allow_content_types_regex": {"regex": JSON_CONTENT_TYPES},
                           "rules": [_rule(("usage", *path), key, "NUMBER") for path, key in usage]},
    }


def model_reader_rules() -> dict[str, Any]:
    """`request_rules` of deploy/envoy.yaml's second json_to_metadata filter, on the other paths: the
    body's model alone, for the key check's models stage."""
    request = json_to_metadata_rules()["request_rules"]
    return {"request_rules": {**request, "rules": [r for r in request["rules"] if r["selectors"] == [{"key": "model"}]]}}


def sse_to_metadata_rules() -> dict[str, Any]:
    """`response_rules` of deploy/envoy.yaml's sse_to_metadata filter: a stream's usage, in the last chat
    chunk's `usage`, the Responses `response.completed` event's `response.usage`, or Anthropic's
    `message_start` (`message.usage`) and `message_delta` (`usage`, the later counts)."""
    rules = [*((("usage", *path), key) for path, key in CHAT_USAGE),
             *((("response", "usage", *path), key) for path, key in RESPONSES_USAGE),
             *((("message", "usage", *path), key) for path, key in MESSAGES_USAGE),
             *((("usage", *path), key) for path, key in MESSAGES_USAGE)]
    return {"max_event_size": MAX_SSE_EVENT_BYTES, "content_parser": {
        "name": "envoy.content_parsers.json",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.content_parsers.json.v3.JsonContentParser",
                         "rules": [{"rule": _rule(path, key, "NUMBER")} for path, key in rules]}}}

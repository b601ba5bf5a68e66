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

from extproc.api import MESSAGES, PATHS
from extproc.errors import ANTHROPIC_TYPES

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
# Failover across a model group's members (exchange/failover.py): the request's mark (its value the id of
# the record the attempts share), and the role of the endpoints_failover cluster's upstream filter.
H_FAILOVER, FAILOVER_ROLE = "x-gateway-failover", "failover"
# An attempt's mark on the answer it lets go to the client (not Envoy's own reply); deploy/envoy.yaml strips it.
H_ANSWERED = "x-gateway-answered"
# The role of the group cluster's second upstream filter, which holds a stream's headers until its first chunk.
HOLD_ROLE = "hold"
# The role of a fast-path group cluster's judge, which reads an error answer whole and judges it.
JUDGE_ROLE = "judge"
TENANT_HEADER = "x-gateway-tenant"  # the header tenancy.header conventionally names; deploy/envoy.yaml strips it
# (with a `clients` section Envoy's key check sets it: extproc/clients.lua), and the key check's mark on a
# request it refuses, which the compiled routes send to a route without the processor.
REFUSED_HEADER = "x-gateway-refused"
MODE_HEADER = "x-gateway-model-mode"  # a client's per-request mode override, when discovery.allow_mode_header
# Headers that place a session on one instance: the processor's ring and the fast path's hash policy.
# Claude Code names its session in x-claude-code-session-id (its metadata.user_id carries it too).
SESSION_HEADERS = ("session-id", "x-session-id", "conversation-id", "thread-id", "x-claude-code-session-id")

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
    MODEL_TWICE = "model_twice"  # deploy/envoy.yaml's Lua: the body may name `model` twice, no fast route
    INPUT_TOKENS = "input_tokens"
    OUTPUT_TOKENS = "output_tokens"
    CACHED_TOKENS = "cached_tokens"
    REASONING_TOKENS = "reasoning_tokens"
    CACHE_WRITE_TOKENS = "cache_creation_tokens"  # Anthropic's cache writes: input it counts apart
    USAGE_ESTIMATED = "usage_estimated"  # the processor's, like the three below
    CLIENT_API = "client_api"
    UPSTREAM_API = "upstream_api"
    BACKEND = "backend"
    ENVOY_COUNTS = "envoy_counts"  # the processor's mark: the access-log service counts this request (routing.needs)
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


# -- Envoy's own error replies in Anthropic's shape, for Messages clients (deploy/envoy.yaml's local_reply_config)

ORIGINAL_PATH_HEADER = "x-envoy-original-path"  # the path as the client sent it (deploy/envoy.yaml sets it first)
# The client's path: the one it sent, since the processor rewrites :path when it translates (a chat client on a
# Messages backend goes upstream on /v1/messages); :path where the filters never ran (a path Envoy could not
# normalise). Where the request's headers were never read (a malformed header) neither is known, and no
# Messages mapper matches: the reply keeps the OpenAI shape, whose `error.message` and `error.type` the
# Anthropic SDKs read as well.
MESSAGES_REQUEST_CEL = (f"(('{ORIGINAL_PATH_HEADER}' in request.headers) ? request.headers['{ORIGINAL_PATH_HEADER}'] "
                        f": request.path).startsWith('{PATHS[MESSAGES]}')")
# Anthropic's error type of the reply's status (the sidecar's table), as a CEL expression for Envoy's
# %CEL()% formatter.
ANTHROPIC_TYPE_CEL = " : ".join([*(f"response.code == {status} ? '{kind}'" for status, kind in
                                   sorted(ANTHROPIC_TYPES.items())),
                                 "response.code >= 500 ? 'api_error' : 'invalid_request_error'"])


def messages_local_reply(mapper: dict[str, Any]) -> dict[str, Any]:
    """The Messages twin of one of deploy/envoy.yaml's OpenAI-shaped local-reply mappers: the same condition
    on a Messages client's request, the same status and message, in Anthropic's error shape. The twins come
    first (the first mapper that matches answers), in the same order as the mappers they copy."""
    cel = mapper["filter"]["extension_filter"]["typed_config"]
    twin = {"filter": {"extension_filter": {**mapper["filter"]["extension_filter"], "typed_config": {
        **cel, "expression": f"{MESSAGES_REQUEST_CEL} && ({cel['expression']})"}}}}
    if "status_code" in mapper:
        twin["status_code"] = mapper["status_code"]
    message = mapper["body_format_override"]["json_format"]["error"]["message"]
    twin["body_format_override"] = {"json_format": {"type": "error", "error": {
        "type": f"%CEL({ANTHROPIC_TYPE_CEL})%", "message": message}}}
    return twin

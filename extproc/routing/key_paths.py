"""Which paths a backend's injected key is sent on (sans-IO).

A backend with `api_key_env` gets the gateway's key, and for a hosted provider that key may be an
organisation's admin key: files, batches, users, stored completions. So the key goes
only to the paths of the backend's API family that the sidecar routes (`/v1/chat/completions` for a
chat backend; `/v1/responses` and its resources for a Responses backend; both for `both`; `/v1/messages` and its
`count_tokens` for a Messages backend; all three for `auto`, whose Claude models speak Messages;
`/v1/conversations` and below for a backend that holds conversations (`conversations: passthrough`);
`/v1/models` for all), plus the `key_paths` the operator lists for the backend (`/v1/embeddings`, or
`/v1/files/*` for everything below `/v1/files`). Any other path to a keyed backend is a 404 in the
OpenAI shape and never reaches the upstream. A backend without a key gets the client's own
credential, on any path.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from extproc.api import AUTO, BOTH, CHAT, MESSAGES, PATHS, RESPONSES
from extproc.errors import GatewayError

if TYPE_CHECKING:  # the config validates key_paths with this module
    from extproc.config import Backend

log = logging.getLogger("extproc")

_RESPONSES_PATHS = (PATHS[RESPONSES], PATHS[RESPONSES] + "/*")  # compact, input_tokens, {id}, {id}/cancel ...
_MESSAGES_PATHS = (PATHS[MESSAGES], PATHS[MESSAGES] + "/*")  # count_tokens
_MODELS = ("/v1/models",)
_CONVERSATIONS = ("/v1/conversations", "/v1/conversations/*")  # a backend's own (`conversations: passthrough`)
_SEGMENT = re.compile(r"^[A-Za-z0-9._~-]+$")


def api_paths(backend: Backend) -> tuple[str, ...]:
    """The paths of the backend's API family the sidecar routes."""
    chat = (PATHS[CHAT],) if backend.api in (CHAT, BOTH, AUTO) else ()
    responses = _RESPONSES_PATHS if backend.api in (RESPONSES, BOTH, AUTO) else ()
    messages = _MESSAGES_PATHS if backend.api in (MESSAGES, AUTO) else ()
    conversations = _CONVERSATIONS if backend.holds_conversations else ()
    return (*chat, *responses, *conversations, *messages, *_MODELS)


def key_paths(backend: Backend) -> tuple[str, ...]:
    """Every path the backend's key is sent on (`extproc resolve` prints them)."""
    return (*api_paths(backend), *backend.key_paths)


def matches(entry: str, path: str) -> bool:
    """`/v1/embeddings` is that path exactly; `/v1/files/*` any path below `/v1/files`."""
    if entry.endswith("/*"):
        return path.startswith(entry[:-1]) and len(path) > len(entry) - 1
    return path == entry


def key_allowed(backend: Backend, path: str) -> bool:
    bare = path.partition("?")[0]
    return not backend.api_key or any(matches(entry, bare) for entry in key_paths(backend))


def check_key_path(backend: Backend, method: str, path: str) -> None:
    """Refuse a request that would carry the backend's key to a path it does not go to (`path` as the
    upstream gets it, before the backend's `path_prefix`)."""
    if key_allowed(backend, path):
        return
    bare = path.partition("?")[0]
    log.info("backend=%s: %s %s refused: not a path its key is sent on (list it in key_paths to allow it)",
             backend.name, method, bare)
    raise GatewayError(404, f"Invalid URL ({method} {bare})", code="invalid_url")


def key_path_problem(entry: str) -> str | None:
    """Why a `key_paths` entry is not a path as Envoy hands it over (normalised), or None."""
    body = entry[:-2] if entry.endswith("/*") else entry
    segments = body.split("/")
    if not body.startswith("/") or len(segments) < 2 or not all(_SEGMENT.match(s) for s in segments[1:]):
        return "must be a normalised path such as /v1/embeddings, or /v1/files/* for every path below one"
    if any(s in (".", "..") for s in segments):
        return "must not hold '.' or '..' segments"
    return None

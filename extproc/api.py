"""The API families and their paths: one definition for every module."""

from __future__ import annotations

CHAT, RESPONSES = "chat", "responses"
MESSAGES = "messages"  # Anthropic's Messages API: a client API and a backend API, translated to and from both
BOTH = "both"  # a model that answers on either API
AUTO = "auto"  # a backend's models whose API nobody has said: sent on the client's API, and watched
API_MODES = (CHAT, RESPONSES, BOTH, MESSAGES)  # what a model can be declared or resolved to
BACKEND_APIS = (*API_MODES, AUTO)

PATHS = {CHAT: "/v1/chat/completions", RESPONSES: "/v1/responses", MESSAGES: "/v1/messages"}
API_OF_PATH = {path: api for api, path in PATHS.items()}
COMPACT_PATH = PATHS[RESPONSES] + "/compact"  # compaction by its dedicated endpoint (some backends lack it)


def api_of(path: str) -> str | None:
    """The API family whose shape a request's errors take: its own API path or a sub-path of one
    (`/v1/messages/count_tokens`, `/v1/responses/{id}`)."""
    bare = path.partition("?")[0]
    return next((api for api, prefix in PATHS.items() if bare == prefix or bare.startswith(prefix + "/")), None)


def other(api: str) -> str:
    """The other API family."""
    return RESPONSES if api == CHAT else CHAT

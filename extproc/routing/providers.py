"""What differs between hosted providers, as data: how each takes its key, where its paths start, which
APIs it serves. The rest of the code reads a row of this table; it never asks which provider it is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from extproc.api import CHAT, RESPONSES

if TYPE_CHECKING:
    from extproc.config.model import Backend


@dataclass(frozen=True)
class Provider:
    name: str
    auth_header: str  # the request header that carries the key
    auth_scheme: str  # what comes before the key in it ("Bearer " or nothing)
    apis: tuple[str, ...]  # the APIs it serves: a backend declared otherwise is a config error
    path_prefix: str = ""  # before /v1/... on every request (after the url's own path)
    # Azure's classic shape, used when the backend gives `api_version`: each API's path, {deployment}
    # standing for the model's deployment; the api-version query is added to it.
    versioned_paths: tuple[tuple[str, str], ...] = ()

    def credential(self, key: str) -> tuple[str, str]:
        """The header that carries `key`, as this provider wants it."""
        return self.auth_header, self.auth_scheme + key


OPENAI = Provider("openai", "authorization", "Bearer ", (CHAT, RESPONSES))
PROVIDERS = {p.name: p for p in (
    OPENAI,  # also every OpenAI-compatible server reached by URL: OpenRouter, Groq, Together, vLLM behind TLS
    Provider("azure", "api-key", "", (CHAT, RESPONSES), path_prefix="/openai", versioned_paths=(
        (CHAT, "/openai/deployments/{deployment}/chat/completions"), (RESPONSES, "/openai/responses"))),
)}


def provider_of(name: str | None) -> Provider:
    """The row for a backend's `provider:` (OpenAI's shape when none is given)."""
    return PROVIDERS.get(name or OPENAI.name, OPENAI)


def credential_header(backend: Backend) -> tuple[str, str] | None:
    """The header carrying the sidecar's key to `backend` (None: it has none, or none is set)."""
    if not backend.api_key:
        return None
    return provider_of(backend.hosted.provider if backend.hosted else None).credential(backend.api_key)

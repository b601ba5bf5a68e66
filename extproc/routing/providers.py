"""What differs between hosted providers, as data: how each takes its key, where its paths start, which
APIs it serves. The rest of the code reads a row of this table; it never asks which provider it is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from extproc.api import CHAT, MESSAGES, RESPONSES

if TYPE_CHECKING:
    from extproc.config.model import Backend


@dataclass(frozen=True)
class Provider:
    name: str
    auth_header: str  # the request header that carries the key
    auth_scheme: str  # what comes before the key in it ("Bearer " or nothing)
    apis: tuple[str, ...]  # the APIs it serves: a backend declared otherwise is a config error
    path_prefix: str = ""  # before /v1/... on every request (after the url's own path)
    # Azure's classic shape, used when the backend gives `api_version`: the OpenAI paths scoped to a
    # deployment ({deployment} the model's), `/v1` of every other path replaced by `versioned_root`,
    # and the api-version query added.
    versioned_paths: tuple[tuple[str, str], ...] = ()
    versioned_root: str = ""

    def credential(self, key: str) -> tuple[str, str]:
        """The header that carries `key`, as this provider wants it."""
        return self.auth_header, self.auth_scheme + key


OPENAI = Provider("openai", "authorization", "Bearer ", (CHAT, RESPONSES))
# Anthropic's Messages API, wherever it is served (api: messages, a Claude model of an auto backend): the key
# as x-api-key, and the API's one version, which the processor sends on every request it makes there.
ANTHROPIC = Provider("anthropic", "x-api-key", "", (MESSAGES,))
ANTHROPIC_VERSION = "2023-06-01"
PROVIDERS = {p.name: p for p in (
    OPENAI,
    ANTHROPIC,  # also every OpenAI-compatible server reached by URL: OpenRouter, Groq, Together, vLLM behind TLS
    Provider("azure", "api-key", "", (CHAT, RESPONSES), path_prefix="/openai", versioned_root="/openai",
             versioned_paths=(("/v1/chat/completions", "/openai/deployments/{deployment}/chat/completions"),
                              ("/v1/embeddings", "/openai/deployments/{deployment}/embeddings"))),
)}


def provider_of(name: str | None) -> Provider:
    """The row for a backend's `provider:` (OpenAI's shape when none is given)."""
    return PROVIDERS.get(name or OPENAI.name, OPENAI)


def envoy_holds_key(backend: Backend) -> bool:
    """Envoy puts this backend's key on its requests itself: a `url:` backend, whose cluster the sidecar
    compiles with the key as an SDS secret (the processor adds no key of its own there)."""
    return backend.hosted is not None and backend.api_key is not None


def credential_header(backend: Backend, api: str | None = None) -> tuple[str, str] | None:
    """The header carrying the sidecar's key to `backend` for a request on `api` (None: the backend's own
    API); None when it has no key set. A Messages request takes Anthropic's header wherever it goes."""
    if not backend.api_key:
        return None
    row = ANTHROPIC if (api or backend.api) == MESSAGES else \
        provider_of(backend.hosted.provider if backend.hosted else None)
    return row.credential(backend.api_key)


def upstream_path(backend: Backend, path: str, model: str | None) -> str:
    """The path (and query) a request on OpenAI's `path` takes at `backend`: after its prefix, or, for a
    provider's versioned shape (Azure's `api_version`), the deployment's own path with the version."""
    hosted = backend.hosted
    if hosted is None or hosted.api_version is None:
        return backend.path_prefix + path
    row = provider_of(hosted.provider)
    bare, _, query = path.partition("?")
    template = dict(row.versioned_paths).get(bare)
    if template is not None:
        bare = template.format(deployment=quote(hosted.deployment(model or ""), safe=""))
    elif bare.startswith("/v1/"):
        bare = row.versioned_root + bare[len("/v1"):]
    version = "api-version=" + quote(hosted.api_version, safe="")
    return backend.path_prefix + bare + "?" + version + ("&" + query if query else "")


def with_deployment(backend: Backend, body: dict[str, Any] | None, request: dict[str, Any]) -> dict[str, Any] | None:
    """The body to send when the provider knows the model by its deployment's name (`deployments`); None
    when the request goes as it is (`body` None: its own bytes)."""
    hosted = backend.hosted
    sent = body if body is not None else request
    model = sent.get("model")
    if hosted is None or not isinstance(model, str) or hosted.deployment(model) == model:
        return body
    return {**sent, "model": hosted.deployment(model)}


def processor_only(backend: Backend) -> str | None:
    """Why a provider's requests need the processor even when nothing is translated (None: they do not)."""
    hosted = backend.hosted
    if hosted is not None and hosted.api_version is not None:
        return "the provider's versioned paths (api_version) are set per model by the processor"
    if hosted is not None and hosted.deployments:
        return "the processor names the model's deployment (deployments) in the body"
    return None

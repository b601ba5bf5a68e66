"""The paths the sidecar itself handles, and the methods each accepts.

(`/v1/responses/compact` is checked before the `/v1/responses/{id}` pattern, which it also matches;
the Conversations API's paths are `state.conversations.route`'s.)

Envoy normalises every path first (`normalize_path`, `merge_slashes`,
`path_with_escaped_slashes_action` in deploy/envoy.yaml), so one spelling reaches this table. A
wrong method here is the sidecar's to refuse, in the OpenAI shape with an `allow` header, rather
than the backend's (which answers HTML, an empty body, or something the client cannot read). Every
other path (embeddings, completions, audio, files...) passes through to the backend.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from extproc.api import API_OF_PATH
from extproc.errors import GatewayError
from extproc.state import conversations
from extproc.state.records import RESOURCE_RE
from extproc.translate import compact

INPUT_TOKENS = "/v1/responses/input_tokens"  # token counting: to the model's backend when it speaks Responses
COUNT_TOKENS = "/v1/messages/count_tokens"  # Anthropic's: to a Messages backend, else estimated by the sidecar
_RESOURCE_METHODS = {"": ("GET", "DELETE"), "/cancel": ("POST",), "/input_items": ("GET",)}
_WITH_BODY = (*API_OF_PATH, compact.PATH, INPUT_TOKENS, COUNT_TOKENS)  # POSTs that are API calls: a JSON body is required
_FIXED = {**{path: ("POST",) for path in _WITH_BODY}, "/v1/models": ("GET",)}


def allowed_methods(path: str) -> tuple[str, ...] | None:
    """The methods a sidecar-handled path accepts (query string ignored); None for any other path."""
    path = path.partition("?")[0]
    if path in _FIXED:
        return _FIXED[path]
    resource = RESOURCE_RE.match(path)
    if resource is not None:
        return _RESOURCE_METHODS[resource.group(2) or ""]
    return conversations.allowed_methods(path)  # the Conversations API's; None: not the sidecar's


# A lenient reading of a path that names one of the sidecar's: under any prefix (`/responses`,
# `/openai/v1/responses/...`: servers that serve both spellings, or mount the API elsewhere).
_READS_AS_OURS = re.compile(
    r"(?:^|/)(?:responses(?:/.*)?|conversations(?:/.*)?|chat/completions|models)$|(?:^|/)v1/messages(?:/.*)?$")


def _reads_as_ours(bare: str) -> bool:
    """Whether a lenient upstream may read a path the sidecar does not handle as one it does: passed on,
    it would skip the sidecar's tenancy and routing. Lenient readings: a trailing slash, `;params` in a
    segment (servlet containers drop them), another letter case, escapes decoded once more, another
    prefix than `/v1`; and anything under a `responses` or `conversations` segment."""
    lenient = "/".join(segment.partition(";")[0] for segment in unquote(bare).split("/")).rstrip("/").lower()
    return _READS_AS_OURS.search(lenient) is not None


def check_request_line(method: str, path: str, has_body: bool) -> None:
    """Refuse, before anything is routed, another spelling of a handled path (404), a wrong method on
    one (405) and an API call without a body (400)."""
    bare = path.partition("?")[0]
    allowed = allowed_methods(bare)
    if allowed is None:
        if _reads_as_ours(bare):
            raise GatewayError(404, f"Invalid URL ({method} {bare})", code="invalid_url")
        return
    if method not in allowed:
        raise GatewayError(405, f"{method} is not supported on {bare}; use {' or '.join(allowed)}",
                           code="method_not_allowed", headers=(("allow", ", ".join(allowed)),))
    if not has_body and bare in _WITH_BODY:
        raise GatewayError(400, f"POST {bare} needs a JSON request body", code="missing_body")

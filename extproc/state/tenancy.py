"""Who owns a stored conversation: the tenant of a request, from its credential (sans-IO).

The tenant is an HMAC-SHA256 of the caller's bearer token (or `x-api-key`) under a per-deployment
secret, so the store never holds a credential and ids cannot be tied to a key without the secret.
Deployments that authenticate in Envoy first name the header their ext_authz/jwt_authn sets
(`tenancy.header`). Requests without a credential share the anonymous tenant.
"""

from __future__ import annotations

import hashlib
import hmac

from extproc.config import Tenancy

ANONYMOUS = "anonymous"
SECRET_KEY = "meta:tenant-secret"  # where the shared secret lives when the environment gives none


class Tenants:
    def __init__(self, config: Tenancy, secret: bytes):
        self.header = config.header
        self.secret = secret

    def tenant_of(self, headers: dict[str, str]) -> str:
        if self.header is not None:
            credential = headers.get(self.header, "")
        else:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            credential = token.strip() if scheme.lower() == "bearer" else ""
            credential = credential or headers.get("x-api-key", "")
        if not credential:
            return ANONYMOUS
        return "t" + hmac.new(self.secret, credential.encode("latin-1", "replace"), hashlib.sha256).hexdigest()[:32]

"""One request through a fresh exchange, its store lookups answered as the gRPC shell answers them: the
state tests' driver (pinning, conversations held or passed through)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from extproc.exchange import Action, Exchange, Lookup, Step
from extproc.routing.gateway import Gateway


class Store(dict[str, bytes]):
    """A store that keeps what an answer writes, as the shell applies an Action's writes."""

    def run(self, step: Step) -> Action:
        return answered(step, self)


def answered(step: Step, store: Mapping[str, bytes] | None) -> Action:
    """`step` with its lookups answered from `store` (None: the store is down); a `Store` keeps the writes."""
    while isinstance(step, Lookup):
        step = step.then(None if store is None else [store.get(k) for k in step.keys])
    if isinstance(store, Store):
        for key, value in step.writes:
            if value is None:
                store.pop(key, None)
            else:
                store[key] = value
    return step


def send(gateway: Gateway, path: str, body: dict | None, store: Mapping[str, bytes] | None, method: str = "POST",
         key: str | None = None) -> tuple[Exchange, Action]:
    """A JSON request (a body-less one when `body` is None) with the credential `key`, if any."""
    ex = Exchange(gateway)
    headers = {":method": method, ":path": path, "content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    step = ex.request_headers(headers, body is None)
    if body is not None:
        step = ex.request_body(json.dumps(body).encode())
    return ex, answered(step, store)


def endpoint(act: Action) -> str:
    """The instance Envoy is told to send the request to."""
    assert act.immediate is None
    return dict(act.set_headers)["x-gateway-destination-endpoint"]

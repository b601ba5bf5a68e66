"""End to end: a response stored on a Responses backend that checks no key is its creator's alone.

A vLLM or Ollama server serves whoever names a response id. Alice stores responses through the real
Envoy and sidecar on one such instance and on a pool of three (every instance the ring can pick holds
one of hers); Bob, and a caller with no credential, then name her ids on every path: each gets the
unknown id's 404, no request reaches any instance, and Alice still reads and continues afterwards.
A backend declared `authenticates_callers` (one that checks each caller's own key, as OpenAI does)
still gets ids the sidecar never recorded, for it to judge, but never one recorded for another tenant.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from extproc.local.stack import Stack, free_port, wait_for_port

from .test_e2e_tenancy import json_call
from .upstreams import ResponsesServer

CONFIG = """
listen: 127.0.0.1:{port}
admin_listen: off
state: {state}
backends:
  - name: own
    api: responses
    models: ["own-*"]
    endpoints: ["{own}"]
    authenticates_callers: true
  - name: solo
    api: responses
    models: ["solo-*"]
    endpoints: ["{solo}"]
  - name: pool
    api: responses
    models: ["pool-*"]
    endpoints: [{pool}]
"""


@dataclass
class Upstreams:
    url: str
    own: ResponsesServer
    solo: ResponsesServer
    pool: list[ResponsesServer]

    @property
    def all(self) -> list[ResponsesServer]:
        return [self.own, self.solo, *self.pool]

    def requests_seen(self) -> int:
        return sum(len(s.requests) for s in self.all)

    def client(self, key: str | None) -> openai.OpenAI:
        # The SDK insists on a key; a caller with none at all is sent without the header (raw()).
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "unused", max_retries=0, timeout=30)

    def raw(self, method: str, path: str, body: dict | None, key: str | None) -> tuple[int, dict]:
        return json_call(self.url, method, path, body, key)


@pytest.fixture(scope="module", params=["memory", "redis"])
def upstreams(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstreams]:
    tmp = Path(tmp_path_factory.mktemp("owner"))
    state = "{store: memory}" if request.param == "memory" else \
        f"{{store: redis, redis_url: '{request.getfixturevalue('redis_server').url}'}}"
    own, solo, pool = ResponsesServer(per_caller=True), ResponsesServer(), [ResponsesServer() for _ in range(3)]
    port, listen = free_port(), free_port()
    cfg = tmp / "config.yaml"
    cfg.write_text(CONFIG.format(port=port, state=state, own=own.address, solo=solo.address,
                                 pool=", ".join(f'"{s.address}"' for s in pool)))
    stack = Stack()
    try:
        wait_for_port(port, proc=stack.start_sidecar(cfg))
        stack.start_envoy(listen, free_port(), port)
        yield Upstreams(f"http://127.0.0.1:{listen}", own, solo, pool)
    finally:
        stack.stop()
        for s in (own, solo, *pool):
            s.close()


def alices_responses(up: Upstreams, model: str) -> list[str]:
    """Alice's stored responses: on the pool, one on every instance (placed by prompt_cache_key)."""
    alice = up.client("sk-alice")
    servers = up.pool if model.startswith("pool") else [up.solo]
    held: dict[int, str] = {}
    for i in range(200):
        if len(held) == len(servers):
            break
        made = alice.responses.create(model=model, input="my name is Zed", prompt_cache_key=f"alice-{model}-{i}")
        where = next(n for n, s in enumerate(servers) if made.id in s.stored)
        held.setdefault(where, made.id)
    assert len(held) == len(servers), "the ring never placed a response on some instance"
    return list(held.values())


CALLS = [
    ("GET", "/v1/responses/{rid}", None, "response_not_found"),
    ("GET", "/v1/responses/{rid}/input_items", None, "response_not_found"),
    ("POST", "/v1/responses/{rid}/cancel", None, "response_not_found"),
    ("DELETE", "/v1/responses/{rid}", None, "response_not_found"),
    ("POST", "/v1/responses", {"input": "what is my name?"}, "previous_response_not_found"),
    ("POST", "/v1/responses/input_tokens", {"input": "how long?"}, "previous_response_not_found"),
]


@pytest.mark.parametrize("model", ["solo-1", "pool-1"])
@pytest.mark.parametrize("intruder", ["sk-bob", None], ids=["another-tenant", "no-credential"])
def test_another_caller_never_reaches_a_response_on_a_backend_that_checks_no_key(upstreams: Upstreams, model: str,
                                                                              intruder: str | None):
    for rid in alices_responses(upstreams, model):
        before = upstreams.requests_seen()
        for method, path, body, code in CALLS:
            if body is not None:
                body = {**body, "model": model, "previous_response_id": rid}
            status, err = upstreams.raw(method, path.format(rid=rid), body, intruder)
            assert (status, err["error"]["code"]) == (404, code), (method, path)
        assert upstreams.requests_seen() == before, "an intruder's request reached an upstream"
        # Nothing changed for Alice: she reads her response and continues it.
        alice = upstreams.client("sk-alice")
        assert alice.responses.retrieve(rid).id == rid
        assert alice.responses.create(model=model, input="and now?", previous_response_id=rid).status == "completed"


def test_an_unknown_id_is_the_same_404_and_reaches_no_backend_that_checks_no_key(upstreams: Upstreams):
    [rid] = alices_responses(upstreams, "solo-1")
    before = upstreams.requests_seen()
    body = {"model": "solo-1", "input": "x"}
    _, theirs = upstreams.raw("POST", "/v1/responses", {**body, "previous_response_id": rid}, "sk-bob")
    _, unknown = upstreams.raw("POST", "/v1/responses", {**body, "previous_response_id": "resp_nobody"}, "sk-bob")
    assert theirs["error"]["message"].replace(rid, "X") == unknown["error"]["message"].replace("resp_nobody", "X")
    assert upstreams.requests_seen() == before


def test_a_backend_that_checks_each_caller_judges_ids_the_sidecar_never_saw(upstreams: Upstreams):
    """Made at the backend directly (not through the gateway), Alice's response is unknown to the sidecar:
    it goes to the backend, which serves Alice and refuses Bob. One made through the gateway is refused
    to Bob by the sidecar itself."""
    direct = openai.OpenAI(base_url=f"http://{upstreams.own.address}/v1", api_key="sk-alice", max_retries=0)
    outside = direct.responses.create(model="own-1", input="hello").id
    alice, bob = upstreams.client("sk-alice"), upstreams.client("sk-bob")
    assert alice.responses.retrieve(outside).id == outside
    seen = len(upstreams.own.requests)
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(outside)
    assert len(upstreams.own.requests) == seen + 1  # the backend itself said no
    inside = alice.responses.create(model="own-1", input="hello").id
    seen = len(upstreams.own.requests)
    for attempt in (lambda: bob.responses.retrieve(inside),
                    lambda: bob.responses.create(model="own-1", input="x", previous_response_id=inside)):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert len(upstreams.own.requests) == seen  # refused by the sidecar: the owner is recorded
    assert alice.responses.create(model="own-1", input="x", previous_response_id=inside).status == "completed"

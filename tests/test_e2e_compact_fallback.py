"""End to end: `/v1/responses/compact` at a Responses backend that answers it 404 (as OpenAI does for
some accounts) succeeds anyway, through Envoy's retry of the first attempt: the same compaction asked
as a `compaction_trigger` turn, answered in `/compact`'s shape; once learned, later compactions go
straight to the turn. The backend is two stateful instances that know only their own response ids,
and refuse a trigger that is not the final input item."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from extproc.local.stack import Stack, free_port, wait_for_port

from .upstreams import COMPACTED, ResponsesServer

CONFIG = """
listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin}
backends:
  - name: nocompact
    api: responses
    models: ["gpt-5.3-codex", "gpt-5.4"]
    endpoints: ["{one}", "{two}"]
"""
CONVERSATION = [{"role": "user", "content": "My name is Zed."},
                {"role": "assistant", "content": "Hello Zed."},
                {"role": "user", "content": "Remember it."}]


@dataclass
class Pool:
    url: str
    admin: str
    servers: list[ResponsesServer]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="client-key", max_retries=0, timeout=30)

    def requests(self) -> list[dict]:
        return [r for s in self.servers for r in s.requests]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    servers = [ResponsesServer(compact_endpoint=False), ResponsesServer(compact_endpoint=False)]
    port, admin, listen = free_port(), free_port(), free_port()
    cfg = Path(tmp_path_factory.mktemp("nocompact")) / "config.yaml"
    cfg.write_text(CONFIG.format(port=port, admin=admin, one=servers[0].address, two=servers[1].address))
    stack = Stack()
    try:
        sidecar = stack.start_sidecar(cfg)
        wait_for_port(port, proc=sidecar)
        stack.start_envoy(listen, free_port(), port)
        yield Pool(f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{admin}", servers)
    finally:
        stack.stop()
        for s in servers:
            s.close()


@pytest.fixture
def nc(pool: Pool) -> Pool:
    for s in pool.servers:
        s.reset()
    return pool


def test_a_404_compact_endpoint_is_retried_as_a_compaction_trigger_turn_and_learned(nc):
    client = nc.client()
    compacted = client.responses.compact(model="gpt-5.3-codex", input=CONVERSATION, instructions="Be brief.")
    assert compacted.object == "response.compaction"
    kinds = [(o.type, getattr(o, "role", None)) for o in compacted.output]
    assert kinds == [("message", "user"), ("message", "user"), ("compaction", None)]
    assert compacted.output[-1].encrypted_content.startswith(COMPACTED)  # the backend's own item, untouched
    assert compacted.usage.output_tokens == 7
    first, retry = nc.requests()
    assert (first["path"], retry["path"]) == ("/v1/responses/compact", "/v1/responses")
    assert retry["body"] == {"model": "gpt-5.3-codex", "instructions": "Be brief.", "store": False,
                             "input": [*CONVERSATION, {"type": "compaction_trigger"}]}
    learned = json.loads(urllib.request.urlopen(nc.admin + "/learned", timeout=10).read())
    assert learned["nocompact:gpt-5.3-codex"]["lacks"] == ["/v1/responses/compact"]

    # Learned: the next compaction of this model goes straight to the turn, one upstream request.
    for s in nc.servers:
        s.reset()
    again = client.responses.compact(model="gpt-5.3-codex", input="hello")
    assert again.output[-1].type == "compaction"
    (only,) = nc.requests()
    assert only["path"] == "/v1/responses" and only["body"]["input"][-1] == {"type": "compaction_trigger"}


def test_the_fallback_reaches_the_instance_holding_the_conversation_and_the_item_continues_it(nc):
    """Each instance knows only its own ids: both attempts must reach the one that made r1."""
    client = nc.client()
    r1 = client.responses.create(model="gpt-5.4", input="I am Zed")
    (holder,) = [s for s in nc.servers if s.requests]
    raw = client.responses.with_raw_response.compact(model="gpt-5.4", previous_response_id=r1.id, input="more")
    assert [r["path"] for r in holder.requests] == ["/v1/responses", "/v1/responses/compact", "/v1/responses"]
    assert holder.last["body"]["previous_response_id"] == r1.id
    window = json.loads(raw.text)["output"]
    assert [o["type"] for o in window] == ["message", "compaction"]
    # The compacted window goes back as input: the backend reads its own item.
    follow = client.responses.create(model="gpt-5.4", input=[*window, {"role": "user", "content": "who am I?"}],
                                     store=False)
    assert follow.status == "completed"
    # store: false and no previous id: any instance may serve it, so find it by its input, not by order
    (sent,) = [r for r in nc.requests() if r["body"].get("input", [{}])[-1] == {"role": "user", "content": "who am I?"}]
    assert sent["body"]["input"][1]["encrypted_content"] == window[1]["encrypted_content"]


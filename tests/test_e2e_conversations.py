"""End to end: the Conversations API the sidecar holds, through the real Envoy, with the official openai
SDK and the Agents SDK, on two replicas (each an Envoy with its own sidecar) sharing a real Redis.

Every call alternates replicas, so each one depends on the shared record.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from extproc.local.stack import Stack, free_port, wait_for_port

from .conformance import check_stream, validate_response
from .conftest import RedisServer
from .upstreams import ChatServer, Reply, ResponsesServer

CONFIG = """
listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin_port}
state:
  store: redis
  redis_url: {redis}
backends:
  - name: vllm-chat
    api: chat
    models: ["llama-*"]
    endpoints: [{chat}]
  - name: codex
    api: responses
    models: ["gpt-5.3-codex"]
    endpoints: ["{resp}"]
"""


@dataclass
class Replicas:
    urls: list[str]
    chat: list[ChatServer]
    resp: ResponsesServer

    def clients(self, api_key: str = "k") -> Iterator[openai.OpenAI]:
        """Clients that alternate between the two replicas, forever."""
        return itertools.cycle([openai.OpenAI(base_url=u + "/v1", api_key=api_key, max_retries=0, timeout=30)
                                for u in self.urls])

    def chat_requests(self) -> list[dict]:
        return [r["body"] for server in self.chat for r in server.requests if r["path"] == "/v1/chat/completions"]


@pytest.fixture(scope="module")
def replicas(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    chat, resp = [ChatServer(), ChatServer()], ResponsesServer()
    stack = Stack()
    tmp = Path(tmp_path_factory.mktemp("conversations"))
    urls = []
    try:
        for i in range(2):
            port = free_port()
            cfg = tmp / f"config-{i}.yaml"
            cfg.write_text(CONFIG.format(port=port, admin_port=free_port(), redis=redis_server.url, resp=resp.address,
                                         chat=", ".join(f'"{s.address}"' for s in chat)))
            wait_for_port(port, proc=stack.start_sidecar(cfg))
            listen = free_port()
            stack.start_envoy(listen, free_port(), port)
            urls.append(f"http://127.0.0.1:{listen}")
        yield Replicas(urls, chat, resp)
    finally:
        stack.stop()
        for server in (*chat, resp):
            server.close()


@pytest.fixture
def rp(replicas: Replicas) -> Replicas:
    for server in (*replicas.chat, replicas.resp):
        server.reset()
    return replicas


def text(item) -> str:
    return item.content[0].text


def test_the_conversations_api_with_the_openai_sdk_across_replicas(rp):
    clients = rp.clients()
    conv = next(clients).conversations.create(metadata={"topic": "trip"},
                                              items=[{"type": "message", "role": "user", "content": "plan Lisbon"}])
    assert conv.id.startswith("conv_") and conv.object == "conversation" and conv.metadata == {"topic": "trip"}
    assert next(clients).conversations.retrieve(conv.id).created_at == conv.created_at
    updated = next(clients).conversations.update(conv.id, metadata={"topic": "food"})
    assert updated.metadata == {"topic": "food"}
    added = next(clients).conversations.items.create(conv.id, items=[
        {"type": "message", "role": "assistant", "content": f"step {n}"} for n in range(4)])
    assert [text(i) for i in added.data] == [f"step {n}" for n in range(4)]
    # The SDK follows the cursor (`after` = last_id while has_more), two items a page, over both replicas.
    pages = next(clients).conversations.items.list(conv.id, limit=2, order="asc")
    assert [text(i) for i in pages] == ["plan Lisbon", "step 0", "step 1", "step 2", "step 3"]
    assert [text(i) for i in next(clients).conversations.items.list(conv.id)][:2] == ["step 3", "step 2"]  # desc
    second = added.data[1].id
    assert text(next(clients).conversations.items.retrieve(second, conversation_id=conv.id)) == "step 1"
    assert next(clients).conversations.items.delete(second, conversation_id=conv.id).id == conv.id
    with pytest.raises(openai.NotFoundError):
        next(clients).conversations.items.retrieve(second, conversation_id=conv.id)
    deleted = next(clients).conversations.delete(conv.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (conv.id, True, "conversation.deleted")
    with pytest.raises(openai.NotFoundError) as e:
        next(clients).conversations.retrieve(conv.id)
    assert e.value.code == "conversation_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        next(clients).conversations.create(metadata={f"k{n}": "v" for n in range(17)})
    assert e.value.body["param"] == "metadata"
    assert rp.chat_requests() == [] and rp.resp.requests == []  # the sidecar answered every call


def test_responses_in_a_conversation_alternate_replicas_and_append_every_turn(rp):
    clients = rp.clients()
    conv = next(clients).conversations.create(items=[{"type": "message", "role": "user", "content": "I am Zed"},
                                                     {"type": "message", "role": "assistant", "content": "hi Zed"}])
    for server in rp.chat:
        server.script.extend([Reply(text="You are Zed."), Reply(text="Lisbon."), Reply(text="Zed, in Lisbon.")])
    raw = next(clients).responses.with_raw_response.create(model="llama-3", conversation=conv.id, input="who am I?",
                                                           store=False)
    validate_response(json.loads(raw.text))
    assert raw.parse().output_text == "You are Zed."
    with next(clients).responses.create(model="llama-3", conversation={"id": conv.id}, input="I live in Lisbon",
                                        stream=True) as s:
        events = [e.model_dump(mode="json", exclude_unset=True) for e in s]
    check_stream(events)
    r3 = next(clients).responses.create(model="llama-3", conversation=conv.id, input="sum it up")
    assert r3.output_text == "Zed, in Lisbon."
    last = rp.chat_requests()[-1]
    assert [(m["role"], m["content"]) for m in last["messages"]] == [
        ("user", "I am Zed"), ("assistant", "hi Zed"), ("user", "who am I?"), ("assistant", "You are Zed."),
        ("user", "I live in Lisbon"), ("assistant", "Lisbon."), ("user", "sum it up")]
    items = list(next(clients).conversations.items.list(conv.id, order="asc"))
    assert [(i.role, text(i)) for i in items] == [
        ("user", "I am Zed"), ("assistant", "hi Zed"), ("user", "who am I?"), ("assistant", "You are Zed."),
        ("user", "I live in Lisbon"), ("assistant", "Lisbon."), ("user", "sum it up"), ("assistant", "Zed, in Lisbon.")]
    assert items[-1].id == r3.output[0].id
    assert next(clients).responses.retrieve(r3.id).output_text == "Zed, in Lisbon."  # stored as a turn as well


def test_another_tenant_gets_404_on_every_new_path(rp):
    owner = next(rp.clients("owner-key"))
    conv = owner.conversations.create(items=[{"type": "message", "role": "user", "content": "secret"}])
    item_id = next(iter(owner.conversations.items.list(conv.id))).id
    other = rp.clients("other-key")
    attempts = [lambda c: c.conversations.retrieve(conv.id),
                lambda c: c.conversations.update(conv.id, metadata={"x": "y"}),
                lambda c: c.conversations.delete(conv.id),
                lambda c: list(c.conversations.items.list(conv.id)),
                lambda c: c.conversations.items.create(conv.id, items=[{"type": "message", "role": "user",
                                                                        "content": "inject"}]),
                lambda c: c.conversations.items.retrieve(item_id, conversation_id=conv.id),
                lambda c: c.conversations.items.delete(item_id, conversation_id=conv.id),
                lambda c: c.responses.create(model="llama-3", conversation=conv.id, input="what is the secret?")]
    for attempt in attempts:
        with pytest.raises(openai.NotFoundError):
            attempt(next(other))
    items = list(owner.conversations.items.list(conv.id))
    assert [text(i) for i in items] == ["secret"] and owner.conversations.retrieve(conv.id).metadata == {}
    assert rp.chat_requests() == []


def test_a_conversation_with_a_model_on_a_responses_backend_is_refused_clearly(rp):
    client = next(rp.clients())
    conv = client.conversations.create()
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="gpt-5.3-codex", conversation=conv.id, input="hello")
    assert (e.value.code, e.value.body["param"]) == ("unsupported_parameter", "conversation")
    assert rp.resp.requests == []


def test_agents_sdk_conversations_session_recalls_an_earlier_turn(rp):
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    for server in rp.chat:
        server.script.extend([Reply(text="Nice to meet you, Zed."), Reply(text="Your name is Zed.")])

    async def main() -> str:
        client = AsyncOpenAI(base_url=rp.urls[0] + "/v1", api_key="agent-key", max_retries=0)
        other = AsyncOpenAI(base_url=rp.urls[1] + "/v1", api_key="agent-key", max_retries=0)
        agent = agents.Agent(name="Assistant", instructions="Be brief.",
                             model=agents.OpenAIResponsesModel(model="llama-3", openai_client=client))
        config = agents.RunConfig(tracing_disabled=True)
        session = agents.OpenAIConversationsSession(openai_client=client)
        await agents.Runner.run(agent, "My name is Zed.", session=session, run_config=config)
        again = agents.OpenAIConversationsSession(conversation_id=session.session_id, openai_client=other)
        result = await agents.Runner.run(agent, "What is my name?", session=again, run_config=config)
        return str(result.final_output)

    assert asyncio.run(main()) == "Your name is Zed."
    last = rp.chat_requests()[-1]["messages"]
    assert [(m["role"], m["content"]) for m in last if m["role"] != "system"] == [
        ("user", "My name is Zed."), ("assistant", "Nice to meet you, Zed."), ("user", "What is my name?")]

"""End to end: the state the sidecar holds for chat-only backends beyond previous_response_id (the
Conversations API, background responses), through the real Envoy, with the official openai SDK and the
Agents SDK, on two replicas (each an Envoy with its own sidecar) sharing a real Redis.

Calls alternate replicas, so each one depends on the shared records.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from extproc.local.stack import free_port, wait_until

from .conformance import check_stream, sse_events, validate_response
from .conftest import RedisServer, Replicated, metric, running
from .upstreams import ChatServer, Reply, ResponsesServer

CONFIG = """
listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin_port}
websocket_listen: 127.0.0.1:{front}
websocket_gateway: http://127.0.0.1:{envoy}
limits:
  background_max_runs: 2
  background_max_events: 30
  background_lease_seconds: 4
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
class Replicas(Replicated):
    admins: list[str]
    chat: list[ChatServer]
    resp: ResponsesServer

    def crash_sidecar(self, i: int) -> None:
        """Replica i's sidecar killed, as a crash would (its runs die with it)."""
        self.stop_sidecar(i, crash=True)

    def background_runs(self, replica: int, outcome: str) -> float:
        """extproc_background_runs_total{outcome} of one replica."""
        return metric(self.admins[replica], "extproc_background_runs_total", outcome=outcome)

    def chat_requests(self) -> list[dict]:
        return [r["body"] for server in self.chat for r in server.requests if r["path"] == "/v1/chat/completions"]


@pytest.fixture(scope="module")
def replicas(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    chat, resp = [ChatServer()], ResponsesServer()  # one chat instance: its script is the conversation's
    tmp = Path(tmp_path_factory.mktemp("conversations"))
    urls, admins, configs, stacks, ports = [], [], [], [], []
    with contextlib.ExitStack() as started:
        for server in (*chat, resp):
            started.callback(server.close)  # last, once both stacks are stopped
        for i in range(2):
            port, listen, admin, front = free_port(), free_port(), free_port(), free_port()
            admins.append(f"http://127.0.0.1:{admin}")
            cfg = tmp / f"config-{i}.yaml"
            cfg.write_text(CONFIG.format(port=port, admin_port=admin, redis=redis_server.url, resp=resp.address,
                                         chat=", ".join(f'"{s.address}"' for s in chat), envoy=listen, front=front))
            stacks.append(started.enter_context(running(cfg, port, listen, ready=(front,), websocket=front)))
            urls.append(f"http://127.0.0.1:{listen}")
            configs.append(cfg)
            ports.append((port, front))
        yield Replicas(urls, configs, stacks, ports, admins, chat, resp)


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
    # `include` (on list, retrieve, create) asks for optional data no held item has: accepted, same items.
    extra = ["message.output_text.logprobs", "reasoning.encrypted_content"]
    assert [i.id for i in next(clients).conversations.items.list(conv.id, include=extra)] == \
        [i.id for i in next(clients).conversations.items.list(conv.id)]
    assert next(clients).conversations.items.retrieve(second, conversation_id=conv.id, include=extra).id == second
    more = next(clients).conversations.items.create(conv.id, include=extra, items=[
        {"type": "message", "role": "user", "content": "step 4"}])
    assert next(clients).conversations.items.delete(more.data[0].id, conversation_id=conv.id).id == conv.id
    with pytest.raises(openai.BadRequestError, match="Duplicate item found with id"):  # an id is held once
        next(clients).conversations.items.create(conv.id, items=[
            {"type": "message", "role": "user", "content": "again", "id": added.data[0].id}])
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


def calls_on_a_conversation(item_id: str, models: tuple[str, ...]) -> list[Callable[[openai.OpenAI, str], object]]:
    """Every call a client can make on a conversation id (`item_id` one of its items), then a turn in it on
    each of `models`."""
    return [lambda c, cid: c.conversations.retrieve(cid),
            lambda c, cid: c.conversations.update(cid, metadata={"x": "y"}),
            lambda c, cid: c.conversations.delete(cid),
            lambda c, cid: list(c.conversations.items.list(cid)),
            lambda c, cid: c.conversations.items.create(cid, items=[{"type": "message", "role": "user",
                                                                     "content": "inject"}]),
            lambda c, cid: c.conversations.items.retrieve(item_id, conversation_id=cid),
            lambda c, cid: c.conversations.items.delete(item_id, conversation_id=cid),
            *(lambda c, cid, model=model: c.responses.create(model=model, conversation=cid, input="the secret?")
              for model in models)]


def test_another_tenant_gets_404_on_every_new_path(rp):
    """Another tenant's conversation is answered exactly as one nobody created, on every path and for
    models on either kind of backend, and nothing reaches an upstream."""
    owner = next(rp.clients("owner-key"))
    conv = owner.conversations.create(items=[{"type": "message", "role": "user", "content": "secret"}])
    item_id = next(iter(owner.conversations.items.list(conv.id))).id
    other = rp.clients("other-key")
    for attempt in calls_on_a_conversation(item_id, ("llama-3", "gpt-5.3-codex")):
        with pytest.raises(openai.NotFoundError) as theirs:
            attempt(next(other), conv.id)
        with pytest.raises(openai.NotFoundError) as unknown:
            attempt(owner, "conv_nobody_made")
        assert json.dumps(theirs.value.body).replace(conv.id, "ID") == \
            json.dumps(unknown.value.body).replace("conv_nobody_made", "ID")
        assert theirs.value.body["code"] == "conversation_not_found"
    items = list(owner.conversations.items.list(conv.id))
    assert [text(i) for i in items] == ["secret"] and owner.conversations.retrieve(conv.id).metadata == {}
    assert rp.chat_requests() == [] and rp.resp.requests == []


@pytest.mark.parametrize("stream", [False, True])
def test_one_conversation_across_a_chat_model_and_a_responses_backend(rp, stream):
    """The sidecar holds the conversation: a Responses backend gets its items as input (no conversation id
    it would not know), and its answer, read on the way, is appended like a chat model's."""
    clients = rp.clients()
    conv = next(clients).conversations.create()
    rp.chat[0].script.extend([Reply(text="Noted, Zed."), Reply(text="You are Zed, and you like tea.")])
    rp.resp.script.append(Reply(text="Tea, then."))
    next(clients).responses.create(model="llama-3", conversation=conv.id, input="I am Zed")
    if stream:
        with next(clients).responses.create(model="gpt-5.3-codex", conversation=conv.id, input="I like tea",
                                            stream=True) as s:
            events = [e.model_dump(mode="json", exclude_unset=True) for e in s]
        assert events[-1]["type"] == "response.completed"
    else:
        assert next(clients).responses.create(model="gpt-5.3-codex", conversation=conv.id,
                                              input="I like tea").output_text == "Tea, then."
    (sent,) = [r["body"] for r in rp.resp.requests]
    assert "conversation" not in sent
    assert [i["content"][0]["text"] for i in sent["input"]] == ["I am Zed", "Noted, Zed.", "I like tea"]
    r3 = next(clients).responses.create(model="llama-3", conversation=conv.id, input="who am I?")
    assert r3.output_text == "You are Zed, and you like tea."
    assert [m["content"] for m in rp.chat_requests()[-1]["messages"]] == [
        "I am Zed", "Noted, Zed.", "I like tea", "Tea, then.", "who am I?"]
    assert len(list(next(clients).conversations.items.list(conv.id))) == 6


def test_compaction_inside_a_conversation(rp):
    """A compaction_trigger turn in a conversation appends the sealed item (not the trigger); the turns
    after it see the compacted window: the user messages, the summary, what follows."""
    clients = rp.clients()
    conv = next(clients).conversations.create(items=[{"type": "message", "role": "user", "content": "I am Zed"},
                                                     {"type": "message", "role": "assistant", "content": "hi Zed"}])
    rp.chat[0].script.extend([Reply(text="User is Zed."), Reply(text="Zed.")])
    compacted = next(clients).responses.create(model="llama-3", conversation=conv.id, store=False,
                                               input=[{"type": "compaction_trigger"}])
    (item,) = compacted.output
    assert item.type == "compaction"
    items = list(next(clients).conversations.items.list(conv.id, order="asc"))
    assert [i.type for i in items] == ["message", "message", "compaction"] and items[-1].id == item.id
    assert next(clients).responses.create(model="llama-3", conversation=conv.id, input="who?").output_text == "Zed."
    assert [m["content"] for m in rp.chat_requests()[-1]["messages"]] == [
        "I am Zed", "Summary of the earlier conversation (compacted):\n\nUser is Zed.", "who?"]


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


# -- background responses -----------------------------------------------------------------------------

def test_a_background_response_on_a_chat_backend_is_polled_to_completion_on_the_other_replica(rp):
    hold = threading.Event()
    for server in rp.chat:
        server.script.append(Reply(text="Deep answer.", hold=hold))
    first, second = itertools.islice(rp.clients(), 2)
    queued = first.responses.create(model="llama-3", input="research this", background=True)
    assert (queued.status, queued.background, queued.output) == ("queued", True, [])
    assert wait_until(lambda: second.responses.retrieve(queued.id).status == "in_progress", timeout=20)
    hold.set()
    assert wait_until(lambda: second.responses.retrieve(queued.id).status == "completed", timeout=20)
    raw = second.responses.with_raw_response.retrieve(queued.id)
    done = json.loads(raw.text)
    validate_response(done)
    assert done["id"] == queued.id and done["background"] is True
    assert done["output"][0]["content"][0]["text"] == "Deep answer."
    assert [i.content[0].text for i in first.responses.input_items.list(queued.id)] == ["research this"]
    sent = rp.chat_requests()
    assert len(sent) == 1 and sent[0]["messages"] == [{"role": "user", "content": "research this"}]
    # A background turn continues like any other: previous_response_id rebuilds it.
    follow = second.responses.create(model="llama-3", previous_response_id=queued.id, input="and then?")
    assert follow.status == "completed"
    assert [m["content"] for m in rp.chat_requests()[-1]["messages"]] == ["research this", "Deep answer.", "and then?"]
    with pytest.raises(openai.NotFoundError):  # another tenant polls nothing
        next(rp.clients("other-key")).responses.retrieve(queued.id)


def test_a_background_response_is_cancelled_and_stays_cancelled(rp):
    hold = threading.Event()
    for server in rp.chat:
        server.script.append(Reply(text="too late", hold=hold))
    first, second = itertools.islice(rp.clients(), 2)
    cancelled_before = rp.background_runs(0, "cancelled")
    queued = first.responses.create(model="llama-3", input="long job", background=True)
    assert wait_until(lambda: first.responses.retrieve(queued.id).status == "in_progress", timeout=20)
    with pytest.raises(openai.NotFoundError):
        next(rp.clients("other-key")).responses.cancel(queued.id)
    assert second.responses.cancel(queued.id).status == "cancelled"
    hold.set()
    assert wait_until(lambda: rp.background_runs(0, "cancelled") == cancelled_before + 1, timeout=20)
    assert first.responses.retrieve(queued.id).status == "cancelled"
    assert second.responses.cancel(queued.id).status == "cancelled"  # again: answered as it is
    sync = first.responses.create(model="llama-3", input="quick")
    with pytest.raises(openai.BadRequestError, match="background=true"):
        first.responses.cancel(sync.id)


def test_background_refusals_and_the_replica_limit(rp):
    client = next(rp.clients())
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="llama-3", input="x", background=True, store=False)
    assert e.value.body["param"] == "store"
    hold = threading.Event()
    for server in rp.chat:
        server.script.extend([Reply(text="a", hold=hold), Reply(text="b", hold=hold)])
    running = [client.responses.create(model="llama-3", input=f"job {n}", background=True) for n in range(2)]
    try:
        with pytest.raises(openai.RateLimitError) as e:  # limits.background_max_runs: 2 on this replica
            client.responses.create(model="llama-3", input="one more", background=True)
        assert e.value.code == "background_limit_reached"
    finally:
        hold.set()
    for r in running:
        assert wait_until(lambda r=r: client.responses.retrieve(r.id).status == "completed", timeout=20)


# -- background streams: the run's event log, followed and resumed on any replica -----------------------

def dumped(stream) -> list[dict]:
    return [e.model_dump(mode="json", exclude_unset=True) for e in stream]


def test_a_background_stream_dropped_midway_is_resumed_on_the_other_replica(rp):
    hold = threading.Event()
    rp.chat[0].script.append(Reply(text="Deep streamed answer.", hold=hold, pieces=6))
    first, second = itertools.islice(rp.clients(), 2)
    seen = []
    stream = first.responses.create(model="llama-3", input="research this", background=True, stream=True)
    for event in stream:  # the upstream holds after its first chunk: the client drops there
        seen.append(event.model_dump(mode="json", exclude_unset=True))
        if event.type == "response.in_progress":
            break
    stream.close()
    assert [(e["type"], e["sequence_number"]) for e in seen] == [("response.created", 0), ("response.in_progress", 1)]
    created = seen[0]["response"]
    assert (created["status"], created["background"]) == ("queued", True)
    resumed = second.responses.retrieve(created["id"], stream=True, starting_after=1)  # the other replica
    hold.set()  # the run goes on meanwhile: followed live from the store
    for event in resumed:  # dropped again, mid-text this time, and resumed on the first replica
        seen.append(event.model_dump(mode="json", exclude_unset=True))
        if event.type == "response.output_text.delta":
            break
    resumed.close()
    assert seen[2]["sequence_number"] == 2 and seen[-1]["delta"] == "Deep"
    rest = dumped(first.responses.retrieve(created["id"], stream=True, starting_after=seen[-1]["sequence_number"]))
    assert rest[0]["sequence_number"] == seen[-1]["sequence_number"] + 1
    final = check_stream(seen + rest)  # one stream: continuous sequence numbers, every event valid
    assert final["id"] == created["id"] and final["status"] == "completed"
    assert final["output"][0]["content"][0]["text"] == "Deep streamed answer."
    assert first.responses.retrieve(created["id"]).output_text == "Deep streamed answer."
    assert dumped(first.responses.retrieve(created["id"], stream=True)) == seen + rest  # the same log, whole
    assert len(rp.chat_requests()) == 1


def test_a_finished_background_stream_is_replayed_from_any_cursor_and_only_for_its_tenant(rp):
    rp.chat[0].script.extend([Reply(text="All of it, in pieces.", pieces=5), Reply(text="polled")])
    first, second = itertools.islice(rp.clients(), 2)
    whole = dumped(first.responses.create(model="llama-3", input="go", background=True, stream=True))
    final = check_stream(whole)
    rid = final["id"]
    assert wait_until(lambda: second.responses.retrieve(rid).status == "completed", timeout=20)
    last = whole[-1]["sequence_number"]
    for after in (0, 4, last - 1, last):
        assert dumped(second.responses.retrieve(rid, stream=True, starting_after=after)) == whole[after + 1:]
    with pytest.raises(openai.NotFoundError):  # another tenant streams nothing
        dumped(next(rp.clients("other-key")).responses.retrieve(rid, stream=True))
    polled = first.responses.create(model="llama-3", input="no stream", background=True)
    assert wait_until(lambda: first.responses.retrieve(polled.id).status == "completed", timeout=20)
    with pytest.raises(openai.BadRequestError, match="stream=true"):  # only a streamed one has a log
        dumped(second.responses.retrieve(polled.id, stream=True))


def test_a_background_stream_cancelled_midway_ends_with_the_cancelled_response(rp):
    hold = threading.Event()
    rp.chat[0].script.append(Reply(text="never sent", hold=hold))
    first, second = itertools.islice(rp.clients(), 2)
    cancelled_before = rp.background_runs(0, "cancelled") + rp.background_runs(1, "cancelled")
    try:
        stream = first.responses.create(model="llama-3", input="long job", background=True, stream=True)
        events = []
        for event in stream:
            events.append(event.model_dump(mode="json", exclude_unset=True))
            if event.type == "response.in_progress":
                assert second.responses.cancel(event.response.id).status == "cancelled"  # the other replica
        final = check_stream(events)  # the stream goes on to its end: the cancelled response
        assert (events[-1]["type"], final["status"]) == ("response.failed", "cancelled")
        assert first.responses.retrieve(final["id"]).status == "cancelled"
    finally:
        hold.set()
    assert wait_until(lambda: rp.background_runs(0, "cancelled") + rp.background_runs(1, "cancelled")
                      == cancelled_before + 1, timeout=20)


def test_a_background_stream_over_the_event_limit_fails_there(rp):
    """limits.background_max_events: 30 here; 60 text deltas pass it, so the log ends at it, in the
    stream's grammar (the open message done, incomplete), and the response is failed with that error."""
    rp.chat[0].script.append(Reply(text="x" * 60, pieces=60))
    client = next(rp.clients())
    raw = client.responses.with_raw_response.create(model="llama-3", input="talk", background=True, stream=True)
    events = sse_events(raw.http_response.read())  # the SDK raises at the error event: read the bytes
    final = check_stream(events)
    assert [e["type"] for e in events[-3:]] == ["response.output_item.done", "error", "response.failed"]
    assert [e["sequence_number"] for e in events if e["type"] == "response.output_text.delta"][-1] == 29
    assert final["status"] == "failed" and final["error"]["code"] == "background_events_limit"
    assert final["output"][0]["status"] == "incomplete"
    assert wait_until(lambda: client.responses.retrieve(final["id"]).status == "failed", timeout=20)
    assert client.responses.retrieve(final["id"]).error.code == "background_events_limit"


def test_a_run_whose_replica_died_is_failed_on_poll_and_its_stream_ends_on_the_other_replica(rp):
    """Replica 0's sidecar crashes with two runs in flight: its runs stop renewing their leases
    (limits.background_lease_seconds: 4 here), so replica 1 reports the polled one `failed`
    (background_run_lost) instead of `in_progress` forever, and a stream of the other, resumed on
    replica 1, ends with that error instead of waiting for background_max_seconds. The poll that
    records it counts it in replica 1's extproc_background_runs_total{outcome="lost"}, once."""
    hold = threading.Event()
    rp.chat[0].script.extend([Reply(text="never", hold=hold), Reply(text="never", hold=hold)])
    first, second = itertools.islice(rp.clients(), 2)
    try:
        polled = first.responses.create(model="llama-3", input="long job", background=True)
        stream = first.responses.create(model="llama-3", input="long stream", background=True, stream=True)
        seen = []
        for event in stream:
            seen.append(event.model_dump(mode="json", exclude_unset=True))
            if event.type == "response.in_progress":
                break
        streamed = seen[0]["response"]["id"]
        assert wait_until(lambda: second.responses.retrieve(polled.id).status == "in_progress", timeout=20)
        assert second.responses.retrieve(polled.id).status == "in_progress"  # alive: its lease renewed
        lost_before = rp.background_runs(1, "lost")
        rp.crash_sidecar(0)
        stream.close()
        assert wait_until(lambda: second.responses.retrieve(polled.id).status == "failed", timeout=30)
        assert rp.background_runs(1, "lost") == lost_before + 1
        failed = json.loads(second.responses.with_raw_response.retrieve(polled.id).text)
        validate_response(failed)
        assert failed["id"] == polled.id and failed["error"]["code"] == "background_run_lost"
        assert second.responses.retrieve(polled.id).status == "failed"  # and stays so
        assert rp.background_runs(1, "lost") == lost_before + 1  # a later poll counts nothing more
        raw = second.responses.with_raw_response.retrieve(streamed, stream=True, starting_after=1)
        events = sse_events(raw.http_response.read())  # the SDK raises at the error event: read the bytes
        assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "background_run_lost"
        assert [e.get("sequence_number") for e in events[:-1]] == list(range(2, len(events) + 1))
    finally:
        hold.set()
        rp.start_sidecar(0)
    assert first.responses.create(model="llama-3", input="back").status == "completed"  # replica 0 serves again


# -- limits.background_max_seconds: a run that takes longer is failed, polled or streamed ----------------

BRIEF = """
listen: 127.0.0.1:{port}
admin_listen: off
websocket_listen: 127.0.0.1:{front}
websocket_gateway: http://127.0.0.1:{envoy}
limits:
  background_max_seconds: 2
backends:
  - {{name: vllm-chat, api: chat, models: ["llama-*"], endpoints: ["{chat}"]}}
"""


@pytest.fixture(scope="module")
def brief(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[openai.OpenAI, ChatServer]]:
    """One gateway whose background runs may take 2 s (limits.background_max_seconds)."""
    chat = ChatServer()
    port, listen, front = free_port(), free_port(), free_port()
    cfg = Path(tmp_path_factory.mktemp("brief")) / "config.yaml"
    cfg.write_text(BRIEF.format(port=port, front=front, envoy=listen, chat=chat.address))
    with running(cfg, port, listen, servers=(chat,), ready=(front,), websocket=front):
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{listen}/v1", api_key="k", max_retries=0, timeout=30), chat


def test_a_background_run_past_its_lifetime_is_failed_when_polled_and_streamed(brief):
    """The upstream never finishes: the run is stopped at limits.background_max_seconds, recorded
    `failed` (background_timeout) for the poll, and a streamed one's log ends there in the stream's
    grammar (the error, then response.failed, its last event), long before the upstream would."""
    client, chat = brief
    hold = threading.Event()
    chat.reset()
    chat.script.extend([Reply(text="never finished", hold=hold), Reply(text="never streamed", hold=hold, pieces=4)])
    try:
        polled = client.responses.create(model="llama-3", input="too long", background=True)
        raw = client.responses.with_raw_response.create(model="llama-3", input="too long, streamed",
                                                        background=True, stream=True)
        events = sse_events(raw.http_response.read())  # the SDK raises at the error event: read the bytes
        assert wait_until(lambda: client.responses.retrieve(polled.id).status != "in_progress", timeout=20)
        failed = json.loads(client.responses.with_raw_response.retrieve(polled.id).text)
    finally:
        hold.set()
    validate_response(failed)
    assert (failed["status"], failed["error"]["code"]) == ("failed", "background_timeout")
    final = check_stream(events)  # one stream, every event valid: nothing after its terminal event
    assert [e["type"] for e in events[2:]] == ["error", "response.failed"]
    assert events[-2]["error"]["code"] == "background_timeout" and final["status"] == "failed"
    assert client.responses.retrieve(final["id"]).error.code == "background_timeout"
    assert len(chat.requests) == 2  # each run sent once, never retried

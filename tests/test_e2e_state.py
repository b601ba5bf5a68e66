"""End to end: conversation pinning and sidecar-held state, two sidecar replicas sharing a real Redis.

Topology on loopback: three stateful Responses instances (each knows only the ids it produced, like
vLLM), two chat-only instances, Redis, and two replicas (each an Envoy with its own sidecar). Turns
alternate between the replicas, so every continued turn depends on the shared records.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from extproc.local.stack import free_port, wait_until

from .conformance import validate_response
from .conftest import RedisServer, Replicated, running
from .test_e2e_conversations import calls_on_a_conversation
from .upstreams import ChatServer, HostedServer, MixedServer, Reply, ResponsesServer

CONFIG = """
listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin_port}
state:
  store: redis
  redis_url: {redis}
  timeout_ms: 300
  learn_ttl_seconds: 3
discovery:
  interval_seconds: 5
backends:
  - name: vllm-responses
    api: responses
    models: ["gpt-oss-*"]
    endpoints: [{resp}]
    conversations: passthrough
  - name: vllm-chat
    api: chat
    models: ["llama-*"]
    endpoints: [{chat}]
  - name: mixed
    api: auto
    models: ["mix-*"]
    endpoints: ["{mixed}"]
  - name: mounted
    api: auto
    models: ["mnt-*"]
    endpoints: ["{mounted}"]
    path_prefix: /mounted
"""
MIXED_MODELS = [{"id": "mix-listed", "object": "model", "supported_endpoints": ["/v1/responses"]},
                {"id": "mix-general", "object": "model"}]
TOOLS = [{"type": "function", "name": "lookup", "description": "Look up a fact", "strict": False,
          "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}]


@dataclass
class Replicas(Replicated):
    resp: list[ResponsesServer]
    chat: list[ChatServer]
    mixed: MixedServer
    mounted: HostedServer  # the same, answering only under /mounted (a proxy's mount)
    redis: RedisServer

    def redis_client(self):
        import redis

        return redis.Redis.from_url(self.redis.url)

    def holder(self, response_id: str) -> ResponsesServer:
        (server,) = [s for s in self.resp if response_id in s.stored]
        return server

    def conversation_holder(self, conversation_id: str) -> ResponsesServer:
        (server,) = [s for s in self.resp if conversation_id in s.conversations]
        return server

    def restart_sidecar(self, i: int) -> None:
        self.stop_sidecar(i)
        self.start_sidecar(i)


@pytest.fixture(scope="module")
def replicas(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    resp = [ResponsesServer() for _ in range(3)]
    chat = [ChatServer() for _ in range(2)]
    mixed = MixedServer(responses_only={"mix-agent"}, chat_only={"mix-chatonly"}, models=MIXED_MODELS)
    mounted = HostedServer(None, ("authorization", "Bearer k"), prefix="/mounted", responses_only={"mnt-agent"})
    tmp = Path(tmp_path_factory.mktemp("replicas"))
    urls, configs, stacks, ports = [], [], [], []
    with contextlib.ExitStack() as started:
        for server in (*resp, *chat, mixed, mounted):
            started.callback(server.close)  # last, once both stacks are stopped
        for i in range(2):
            port, listen = free_port(), free_port()
            cfg = tmp / f"config-{i}.yaml"
            cfg.write_text(CONFIG.format(port=port, admin_port=free_port(), redis=redis_server.url, mixed=mixed.address,
                                         mounted=mounted.address,
                                         resp=", ".join(f'"{s.address}"' for s in resp),
                                         chat=", ".join(f'"{s.address}"' for s in chat)))
            stacks.append(started.enter_context(running(cfg, port, listen)))
            urls.append(f"http://127.0.0.1:{listen}")
            configs.append(cfg)
            ports.append((port,))
        yield Replicas(urls, configs, stacks, ports, resp, chat, mixed, mounted, redis_server)


def turn(client: openai.OpenAI, model: str, inp, prev: str | None, stream: bool, **kw):
    if prev is not None:
        kw["previous_response_id"] = prev
    if stream:
        with client.responses.stream(model=model, input=inp, **kw) as s:
            for _ in s:
                pass
            return s.get_final_response()
    return client.responses.create(model=model, input=inp, **kw)


def converse(replicas: Replicas, model: str, script: list[Reply], on_turn=None) -> list:
    """Twenty turns, each with previous_response_id, alternating replicas, streamed every third turn,
    with a tool call at turn 10 answered at turn 11."""
    clients = replicas.clients()
    responses = []
    prev = None
    for i in range(1, 21):
        if i == 10:
            for s in script:
                s.append(Reply(text=None, calls=[("lookup", '{"q": "capital"}')]))
        inp = f"turn {i}: my name is Zed" if i == 1 else f"turn {i}"
        if i == 11:
            call = next(o for o in responses[-1].output if o.type == "function_call")
            inp = [{"type": "function_call_output", "call_id": call.call_id, "output": "Paris"}]
        r = turn(next(clients), model, inp, prev, stream=i % 3 == 0, tools=TOOLS)
        for s in script:  # the scripted tool call went to one instance; the others must not keep it
            s.clear()
        assert r.previous_response_id == prev
        if on_turn is not None:
            on_turn(i, r)
        responses.append(r)
        prev = r.id
    return responses


def test_twenty_turns_stay_pinned_to_the_responses_instance(replicas):
    def check(i, r):
        holder = replicas.holder(r.id)  # exactly one instance produced it
        if i > 1:
            last = holder.requests[-1]
            assert last["body"]["previous_response_id"] == previous[0]
            assert previous[0] in holder.stored  # the instance that continued it is the one that held it
        previous[:] = [r.id]

    previous: list[str] = []
    responses = converse(replicas, "gpt-oss-20b", [s.script for s in replicas.resp], check)
    assert responses[9].output[0].type == "function_call"
    first = replicas.holder(responses[0].id)
    assert all(replicas.holder(r.id) is first for r in responses)  # one conversation, one instance

    clients = replicas.clients()
    last = responses[-1]
    got = next(clients).responses.retrieve(last.id)  # GET follows the pin, from either replica
    assert got.id == last.id and got.output_text == last.output_text
    items = next(clients).responses.input_items.list(last.id)
    assert [it.content[0].text for it in items.data] == ["turn 20"]
    deleted = next(clients).responses.with_raw_response.delete(last.id)  # the SDK's delete() returns None
    assert (deleted.status_code, json.loads(deleted.text)) == (200, {"id": last.id, "object": "response", "deleted": True})
    assert last.id not in first.stored
    with pytest.raises(openai.NotFoundError):
        next(clients).responses.retrieve(last.id)


def test_first_turns_spread_over_instances(replicas):
    client = next(replicas.clients())
    for i in range(30):
        client.responses.create(model="gpt-oss-20b", input="hello", prompt_cache_key=f"user-{i}")
    assert all(s.stored for s in replicas.resp)


def test_background_on_a_responses_backend_passes_through_pinned(replicas):
    """`background` on a Responses backend is the backend's: created through one replica, polled and
    cancelled through the other, every call reaching the one instance that runs it."""
    one, other = replicas.client(0), replicas.client(1)
    queued = one.responses.create(model="gpt-oss-20b", input="hello", background=True, prompt_cache_key="bg-1")
    assert queued.status == "queued" and queued.background is True
    holder = replicas.holder(queued.id)
    seen = [other.responses.retrieve(queued.id).status for _ in range(2)]  # the upstream runs one step per poll
    assert seen == ["in_progress", "completed"] and other.responses.retrieve(queued.id).output_text
    assert {r["path"] for r in holder.requests if queued.id in r["path"]} == {f"/v1/responses/{queued.id}"}

    running = one.responses.create(model="gpt-oss-20b", input="hello", background=True, prompt_cache_key="bg-2")
    cancelled = other.responses.cancel(running.id)
    assert cancelled.id == running.id and cancelled.status == "cancelled"
    assert one.responses.retrieve(running.id).status == "cancelled"  # stays cancelled, through either replica
    assert replicas.holder(running.id).stored[running.id]["response"]["status"] == "cancelled"
    assert replicas.holder(running.id).requests[-2]["path"] == f"/v1/responses/{running.id}/cancel"


def test_a_background_stream_on_a_responses_backend_resumes_pinned(replicas):
    """A streamed `background` response of a Responses backend is the backend's too: resumed with
    `starting_after` through the other replica, from the instance that holds it, byte for byte its
    events; another tenant's resume is the unknown id's 404 and reaches no instance."""
    one, other = replicas.client(0), replicas.client(1)
    whole = [e.model_dump(mode="json", exclude_unset=True) for e in one.responses.create(
        model="gpt-oss-20b", input="hello there", background=True, stream=True, prompt_cache_key="bg-stream")]
    rid = whole[0]["response"]["id"]
    holder = replicas.holder(rid)
    resumed = [e.model_dump(mode="json", exclude_unset=True)
               for e in other.responses.retrieve(rid, stream=True, starting_after=2)]
    assert resumed == whole[3:] and resumed[-1]["type"] == "response.completed"
    assert holder.requests[-1]["path"] == f"/v1/responses/{rid}?starting_after=2&stream=true"  # as the SDK sent it
    seen = sum(len(s.requests) for s in replicas.resp)
    with pytest.raises(openai.NotFoundError):
        list(replicas.client(1, "other-key").responses.retrieve(rid, stream=True, starting_after=2))
    assert sum(len(s.requests) for s in replicas.resp) == seen


def _text(item) -> str:
    return item.content[0].text


def test_conversations_on_a_responses_backend_pass_through_pinned(replicas):
    """`conversations: passthrough`: the Conversations API is the Responses backend's own. A conversation
    created through one replica lives on one instance; every call on it and every turn that names it
    reaches that instance, through either replica, untouched."""
    clients = replicas.clients()
    conv = next(clients).conversations.create(metadata={"topic": "names"},
                                              items=[{"type": "message", "role": "user", "content": "I am Zed"}])
    holder = replicas.conversation_holder(conv.id)  # exactly one instance made it
    before = [len(s.requests) for s in replicas.resp]
    assert conv.id.startswith("conv_") and conv.metadata == {"topic": "names"}
    assert next(clients).conversations.retrieve(conv.id).created_at == conv.created_at
    assert next(clients).conversations.update(conv.id, metadata={"topic": "trips"}).metadata == {"topic": "trips"}
    first = next(clients).responses.create(model="gpt-oss-20b", conversation=conv.id, input="who am I?",
                                           prompt_cache_key="elsewhere")  # the conversation's pin wins
    second = turn(next(clients), "gpt-oss-20b", "and now?", None, stream=True, conversation={"id": conv.id})
    sent = [r["body"] for r in holder.requests[before[replicas.resp.index(holder)]:] if r["path"] == "/v1/responses"]
    assert [b["conversation"] for b in sent] == [conv.id, {"id": conv.id}]  # passed on as the client sent it
    assert all("previous_response_id" not in b for b in sent) and [b["input"] for b in sent] == ["who am I?", "and now?"]
    assert first.id in holder.stored and second.id in holder.stored  # and each turn's id pinned there
    assert next(clients).responses.retrieve(second.id).output_text == "echo: and now?"
    added = next(clients).conversations.items.create(conv.id, items=[
        {"type": "message", "role": "assistant", "content": f"note {n}"} for n in range(3)])
    assert [_text(i) for i in added.data] == ["note 0", "note 1", "note 2"]
    pages = next(clients).conversations.items.list(conv.id, limit=2, order="asc")  # the SDK follows the cursor
    assert [_text(i) for i in pages] == ["I am Zed", "who am I?", "echo: who am I?", "and now?", "echo: and now?",
                                        "note 0", "note 1", "note 2"]
    note = added.data[1].id
    assert _text(next(clients).conversations.items.retrieve(note, conversation_id=conv.id)) == "note 1"
    assert next(clients).conversations.items.delete(note, conversation_id=conv.id).id == conv.id
    with pytest.raises(openai.NotFoundError) as e:
        next(clients).conversations.items.retrieve(note, conversation_id=conv.id)
    assert e.value.code == "item_not_found"  # the backend's own answer
    others = [len(s.requests) for s in (*replicas.chat, replicas.mixed)]
    for model, served_by in (("llama-3", "vllm-chat"), ("mix-agent", "mixed")):  # a chat model, another backend
        raw = next(clients).responses.with_raw_response.create
        with pytest.raises(openai.BadRequestError) as e:  # only the backend holding it can continue it
            raw(model=model, conversation=conv.id, input="hi", stream=model == "mix-agent")
        assert e.value.response.json() == {"error": {
            "message": f"Conversation '{conv.id}' is held by backend 'vllm-responses', so only its models can "
                       f"continue it; model '{model}' is served by backend '{served_by}'. Use a model of "
                       f"'vllm-responses', or send the conversation's items (GET /v1/conversations/{conv.id}/items) "
                       "as 'input' without 'conversation'",
            "type": "invalid_request_error", "param": "conversation", "code": "invalid_value"}}
    assert [len(s.requests) for s in (*replicas.chat, replicas.mixed)] == others  # refused before any upstream
    assert [len(s.requests) - n for s, n in zip(replicas.resp, before, strict=True) if s is not holder] == [0, 0]
    assert not replicas.redis_client().keys(f"extproc:conv:*{conv.id}")  # the sidecar holds none of it
    deleted = next(clients).conversations.delete(conv.id)
    assert (deleted.id, deleted.deleted) == (conv.id, True) and conv.id not in holder.conversations
    with pytest.raises(openai.NotFoundError):
        next(clients).conversations.retrieve(conv.id)


def test_a_deleted_passed_through_conversation_leaves_no_pin(replicas):
    """The backend's 200 to `DELETE /v1/conversations/{id}` removes the id's pin: later calls and turns
    naming it get the unknown id's 404 from the gateway, through either replica, and reach no instance.
    A delete the backend refuses (it no longer holds the conversation) leaves the pin as it was."""
    clients = replicas.clients()
    conv = next(clients).conversations.create(items=[{"type": "message", "role": "user", "content": "bye"}])
    pins = replicas.redis_client()
    assert len(pins.keys(f"*convpin:*{conv.id}")) == 1
    assert next(clients).conversations.delete(conv.id).deleted is True
    assert pins.keys(f"*convpin:*{conv.id}") == []
    seen = sum(len(s.requests) for s in replicas.resp)
    owner = next(clients)
    for client in (owner, next(clients)):  # both replicas
        attempts = [lambda c, cid: c.conversations.retrieve(cid), lambda c, cid: c.conversations.delete(cid),
                    lambda c, cid: list(c.conversations.items.list(cid)),
                    lambda c, cid: c.responses.create(model="gpt-oss-20b", conversation=cid, input="still there?")]
        for attempt in attempts:
            with pytest.raises(openai.NotFoundError) as gone:
                attempt(client, conv.id)
            with pytest.raises(openai.NotFoundError) as unknown:
                attempt(client, "conv_nobody_made")
            assert gone.value.body["code"] == "conversation_not_found"
            assert json.dumps(gone.value.body).replace(conv.id, "ID") == \
                json.dumps(unknown.value.body).replace("conv_nobody_made", "ID")
    assert sum(len(s.requests) for s in replicas.resp) == seen  # answered by the gateway alone

    kept = next(clients).conversations.create()
    holder = replicas.conversation_holder(kept.id)
    del holder.conversations[kept.id]  # the backend lost it (expired there): its delete is a 404
    with pytest.raises(openai.NotFoundError):
        next(clients).conversations.delete(kept.id)
    assert len(pins.keys(f"*convpin:*{kept.id}")) == 1  # not a success: the pin stays
    before = len(holder.requests)
    with pytest.raises(openai.NotFoundError):
        next(clients).conversations.retrieve(kept.id)
    assert len(holder.requests) == before + 1  # still sent to the instance that held it


def test_another_tenant_gets_404_on_a_passed_through_conversation(replicas):
    """The pin of a backend's conversation is its tenant's: another key's calls are answered as for an id
    nobody made, and reach no instance."""
    owner = next(replicas.clients())
    conv = owner.conversations.create(items=[{"type": "message", "role": "user", "content": "secret"}])
    item_id = next(iter(owner.conversations.items.list(conv.id))).id
    other = replicas.client(1, "other-key")
    seen = sum(len(s.requests) for s in replicas.resp)
    for attempt in calls_on_a_conversation(item_id, ("gpt-oss-20b",)):
        with pytest.raises(openai.NotFoundError) as theirs:
            attempt(other, conv.id)
        with pytest.raises(openai.NotFoundError) as unknown:
            attempt(owner, "conv_nobody_made")
        assert json.dumps(theirs.value.body).replace(conv.id, "ID") == \
            json.dumps(unknown.value.body).replace("conv_nobody_made", "ID")
        assert theirs.value.body["code"] == "conversation_not_found"
    assert sum(len(s.requests) for s in replicas.resp) == seen  # no instance saw any of them
    assert [_text(i) for i in owner.conversations.items.list(conv.id)] == ["secret"]
    assert owner.conversations.retrieve(conv.id).metadata == {}


def test_twenty_turns_on_a_chat_backend_through_sidecar_state(replicas):
    responses = converse(replicas, "llama-3", [s.script for s in replicas.chat])
    client = next(replicas.clients())
    for r in responses:  # every stored turn, as GET returns it, is a valid Response
        validate_response(json.loads(client.responses.with_raw_response.retrieve(r.id).text))
    bodies = [req["body"] for s in replicas.chat for req in s.requests]
    final = next(b for b in bodies if b["messages"][-1].get("content") == "turn 20")
    texts = [m.get("content") for m in final["messages"]]
    assert texts[0] == "turn 1: my name is Zed"  # the fact from turn 1 reaches the model at turn 20
    assert texts.count("turn 19") == 1 and len([m for m in final["messages"] if m["role"] == "user"]) == 19
    assert any(m["role"] == "tool" and m["content"] == "Paris" for m in final["messages"])

    clients = replicas.clients()
    last = responses[-1]
    got = next(clients).responses.retrieve(last.id)  # answered by the sidecar from the shared store
    assert got.model_dump(mode="json") == last.model_dump(mode="json")
    items = next(clients).responses.input_items.list(responses[10].id)
    assert [it.type for it in items.data] == ["function_call_output"]
    next(clients).responses.delete(last.id)
    with pytest.raises(openai.NotFoundError):
        next(clients).responses.retrieve(last.id)
    with pytest.raises(openai.NotFoundError) as e:
        turn(next(clients), "llama-3", "again", last.id, stream=False)
    assert e.value.body["code"] == "previous_response_not_found"


def test_store_false_is_not_kept(replicas):
    clients = replicas.clients()
    r = next(clients).responses.create(model="llama-3", input="secret", store=False)
    with pytest.raises(openai.NotFoundError):
        next(clients).responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as e:
        next(clients).responses.create(model="llama-3", input="more", previous_response_id=r.id)
    assert e.value.body["param"] == "previous_response_id"


def test_conversation_holds_across_a_replica_restart(replicas):
    clients = replicas.clients()
    prev = {}
    for model in ("gpt-oss-20b", "llama-3"):
        prev[model] = next(clients).responses.create(model=model, input="remember 42").id
    replicas.restart_sidecar(0)
    replicas.restart_sidecar(1)
    for model in ("gpt-oss-20b", "llama-3"):
        for _ in range(2):
            prev[model] = next(clients).responses.create(model=model, input="and now?",
                                                         previous_response_id=prev[model]).id
    users = [[m["content"] for m in req["body"]["messages"] if m["role"] == "user"]
             for s in replicas.chat for req in s.requests]
    assert ["remember 42", "and now?", "and now?"] in users


def test_unknown_previous_response_id(replicas):
    client = next(replicas.clients())
    with pytest.raises(openai.NotFoundError) as e:  # chat backend: the sidecar is the state and has none
        client.responses.create(model="llama-3", input="x", previous_response_id="resp_never")
    assert e.value.body["code"] == "previous_response_not_found"
    # Responses backend that checks no caller's key (vLLM): an id with no record could be anyone's, so the
    # sidecar refuses it too, and no instance sees it (docs/security.md; authenticates_callers changes it).
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="gpt-oss-20b", input="x", previous_response_id="resp_never")
    assert e.value.body["code"] == "previous_response_not_found"
    assert not [q for s in replicas.resp for q in s.requests if (q["body"] or {}).get("previous_response_id") == "resp_never"]


def test_model_api_learned_from_a_rejection_and_shared(replicas):
    a, b = replicas.client(0), replicas.client(1)
    msgs = [{"role": "user", "content": "hi"}]
    first_contact = time.monotonic()
    start = len(replicas.mixed.requests)
    r = a.chat.completions.create(model="mix-agent", messages=msgs)  # first contact: rejected, retried, translated
    assert r.choices[0].message.content
    assert [q["path"] for q in replicas.mixed.requests[start:]] == ["/v1/chat/completions", "/v1/responses"]
    r = b.chat.completions.create(model="mix-agent", messages=msgs)  # the other replica knows it already
    assert r.choices[0].message.content and replicas.mixed.requests[-1]["path"] == "/v1/responses"
    assert len(replicas.mixed.requests) == start + 3
    r = a.chat.completions.create(model="mix-agent", messages=msgs, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in r if c.choices)
    stored = replicas.redis_client().get("extproc:mode:mixed:mix-agent")
    assert json.loads(stored)["mode"] == "responses"

    assert a.responses.create(model="mix-chatonly", input="hi").output_text  # the mirror case
    assert replicas.mixed.requests[-1]["path"] == "/v1/chat/completions"
    assert b.responses.create(model="mix-chatonly", input="hi").output_text
    assert replicas.mixed.requests[-1]["path"] == "/v1/chat/completions"

    assert a.chat.completions.create(model="mix-general", messages=msgs).choices[0].message.content
    listing = subprocess.run([sys.executable, "-m", "extproc", "learned", "--config", str(replicas.configs[0])],
                             capture_output=True, text=True, timeout=30)
    assert "mixed:mix-agent\tneeds=responses" in listing.stdout
    assert "mixed:mix-general\tneeds=-\tanswered_on=chat" in listing.stdout
    admin = "http://" + replicas.configs[1].read_text().split("admin_listen: ")[1].split()[0]
    with urllib.request.urlopen(admin + "/learned", timeout=5) as r:  # the same, from the admin port
        assert json.loads(r.read())["mixed:mix-agent"]["mode"] == "responses"

    def learned_again() -> bool:
        """learn_ttl_seconds: 3. Until then the model goes straight to /v1/responses; after, the chat
        request is sent as is, rejected and retried translated, as at first contact."""
        start = len(replicas.mixed.requests)
        assert a.chat.completions.create(model="mix-agent", messages=msgs).choices[0].message.content
        paths = [q["path"] for q in replicas.mixed.requests[start:]]
        assert paths in (["/v1/responses"], ["/v1/chat/completions", "/v1/responses"]), paths
        return len(paths) == 2

    assert wait_until(learned_again, timeout=15, interval=0.2), "what was learned never expired"
    assert time.monotonic() - first_contact >= 3  # not before its time
    forget = urllib.request.Request(admin + "/learned?model=mixed:mix-agent", method="DELETE")
    with urllib.request.urlopen(forget, timeout=5) as r:  # an operator clears it: learned afresh
        assert json.loads(r.read()) == {"forgotten": ["mixed:mix-agent"]}
    assert replicas.redis_client().get("extproc:mode:mixed:mix-agent") is None


def test_models_list_has_a_mode_for_every_model(replicas):
    client = next(replicas.clients())
    deadline = time.monotonic() + 10
    while True:  # discovery runs beside the server; it lists mix-listed once it has read /v1/models
        models = {m.id: m.model_dump() for m in client.models.list()}
        if "mix-listed" in models or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert models["mix-listed"]["mode"] == "responses" and models["mix-listed"]["backend"] == "mixed"
    assert models["mix-general"]["mode"] in ("unknown", "chat")
    assert all(m["mode"] in ("chat", "responses", "both", "unknown") for m in models.values())
    r = client.chat.completions.create(model="mix-listed", messages=[{"role": "user", "content": "x"}])
    assert r.choices[0].message.content and replicas.mixed.requests[-1]["path"] == "/v1/responses"


def test_endpoint_removed_from_config_while_pinned(replicas):
    a = replicas.client(0)
    r = a.responses.create(model="gpt-oss-20b", input="hi", prompt_cache_key="removed-test")
    gone = replicas.holder(r.id).address
    original = replicas.configs[0].read_text()
    replicas.configs[0].write_text(original.replace(f'"{gone}", ', "").replace(f', "{gone}"', ""))
    try:
        deadline = time.monotonic() + 10
        while True:  # the sidecar picks the file change up by itself
            try:
                a.responses.create(model="gpt-oss-20b", input="again", previous_response_id=r.id)
            except openai.ConflictError as e:
                assert e.body["code"] == "pinned_backend_gone" and gone in e.body["message"]
                break
            assert time.monotonic() < deadline, "config change not applied"
            time.sleep(0.3)
    finally:
        replicas.configs[0].write_text(original)
    deadline = time.monotonic() + 10
    while True:  # restored: the conversation goes on where it was
        try:
            a.responses.create(model="gpt-oss-20b", input="back", previous_response_id=r.id)
            break
        except openai.ConflictError:
            assert time.monotonic() < deadline
            time.sleep(0.3)


def test_pinned_instance_down_is_a_clear_error(replicas):
    client = next(replicas.clients())
    r = client.responses.create(model="gpt-oss-20b", input="hi", prompt_cache_key="down-test")
    holder = replicas.holder(r.id)
    holder.close()
    with pytest.raises(openai.APIStatusError) as e:
        client.responses.create(model="gpt-oss-20b", input="again", previous_response_id=r.id)
    assert e.value.status_code == 503
    assert e.value.body["code"] == "pinned_backend_unavailable" and holder.address in e.value.body["message"]


def test_redis_outage_degrades_clearly(replicas):
    client = next(replicas.clients())
    chat_prev = client.responses.create(model="llama-3", input="before").id
    replicas.redis.stop()
    try:
        r = client.responses.create(model="llama-3", input="first turns still work")
        assert r.output_text
        with pytest.raises(openai.APIStatusError) as e:
            client.responses.create(model="llama-3", input="x", previous_response_id=chat_prev)
        assert e.value.status_code == 503 and e.value.body["code"] == "state_unavailable"
        # A first contact: its note for the retry is not written, so the retry finds the client's path
        # under the backend's path_prefix by itself, and the fact this replica learned sends it translated.
        r = client.chat.completions.create(model="mnt-agent", messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content == "echo: hi"
        posts = [q["path"] for q in replicas.mounted.seen if q["path"] != "/mounted/v1/models"]  # not discovery's
        assert posts == ["/mounted/v1/chat/completions", "/mounted/v1/responses"]
    finally:
        replicas.redis.start()
    assert json.loads(json.dumps(e.value.body))["message"]

"""End to end through the real Envoy (deploy/envoy.yaml) and deploy/config.yaml's demo backends: the
README's first curl lines, both directions of the demo, and WebSocket mode of /v1/responses."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import yaml
from websockets.sync.client import connect

from extproc.local.stack import REPO, Stack, free_port, wait_for_port

from .conformance import check_stream, validate, validate_response
from .test_e2e_agents import CODEX, codex
from .upstreams import COMPACTED, ChatServer, MixedServer, Reply, ResponsesServer


@dataclass
class Surface:
    url: str
    ws_url: str
    chat: ChatServer
    resp: list[ResponsesServer]
    vllm: ChatServer  # chat only, on an `auto` backend: /v1/responses is a 404 there
    mixed: MixedServer  # both APIs, some models on one only, on an `auto` backend
    stack: Stack
    admin: str

    def client(self, api_key: str = "client-key") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def surface(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Surface]:
    """deploy/config.yaml as shipped (ports rewritten) plus a strict chat test upstream and a Responses
    backend of two stateful instances (each knows only its own response ids)."""
    chat, resp = ChatServer(), [ResponsesServer(), ResponsesServer()]
    vllm, mixed = ChatServer(), MixedServer(responses_only=set(), chat_only=set(), models=[])
    demo_port, extproc_port, port, admin, ws_port = (free_port() for _ in range(5))
    doc = yaml.safe_load((REPO / "deploy" / "config.yaml").read_text().replace("127.0.0.1:8001", f"127.0.0.1:{demo_port}"))
    admin_port = free_port()
    doc.update(listen=f"127.0.0.1:{extproc_port}", admin_listen=f"127.0.0.1:{admin_port}",
               websocket_listen=f"127.0.0.1:{ws_port}", websocket_gateway=f"http://127.0.0.1:{port}")
    doc["backends"] += [{"name": "vllm", "api": "chat", "models": ["llama-*"], "endpoints": [chat.address]},
                        {"name": "codex", "api": "responses", "models": ["gpt-5.3-codex"],
                         "endpoints": [r.address for r in resp]},
                        {"name": "selfhosted", "api": "auto", "models": ["sh-*"], "endpoints": [vllm.address]},
                        {"name": "mixed", "api": "auto", "models": ["fc-*"], "endpoints": [mixed.address]}]
    cfg = Path(tmp_path_factory.mktemp("surface")) / "config.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    stack = Stack()
    try:
        demo = stack.spawn("demo", [sys.executable, "-m", "extproc", "demo-backend", "--port", str(demo_port)])
        wait_for_port(demo_port, proc=demo)
        sidecar = stack.start_sidecar(cfg)
        wait_for_port(extproc_port, proc=sidecar)
        wait_for_port(ws_port, proc=sidecar)
        stack.start_envoy(port, admin, extproc_port, websocket_port=ws_port)
        yield Surface(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/responses", chat, resp, vllm, mixed,
                      stack, f"http://127.0.0.1:{admin_port}")
    finally:
        stack.stop()
        for server in (chat, *resp, vllm, mixed):
            server.close()


@pytest.fixture
def sf(surface: Surface) -> Surface:
    for server in (surface.chat, *surface.resp, surface.vllm, surface.mixed):
        server.reset()
    return surface


def sse(raw: str) -> list[dict]:
    return [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]


# -- the demo: both directions ------------------------------------------------------------------

def readme_curls() -> list[str]:
    """The curl commands of the README's "Try it" block, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(# `demo`.*?)```", text, re.S)
    assert block is not None, "the README's try-it block moved"
    joined = re.sub(r"\\\n\s*", "", block.group(1))
    return [line.split("   #")[0].strip() for line in joined.splitlines() if line.startswith("curl ")]


def test_readme_curl_lines_answer_both_directions(sf):
    curls = readme_curls()
    assert len(curls) == 5
    outputs = []
    for line in curls:
        cmd = line.replace("localhost:10000", sf.url.removeprefix("http://"))
        run = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=30)
        assert run.returncode == 0, run.stderr
        outputs.append(run.stdout)
    responses_plain, responses_stream, chat_plain, chat_stream, models = outputs
    r = json.loads(responses_plain)
    validate_response(r)
    assert r["output"][-1]["content"][0]["text"] == "You said: hello"
    events = sse(responses_stream)
    check_stream(events)
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "You said: hello"
    c = json.loads(chat_plain)
    assert c["object"] == "chat.completion" and c["choices"][0]["message"]["content"] == "You said: hello"
    chunks = sse(chat_stream)
    assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"]) == "You said: hello"
    assert chat_stream.rstrip().endswith("data: [DONE]")
    assert {m["id"] for m in json.loads(models)["data"]} >= {"demo", "demo-codex"}


def test_readme_websocket_snippet_runs(sf):
    text = (REPO / "README.md").read_text()
    block = re.search(r"```python\n(import json\nfrom websockets.*?)```", text, re.S)
    assert block is not None, "the README's WebSocket snippet moved"
    code = block.group(1).replace("ws://localhost:10000", sf.ws_url.removesuffix("/v1/responses"))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["demo You said: hello", "demo-codex You said: hello"]


def test_demo_sdk_both_directions_streamed_and_not(sf):
    client = sf.client()
    assert client.responses.create(model="demo", input="one").output_text == "You said: one"
    with client.responses.stream(model="demo", input="two") as s:
        assert s.get_final_response().output_text == "You said: two"
    out = client.chat.completions.create(model="demo-codex", messages=[{"role": "user", "content": "three"}])
    assert out.choices[0].message.content == "You said: three" and out.usage.completion_tokens == 3
    stream = client.chat.completions.create(model="demo-codex", messages=[{"role": "user", "content": "four"}],
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "You said: four"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a place",
           "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}


def test_demo_calls_an_offered_tool_both_directions(sf):
    """Offered a function tool, the demo calls it (each required argument the user's text) and answers
    the tool's result with its echo, so the Open Responses suite's tool cases run against the stack
    (scripts/open_responses_suite.py)."""
    client = sf.client()
    raw = client.responses.with_raw_response.create(model="demo", input="Paris", tools=[WEATHER])
    validate_response(json.loads(raw.text))
    r1 = raw.parse()
    (call,) = r1.output
    assert (call.type, call.name, json.loads(call.arguments)) == ("function_call", "get_weather", {"location": "Paris"})
    r2 = client.responses.create(model="demo", previous_response_id=r1.id, tools=[WEATHER],
                                 input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert r2.output_text == "You said: Paris"
    with urllib.request.urlopen(urllib.request.Request(
            sf.url + "/v1/responses", method="POST", headers={"content-type": "application/json"},
            data=json.dumps({"model": "demo", "input": "Oslo", "tools": [WEATHER], "stream": True}).encode()),
            timeout=30) as r:
        events = [json.loads(e) for e in re.findall(rb"^data: (\{.*)$", r.read(), re.M)]
    final = check_stream(events)
    assert [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"] == [
        '{"location', '": "Oslo"}']  # the 20 characters in two halves
    assert json.loads(final["output"][0]["arguments"]) == {"location": "Oslo"}
    out = client.chat.completions.create(model="demo-codex", messages=[{"role": "user", "content": "Rome"}],
                                         tools=[{"type": "function", "function": {
                                             k: v for k, v in WEATHER.items() if k != "type"}}])
    (chat_call,) = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "tool_calls"
    assert (chat_call.function.name, json.loads(chat_call.function.arguments)) == ("get_weather", {"location": "Rome"})


def test_demo_codex_keeps_its_conversations(sf):
    """demo-codex is a Responses model that keeps state itself; the sidecar pins the ids to it."""
    client = sf.client()
    r1 = client.responses.create(model="demo-codex", input="first")
    r2 = client.responses.create(model="demo-codex", input="second", previous_response_id=r1.id)
    assert r2.output_text == "You said: second"
    assert client.responses.retrieve(r1.id).output_text == "You said: first"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="demo-codex", input="x", previous_response_id="resp_unknown")


def test_demo_codex_compacts_and_its_window_continues(sf):
    """demo-codex serves /v1/responses/compact as OpenAI does (passed through by the sidecar): the user
    messages and one compaction item only the demo reads; the window as a new turn's input continues."""
    client = sf.client()
    raw = client.responses.with_raw_response.compact(model="demo-codex", input=[
        {"role": "user", "content": "I am Zed"}, {"role": "assistant", "content": "Hi Zed"}])
    window = json.loads(raw.text)
    validate("CompactResource", window)
    assert [(i["type"], i.get("role")) for i in window["output"]] == [("message", "user"), ("compaction", None)]
    assert "Zed" not in window["output"][1]["encrypted_content"]
    after = client.responses.create(model="demo-codex", input=window["output"], store=False)
    assert after.output_text == "You said: Summary of the earlier conversation: user: I am Zed\nassistant: Hi Zed"

def test_demo_models_refuse_the_other_api_untranslated(sf):
    """Straight to the demo process (no gateway), each model refuses the API it does not speak."""
    demo = next(a for a in sf.stack.procs[0].args if a.isdigit())
    direct = openai.OpenAI(base_url=f"http://127.0.0.1:{demo}/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="only supported in v1/responses"):
        direct.chat.completions.create(model="demo-codex", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="only supported in v1/chat/completions"):
        direct.responses.create(model="demo", input="x")


# -- WebSocket mode -----------------------------------------------------------------------------

def ws_turn(ws, **create) -> list[dict]:
    """Send one response.create and collect the server's events up to the terminal or error event."""
    ws.send(json.dumps({"type": "response.create", **create}))
    events = []
    for _ in range(10_000):
        ev = json.loads(ws.recv(timeout=30))
        events.append(ev)
        if ev["type"] in ("response.completed", "response.incomplete", "response.failed") or (
                ev["type"] == "error" and "status" in ev):  # a WebSocketErrorEvent, not a stream's error event
            return events
    raise AssertionError("no terminal event")


def text_of(events: list[dict]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def test_websocket_turns_route_per_message_both_apis(sf):
    """One socket, models on two backends of different APIs: each message is routed and translated."""
    sf.chat.script.append(Reply(text="from vllm"))
    with connect(sf.ws_url, additional_headers={"authorization": "Bearer client-key"}) as ws:
        a = ws_turn(ws, model="demo", input="over a socket")
        b = ws_turn(ws, model="demo-codex", input="and again")
        c = ws_turn(ws, model="llama-3", input="third backend")
    for events in (a, b, c):
        check_stream(events)
    assert text_of(a) == "You said: over a socket" and text_of(b) == "You said: and again"
    assert text_of(c) == "from vllm"
    sent = sf.chat.last
    assert sent["path"] == "/v1/chat/completions" and sent["body"]["stream"] is True
    assert sent["headers"]["authorization"] == "Bearer client-key"  # the client's header, forwarded


def test_websocket_previous_response_id_on_a_chat_backend(sf):
    """Chaining within a socket on a chat-only backend: stored turns through the sidecar's state,
    unstored ones (store: false) from the socket's own memory of its latest response."""
    sf.chat.script.extend([Reply(text="one"), Reply(text="two"), Reply(text="three")])
    with connect(sf.ws_url) as ws:
        r1 = ws_turn(ws, model="llama-3", input="first")[-1]["response"]
        r2 = ws_turn(ws, model="llama-3", input="second", previous_response_id=r1["id"])[-1]["response"]
        r3 = ws_turn(ws, model="llama-3", input="third", store=False, previous_response_id=r2["id"])[-1]["response"]
        r4 = ws_turn(ws, model="llama-3", input="fourth", store=False, previous_response_id=r3["id"])
    assert r3["status"] == "completed"
    texts = [[m["content"] for m in r["body"]["messages"]] for r in sf.chat.requests]
    assert texts[1] == ["first", "one", "second"]
    assert texts[2] == ["first", "one", "second", "two", "third"]
    assert r4[-1]["type"] == "response.completed"
    assert sf.chat.requests[3]["body"]["messages"][-3:] == [
        {"role": "user", "content": "third"}, {"role": "assistant", "content": "three"},
        {"role": "user", "content": "fourth"}]


def test_websocket_errors_are_error_events_and_the_socket_lives_on(sf):
    sf.chat.script.append(Reply(text="still here"))
    with connect(sf.ws_url) as ws:
        ws.send("not json")
        bad_json = json.loads(ws.recv(timeout=30))
        (unknown,) = ws_turn(ws, model="no-such-model", input="x")
        (streamed,) = ws_turn(ws, model="demo", input="x", stream=False)
        codex_style = ws_turn(ws, model="demo", input="x", stream=True)  # Codex CLI sends it: tolerated
        ws.send(json.dumps({"type": "response.cancel"}))
        wrong_type = json.loads(ws.recv(timeout=30))
        ok = ws_turn(ws, model="llama-3", input="after the errors")
    for ev in (bad_json, unknown, streamed, wrong_type):
        validate("WebSocketErrorEvent", ev)
    assert bad_json["status"] == 400 and bad_json["error"]["code"] == "invalid_json"
    assert unknown["status"] == 404 and unknown["error"]["code"] == "model_not_found"
    assert streamed["status"] == 400 and streamed["error"]["param"] == "stream"
    assert codex_style[-1]["type"] == "response.completed"
    assert wrong_type["status"] == 400 and wrong_type["error"]["code"] == "unsupported_event"
    assert text_of(ok) == "still here"


def test_websocket_failed_continuation_evicts_the_cached_response(sf):
    """Open Responses, WebSocket continuation: a store: false turn continued on the socket fails (the
    upstream's 500); the response it continued is evicted, so a retry gets previous_response_not_found
    from the socket itself, and the socket goes on with a fresh turn."""
    sf.chat.script.extend([Reply(text="uno"), Reply(error=(500, {"error": {"message": "boom", "type": "server_error"}})),
                           Reply(text="fresh")])
    with connect(sf.ws_url) as ws:
        r1 = ws_turn(ws, model="llama-3", input="one", store=False)[-1]["response"]
        (failed,) = ws_turn(ws, model="llama-3", input="two", store=False, previous_response_id=r1["id"])
        sent = len(sf.chat.requests)
        (retry,) = ws_turn(ws, model="llama-3", input="two", store=False, previous_response_id=r1["id"])
        assert len(sf.chat.requests) == sent  # answered by the socket: nothing persisted can continue it
        fresh = ws_turn(ws, model="llama-3", input="start over", store=False)
    for ev in (failed, retry):
        validate("WebSocketErrorEvent", ev)
    assert failed["status"] == 500
    assert (retry["status"], retry["error"]["code"]) == (400, "previous_response_not_found")
    assert text_of(fresh) == "fresh"


def test_websocket_upstream_cut_mid_stream_ends_with_a_terminal_event(sf):
    sf.chat.script.extend([Reply(text="partial answer", cut=True), Reply(text="next turn")])
    with connect(sf.ws_url) as ws:
        events = ws_turn(ws, model="llama-3", input="x")
        after = ws_turn(ws, model="llama-3", input="y")
    check_stream(events)
    assert events[-1]["type"] in ("response.failed", "response.incomplete")
    assert text_of(after) == "next turn"


# -- /v1/responses/compact ----------------------------------------------------------------------

CONVERSATION = [{"role": "user", "content": "plan a trip to Lisbon"},
                {"role": "assistant", "content": "Fly on Friday, stay in Alfama."},
                {"role": "user", "content": "and the budget?"}]


def test_compact_on_a_chat_backend_and_reading_the_item_back(sf):
    client = sf.client()
    sf.chat.script.extend([Reply(text="User plans a Lisbon trip: Friday flight, Alfama; budget open."),
                           Reply(text="About 900 EUR.")])
    answer = client.responses.with_raw_response.compact(model="llama-3", input=CONVERSATION,
                                                        instructions="You plan trips.")
    compacted, raw = answer.parse(), json.loads(answer.text)
    validate("CompactResource", raw)
    assert compacted.object == "response.compaction" and compacted.usage.output_tokens == 7
    *kept, item = raw["output"]
    assert [k["content"][0]["text"] for k in kept] == ["plan a trip to Lisbon", "and the budget?"]
    assert item["type"] == "compaction" and item["id"].startswith("cmp_")
    assert "Lisbon" not in item["encrypted_content"] and "Lisbon" not in base64.urlsafe_b64decode(
        item["encrypted_content"].split(".", 1)[1] + "==").decode("latin-1")
    summary_request = sf.chat.requests[0]["body"]
    assert summary_request["messages"][1] == {"role": "system", "content": "You plan trips."}
    assert [m["content"] for m in summary_request["messages"][2:5]] == [m["content"] for m in CONVERSATION]
    assert summary_request["messages"][-1]["role"] == "user" and "stream" not in summary_request
    # The compacted window, sent back: the summary reaches the chat model in the item's place.
    r = client.responses.create(model="llama-3", input=[*raw["output"], {"role": "user", "content": "so?"}])
    assert r.output_text == "About 900 EUR."
    sent = sf.chat.requests[1]["body"]["messages"]
    assert sent[2] == {"role": "user", "content": "Summary of the earlier conversation (compacted):\n\n"
                                                  "User plans a Lisbon trip: Friday flight, Alfama; budget open."}
    assert sent[-1] == {"role": "user", "content": "so?"}


def test_compact_continues_a_stored_chat_conversation(sf):
    client = sf.client()
    sf.chat.script.extend([Reply(text="Noted: blue."), Reply(text="Favourite colour: blue.")])
    r1 = client.responses.create(model="llama-3", input="my favourite colour is blue")
    compacted = client.responses.compact(model="llama-3", previous_response_id=r1.id, input="remember it")
    assert compacted.output[-1].type == "compaction"
    contents = [m["content"] for m in sf.chat.requests[1]["body"]["messages"]]
    assert contents[1:4] == ["my favourite colour is blue", "Noted: blue.", "remember it"]


def test_compaction_items_cannot_be_forged_or_read_by_a_chat_backend_otherwise(sf):
    client = sf.client()
    sf.chat.script.append(Reply(text="summary"))
    item = client.responses.compact(model="llama-3", input="hello").output[-1].model_dump(exclude_none=True)
    token = item["encrypted_content"]
    tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(openai.BadRequestError, match="cannot be read") as e:
        client.responses.create(model="llama-3", input=[{**item, "encrypted_content": tampered}])
    assert e.value.code == "invalid_encrypted_content"
    with pytest.raises(openai.BadRequestError, match="not produced by this gateway"):
        client.responses.create(model="llama-3", input=[{"type": "compaction", "encrypted_content": "foreign"}])
    with pytest.raises(openai.BadRequestError, match="cannot be read"):  # another tenant (another API key)
        sf.client("someone-else").responses.create(model="llama-3", input=[item])
    assert len(sf.chat.requests) == 1  # none of them reached the backend


def test_compact_passes_through_to_the_responses_instance_holding_the_conversation(sf):
    """Each instance knows only its own ids: every compaction must reach the one that made r1."""
    client = sf.client()
    for n in range(6):
        r1 = client.responses.create(model="gpt-5.3-codex", input=f"conversation {n}")
        compacted = client.responses.compact(model="gpt-5.3-codex", previous_response_id=r1.id, input="more")
        item = compacted.output[-1].model_dump(exclude_none=True)
        assert item["encrypted_content"].startswith(COMPACTED)  # the backend's own item, untouched
        r2 = client.responses.create(model="gpt-5.3-codex", input=[item, {"role": "user", "content": "next"}])
        assert r2.status == "completed"
    paths = [r["path"] for server in sf.resp for r in server.requests]
    assert paths.count("/v1/responses/compact") == 6 and paths.count("/v1/responses") == 12


def test_compact_refusals_match_v1_responses(sf):
    def post(body: object, method: str = "POST") -> tuple[int, dict]:
        run = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "-X", method, sf.url + "/v1/responses/compact",
                              "-H", "content-type: application/json", "-d", json.dumps(body)],
                             capture_output=True, text=True, timeout=30)
        text, _, code = run.stdout.rpartition("\n")
        return int(code), json.loads(text)

    for path_body, status, code in ((({}, "POST"), 400, "missing_required_parameter"),
                                    (({"model": "nope"}, "POST"), 404, "model_not_found"),
                                    (({"model": "llama-3", "stream": True}, "POST"), 400, "unknown_parameter"),
                                    (({"model": "llama-3"}, "GET"), 405, "method_not_allowed")):
        got_status, doc = post(*path_body)
        assert (got_status, doc["error"]["code"]) == (status, code), doc
    assert sf.chat.requests == []


# -- compaction inside /v1/responses (compaction_trigger) ---------------------------------------

TRIGGER = {"type": "compaction_trigger"}


@pytest.mark.parametrize("stream", [False, True])
def test_compaction_trigger_on_a_chat_backend_and_the_conversation_after_it(sf, stream):
    """Newer Codex CLI: a plain /v1/responses whose last item is the trigger gets one sealed compaction
    item as the Response's output; the next request carries it and the summary reaches the chat model."""
    client = sf.client()
    sf.chat.script.extend([Reply(text="Lisbon trip: Friday flight, Alfama; budget open."), Reply(text="900 EUR.")])
    body = {"model": "llama-3", "store": False, "instructions": "You plan trips.", "input": [*CONVERSATION, TRIGGER]}
    if stream:
        events = stream_events(client, **body)
        final = check_stream(events)
        assert [e["type"] for e in events] == ["response.created", "response.in_progress",
                                               "response.output_item.added", "response.output_item.done",
                                               "response.completed"]
    else:
        raw = client.responses.with_raw_response.create(**body)
        final = json.loads(raw.text)
        validate_response(final)
    assert final["status"] == "completed" and final["store"] is False
    (item,) = final["output"]
    assert item["type"] == "compaction" and item["encrypted_content"].startswith("xpc1.")
    assert "Lisbon" not in item["encrypted_content"]
    summary_request = sf.chat.requests[0]["body"]
    assert [m["content"] for m in summary_request["messages"][1:5]] == [
        "You plan trips.", *(m["content"] for m in CONVERSATION)]
    assert "stream" not in summary_request and "tools" not in summary_request
    users = [m for m in CONVERSATION if m["role"] == "user"]  # Codex keeps the user messages, then the item
    r = client.responses.create(model="llama-3", store=False, input=[*users, item, {"role": "user", "content": "so?"}])
    assert r.output_text == "900 EUR."
    sent = sf.chat.requests[1]["body"]["messages"]
    assert sent[-2:] == [{"role": "user", "content": "Summary of the earlier conversation (compacted):\n\n"
                                                     "Lisbon trip: Friday flight, Alfama; budget open."},
                         {"role": "user", "content": "so?"}]


def test_compaction_trigger_in_a_stored_chat_conversation(sf):
    """Stored: the compaction is a turn like any other (GET reads it back), and the turn after it sees
    the compacted window: the user messages before it, the summary, the new input."""
    client = sf.client()
    sf.chat.script.extend([Reply(text="Noted: blue."), Reply(text="User likes blue."), Reply(text="Blue.")])
    r1 = client.responses.create(model="llama-3", input="my favourite colour is blue")
    r2 = client.responses.create(model="llama-3", previous_response_id=r1.id, input=[TRIGGER])
    assert [o.type for o in r2.output] == ["compaction"]
    assert client.responses.retrieve(r2.id).output[0].id == r2.output[0].id
    r3 = client.responses.create(model="llama-3", previous_response_id=r2.id, input="what colour?")
    assert r3.output_text == "Blue."
    sent = [m["content"] for m in sf.chat.requests[2]["body"]["messages"]]
    assert sent == ["my favourite colour is blue", "Summary of the earlier conversation (compacted):\n\nUser likes blue.",
                    "what colour?"]


def test_compaction_trigger_passes_through_to_the_responses_instance_holding_the_conversation(sf):
    client = sf.client()
    for n in range(4):
        r1 = client.responses.create(model="gpt-5.3-codex", input=f"conversation {n}")
        r2 = client.responses.create(model="gpt-5.3-codex", previous_response_id=r1.id, input=[TRIGGER],
                                     store=False)
        (item,) = [o.model_dump(exclude_none=True) for o in r2.output]
        assert item["type"] == "compaction" and item["encrypted_content"].startswith(COMPACTED)  # the backend's own
    sent = [r["body"] for server in sf.resp for r in server.requests if r["body"] and r["body"].get("store") is False]
    assert len(sent) == 4 and all(b["input"] == [TRIGGER] for b in sent)  # untouched, each at its r1's instance


def test_background_passes_through_to_the_responses_instance_that_runs_it(sf):
    """A Responses backend runs background responses itself: create, poll and cancel reach the instance
    holding each id (each knows only its own)."""
    client = sf.client()
    for n in range(4):
        r = client.responses.create(model="gpt-5.3-codex", input=f"job {n}", background=True)
        assert r.status == "queued"
        assert client.responses.retrieve(r.id).status == "in_progress"  # the instance runs it a step per poll
        assert client.responses.cancel(r.id).status == "cancelled"
        (holder,) = [server for server in sf.resp if r.id in server.stored]
        assert [q["path"] for q in holder.requests if r.id in q["path"]] == [f"/v1/responses/{r.id}",
                                                                            f"/v1/responses/{r.id}/cancel"]
    sent = [r for server in sf.resp for r in server.requests if r["method"] == "POST" and r["path"] == "/v1/responses"]
    assert len(sent) == 4 and all(r["body"]["background"] is True for r in sent)  # untouched
    assert sum(r["method"] == "GET" for server in sf.resp for r in server.requests) == 4


def test_a_compaction_trigger_that_is_not_last_is_refused_on_both_backends(sf):
    for model in ("llama-3", "gpt-5.3-codex"):
        with pytest.raises(openai.BadRequestError) as e:
            sf.client().responses.create(model=model, input=[TRIGGER, {"role": "user", "content": "hi"}])
        assert e.value.body["param"] == "input[0]" and "must be the final input item" in e.value.message
    assert sf.chat.requests == [] and all(server.requests == [] for server in sf.resp)


# -- first contact with a model of unknown API ----------------------------------------------------

def learned(sf: Surface) -> dict:
    with urllib.request.urlopen(sf.admin + "/learned", timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.parametrize("stream", [False, True])
def test_first_contact_chat_client_on_a_responses_only_model(sf, stream):
    model = f"fc-agent-{stream}"
    sf.mixed.responses_only.add(model)
    sf.mixed.script.extend([Reply(text="first try works"), Reply(text="and then directly")])
    client, msgs = sf.client(), [{"role": "user", "content": "hi"}]
    if stream:
        chunks = list(client.chat.completions.create(model=model, messages=msgs, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        text = client.chat.completions.create(model=model, messages=msgs).choices[0].message.content
    assert text == "first try works"
    assert [r["path"] for r in sf.mixed.requests] == ["/v1/chat/completions", "/v1/responses"]
    assert learned(sf)[f"mixed:{model}"]["mode"] == "responses"
    again = client.chat.completions.create(model=model, messages=msgs)  # learned: straight to /v1/responses
    assert again.choices[0].message.content == "and then directly"
    assert [r["path"] for r in sf.mixed.requests][2:] == ["/v1/responses"]


@pytest.mark.parametrize("stream", [False, True])
def test_first_contact_responses_client_on_a_chat_only_server(sf, stream):
    model = f"sh-first-{stream}"
    sf.vllm.script.extend([Reply(text="hello from vllm"), Reply(text="second turn")])
    client = sf.client()
    if stream:
        events = stream_events(client, model=model, input="hi")
        check_stream(events)
        r1 = events[-1]["response"]
    else:
        raw = client.responses.with_raw_response.create(model=model, input="hi")
        r1 = json.loads(raw.text)
        validate_response(r1)
        assert raw.headers["x-gateway-retried-as"] == "chat"
    assert r1["output"][-1]["content"][0]["text"] == "hello from vllm"
    assert [r["path"] for r in sf.vllm.requests] == ["/v1/responses", "/v1/chat/completions"]
    r2 = client.responses.create(model=model, input="more", previous_response_id=r1["id"])  # the turn was kept
    assert r2.output_text == "second turn"
    assert [m["content"] for m in sf.vllm.requests[-1]["body"]["messages"]] == ["hi", "hello from vllm", "more"]


def stream_events(client: openai.OpenAI, **kw) -> list[dict]:
    with client.responses.create(stream=True, **kw) as s:
        return [e.model_dump(mode="json", exclude_unset=True) for e in s]


def test_first_contact_never_retries_auth_rate_limit_or_content_errors(sf):
    for n, status in enumerate((401, 429, 400)):
        model = f"fc-plain-{n}"
        sf.mixed.reset()
        sf.mixed.script.append(Reply(error=(status, {"error": {"message": f"refused {status}", "type": "x",
                                                               "param": None, "code": None}})))
        with pytest.raises(openai.APIStatusError) as e:
            sf.client().chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == status and f"refused {status}" in str(e.value)
        assert [r["path"] for r in sf.mixed.requests] == ["/v1/chat/completions"]


def test_first_contact_whose_retry_fails_too_names_both_messages(sf):
    model = "fc-doubly-refused"
    sf.mixed.responses_only.add(model)
    sf.mixed.script.append(Reply(error=(422, {"error": {"message": "input is far too long", "type": "x",
                                                        "param": None, "code": "too_long"}})))
    with pytest.raises(openai.UnprocessableEntityError) as e:
        sf.client().chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
    message = e.value.body["message"]
    assert "only supported in v1/responses" in message and "input is far too long" in message
    assert [r["path"] for r in sf.mixed.requests] == ["/v1/chat/completions", "/v1/responses"]


def test_codex_cli_first_contact_with_a_model_of_unknown_api(sf, tmp_path):
    if not CODEX.exists():
        pytest.skip("Codex CLI not installed: scripts/test.sh installs it with npm")
    sf.vllm.script.append(Reply(text="Codex reached a chat-only model at once."))
    run = codex(sf, tmp_path, "say hello", model="sh-agent")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Codex reached a chat-only model at once." in run.stdout
    assert [r["path"] for r in sf.vllm.requests] == ["/v1/responses", "/v1/chat/completions"]


def test_a_websocket_upgrade_with_a_json_content_type_still_upgrades(sf):
    """Nothing waits for the body of an upgrade (it never ends): the socket opens and serves a turn."""
    sf.chat.script.append(Reply(text="upgraded"))
    with connect(sf.ws_url, additional_headers={"content-type": "application/json"}, open_timeout=30) as ws:
        assert text_of(ws_turn(ws, model="llama-3", input="x")) == "upgraded"


def test_only_a_get_upgrades_anything_else_is_a_json_403(sf):
    host, port = sf.url.removeprefix("http://").split(":")
    import http.client

    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/responses", body=b"", headers={
        "connection": "upgrade", "upgrade": "websocket", "sec-websocket-version": "13",
        "sec-websocket-key": base64.b64encode(b"0123456789abcdef").decode()})
    resp = conn.getresponse()
    err = json.loads(resp.read())["error"]
    conn.close()
    assert resp.status == 403 and resp.getheader("content-type") == "application/json"
    assert err["code"] == "upgrade_failed" and "GET /v1/responses" in err["message"]

"""End to end: real agent clients (Codex CLI, the OpenAI Agents SDK) against a chat-only backend.

Codex CLI comes from npm (`scripts/test.sh` installs @openai/codex into .tools/); the Agents SDK from
PyPI (the test extras). Both speak only the Responses API; the backend only Chat Completions.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from extproc.translate.compact import SUMMARY_INTRO, SUMMARY_REQUEST, TOKEN_PREFIX

from .upstreams import Reply

REPO = Path(__file__).resolve().parent.parent
CODEX = REPO / ".tools" / "node_modules" / ".bin" / "codex"


def codex(gw, tmp_path: Path, prompt: str, model: str = "llama-3-coder", url: str | None = None,
          settings: str = "", name: str = "gateway") -> subprocess.CompletedProcess:
    """`codex exec` against the gateway (or `url` in front of it), with extra top-level `settings`; its
    provider called `name` (Codex asks for compaction by `compaction_trigger` only of one named OpenAI)."""
    home = tmp_path / "codex-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(f'''
model = "{model}"
model_provider = "gateway"
{settings}

[model_providers.gateway]
name = "{name}"
base_url = "{url or gw.url}/v1"
wire_api = "responses"
env_key = "GATEWAY_API_KEY"
request_max_retries = 0
stream_max_retries = 0
''')
    env = {**os.environ, "CODEX_HOME": str(home), "GATEWAY_API_KEY": "client-key", "NO_COLOR": "1"}
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return subprocess.run([str(CODEX), "exec", "--skip-git-repo-check", "--sandbox", "danger-full-access", prompt],
                          env=env, cwd=work, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)


@pytest.fixture
def codex_cli() -> Path:
    if not CODEX.exists():
        pytest.skip("Codex CLI not installed: scripts/test.sh installs it with npm (npm was missing or failed)")
    return CODEX


def turns(gw) -> list[dict]:
    return [r["body"] for r in gw.chat.requests if r["path"] == "/v1/chat/completions"]


def test_codex_cli_plain_answer(gw, codex_cli, tmp_path):
    gw.chat.script.append(Reply(text="Hello from a chat-only model."))
    run = codex(gw, tmp_path, "say hello")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Hello from a chat-only model." in run.stdout
    (body,) = turns(gw)
    assert body["stream"] is True and body["messages"][0]["role"] == "system"
    assert body["messages"][-1] == {"role": "user", "content": "say hello"}
    assert all(t["type"] == "function" for t in body["tools"])  # web_search dropped, namespace flattened
    assert any(t["function"]["name"].startswith("multi_agent_v1__") for t in body["tools"])


def test_codex_cli_tool_loop(gw, codex_cli, tmp_path):
    gw.chat.script.append(Reply(text=None, reasoning="I should run it.",
                                calls=[("exec_command", json.dumps({"cmd": "echo hello-from-tool"}))]))
    gw.chat.script.append(Reply(text="The command printed hello-from-tool."))
    run = codex(gw, tmp_path, "run echo hello-from-tool")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "The command printed hello-from-tool." in run.stdout
    first, second = turns(gw)
    msgs = second["messages"]
    call_msg = next(m for m in msgs if m.get("tool_calls"))
    (call,) = call_msg["tool_calls"]
    assert call["function"]["name"] == "exec_command" and json.loads(call["function"]["arguments"])["cmd"] == "echo hello-from-tool"
    tool = msgs[msgs.index(call_msg) + 1]
    assert tool["role"] == "tool" and tool["tool_call_id"] == call["id"] and "hello-from-tool" in tool["content"]
    assert "reasoning_content" not in call_msg and "I should run it." not in json.dumps(msgs)  # not replayed as text
    assert len(second["messages"]) > len(first["messages"])


class Recorder:
    """A reverse proxy in front of the gateway that records what a client sends and gets, whole."""

    def __init__(self, target: str):
        self.exchanges: list[tuple[str, str, bytes, int, bytes]] = []  # method, path, body, status, answer
        where = urlsplit(target)
        recorder = self

        class Relay(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.relay()

            def do_POST(self) -> None:
                self.relay()

            def relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
                conn.request(self.command, self.path, body=body or None, headers={
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")})
                reply = conn.getresponse()
                answer = reply.read()
                conn.close()
                recorder.exchanges.append((self.command, self.path, body, reply.status, answer))
                self.send_response(reply.status)
                self.send_header("content-type", reply.getheader("content-type") or "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Relay)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def turns(self) -> list[tuple[dict, list[dict]]]:
        """Each POST /v1/responses: its body, and its answer's events."""
        return [(json.loads(body), [json.loads(line[6:]) for line in answer.decode().splitlines()
                                    if line.startswith("data: {")])
                for method, path, body, _, answer in self.exchanges if (method, path) == ("POST", "/v1/responses")]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _summary_and_after(gw) -> tuple[dict, dict]:
    requests = turns(gw)
    summary = next(i for i, t in enumerate(requests) if t["messages"][-1]["content"] == SUMMARY_REQUEST)
    return requests[summary], requests[summary + 1]


def test_codex_cli_compacts_automatically_by_compaction_trigger_on_a_chat_only_backend(gw, codex_cli, tmp_path):
    """A small auto-compact limit (each answer reports 18 tokens): after the tool call Codex asks for
    compaction mid-turn with a `compaction_trigger` turn, gets one sealed compaction item, and carries
    it in its next request, whose summary the chat model receives in the item's place."""
    gw.chat.script.extend([Reply(text=None, calls=[("exec_command", json.dumps({"cmd": "echo hello-from-tool"}))]),
                           Reply(text="The user ran echo hello-from-tool; it printed hello-from-tool."),
                           Reply(text="Done after compaction.")])
    recorder = Recorder(gw.url)
    try:
        run = codex(gw, tmp_path, "run echo hello-from-tool", url=recorder.url, name="OpenAI",
                    settings="model_auto_compact_token_limit = 10")
    finally:
        recorder.close()
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Done after compaction." in run.stdout
    triggers = [(n, body, events) for n, (body, events) in enumerate(recorder.turns())
                if body["input"] and body["input"][-1] == {"type": "compaction_trigger"}]
    assert len(triggers) == 1, [t[0]["input"][-1] for t in recorder.turns()]
    n, body, events = triggers[0]
    assert body["stream"] is True and body["store"] is False
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.output_item.added",
                                           "response.output_item.done", "response.completed"]
    (item,) = events[-1]["response"]["output"]
    assert item["type"] == "compaction" and item["encrypted_content"].startswith(TOKEN_PREFIX)
    after, _ = recorder.turns()[n + 1]
    assert item in [{k: v for k, v in i.items() if k in item} for i in after["input"]]  # carried on
    summary, following = _summary_and_after(gw)
    assert "tools" not in summary and "stream" not in summary  # the sidecar's summary completion
    assert {"role": "user", "content": SUMMARY_INTRO + "The user ran echo hello-from-tool; it printed "
                                                      "hello-from-tool."} in following["messages"]
    assert not any("hello-from-tool\n" in str(m.get("content")) for m in following["messages"])  # the tool output: compacted


def test_codex_cli_compacts_automatically_by_its_own_prompt_for_another_provider(gw, codex_cli, tmp_path):
    """Codex compacts a provider not named OpenAI itself: a plain streamed turn (no tools) ending with its
    summary prompt, then the summary as a user message; both are ordinary turns to the sidecar."""
    gw.chat.script.extend([Reply(text=None, calls=[("exec_command", json.dumps({"cmd": "echo hello-from-tool"}))]),
                           Reply(text="LOCAL-SUMMARY of the work."), Reply(text="Done after compaction.")])
    run = codex(gw, tmp_path, "run echo hello-from-tool", settings="model_auto_compact_token_limit = 10")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Done after compaction." in run.stdout
    first, compaction, after = turns(gw)
    assert "tools" in first and "tools" not in compaction and compaction["stream"] is True
    assert "CONTEXT CHECKPOINT COMPACTION" in compaction["messages"][-1]["content"]
    assert any("LOCAL-SUMMARY of the work." in str(m.get("content")) for m in after["messages"])


def test_agents_sdk_with_tools_and_handoff(gw):
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=gw.url + "/v1", api_key="client-key", max_retries=0)
    model = agents.OpenAIResponsesModel(model="llama-3", openai_client=client)
    seen = []

    @agents.function_tool
    def weather(city: str) -> str:
        """Current weather in a city."""
        seen.append(city)
        return f"sunny in {city}"

    specialist = agents.Agent(name="Weather expert", instructions="Answer weather questions.", tools=[weather], model=model)
    triage = agents.Agent(name="Triage", instructions="Hand weather questions off.", handoffs=[specialist], model=model)
    gw.chat.script.extend([
        Reply(text=None, calls=[("transfer_to_weather_expert", "{}")]),
        Reply(text=None, calls=[("weather", json.dumps({"city": "Paris"}))]),
        Reply(text="It is sunny in Paris."),
    ])
    result = agents.Runner.run_sync(triage, "What's the weather in Paris?",
                                    run_config=agents.RunConfig(tracing_disabled=True))
    assert result.final_output == "It is sunny in Paris."
    assert seen == ["Paris"] and result.last_agent.name == "Weather expert"
    last = turns(gw)[-1]["messages"]
    assert [m["role"] for m in last].count("tool") == 2  # the handoff and the tool call, each answered

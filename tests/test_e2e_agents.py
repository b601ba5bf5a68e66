"""End to end: real agent clients (Codex CLI, the OpenAI Agents SDK) against a chat-only backend.

Codex CLI comes from npm (`scripts/test.sh` installs @openai/codex into .tools/); the Agents SDK from
PyPI (the test extras). Both speak only the Responses API; the backend only Chat Completions.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .upstreams import Reply

REPO = Path(__file__).resolve().parent.parent
CODEX = REPO / ".tools" / "node_modules" / ".bin" / "codex"


def codex(gw, tmp_path: Path, prompt: str, model: str = "llama-3-coder") -> subprocess.CompletedProcess:
    home = tmp_path / "codex-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(f'''
model = "{model}"
model_provider = "gateway"

[model_providers.gateway]
name = "gateway"
base_url = "{gw.url}/v1"
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

"""End to end: Claude Code (npm @anthropic-ai/claude-code, non-interactive `-p`) with ANTHROPIC_BASE_URL
at the gateway, against a chat-only backend: a plain answer, and a task that needs one tool call.

`scripts/test.sh` installs Claude Code into .tools/ (CLAUDE_CODE_BIN names another build); without it
these tests skip and say why.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .upstreams import Reply

REPO = Path(__file__).resolve().parent.parent
CLAUDE = Path(os.environ.get("CLAUDE_CODE_BIN") or REPO / ".tools" / "node_modules" / ".bin" / "claude")
MODEL = "llama-3-coder"  # on the chat-only test upstream


@pytest.fixture
def claude_code() -> Path:
    if not CLAUDE.exists():
        pytest.skip("Claude Code not installed: scripts/test.sh installs it with npm (npm was missing or failed)")
    return CLAUDE


def claude(gw, tmp_path: Path, prompt: str, *args: str) -> subprocess.CompletedProcess:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "NO_COLOR": "1", "ANTHROPIC_BASE_URL": gw.url,
           "ANTHROPIC_API_KEY": "client-key", "ANTHROPIC_MODEL": MODEL, "ANTHROPIC_SMALL_FAST_MODEL": MODEL,
           "ANTHROPIC_DEFAULT_HAIKU_MODEL": MODEL, "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
           "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1"}
    return subprocess.run([str(CLAUDE), "-p", prompt, "--model", MODEL, "--output-format", "json", *args],
                          env=env, cwd=work, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)


def turns(gw) -> list[dict]:
    return [r["body"] for r in gw.chat.requests if r["path"] == "/v1/chat/completions"]


def test_claude_code_plain_answer(gw, claude_code, tmp_path):
    gw.chat.script.append(Reply(text="Hello from the chat backend."))
    run = claude(gw, tmp_path, "say hello")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    out = json.loads(run.stdout)
    assert out["result"] == "Hello from the chat backend." and out["is_error"] is False
    assert out["usage"]["input_tokens"] == 8 and out["usage"]["cache_read_input_tokens"] == 3  # 11 prompt, 3 cached
    first = turns(gw)[0]
    assert gw.chat.requests[0]["path"] == "/v1/chat/completions"  # Anthropic's ?beta=true is not sent on
    assert first["stream"] is True and first["messages"][0]["role"] == "system"
    assert first["messages"][-1]["role"] in ("user", "system")
    assert {"Bash", "Read", "Edit"} <= {t["function"]["name"] for t in first["tools"]}


def test_claude_code_tool_loop(gw, claude_code, tmp_path):
    """A task that needs one tool call: Claude Code reads the file the model asks for (Read needs no
    permission in -p mode) and sends its content back as the tool's result, then gets the answer."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "note.txt").write_text("the answer is 42\n")
    gw.chat.script.extend([Reply(text=None, calls=[("Read", json.dumps({"file_path": str(work / "note.txt")}))]),
                           Reply(text="The note says the answer is 42.")])
    run = claude(gw, tmp_path, "what does note.txt say?")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    out = json.loads(run.stdout)
    assert out["result"] == "The note says the answer is 42." and out["num_turns"] == 2
    second = turns(gw)[-1]["messages"]
    call = second[-2]["tool_calls"][0]
    assert second[-2]["role"] == "assistant" and call["function"]["name"] == "Read"
    assert second[-1]["role"] == "tool" and second[-1]["tool_call_id"] == call["id"]
    assert "the answer is 42" in second[-1]["content"]

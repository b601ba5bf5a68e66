#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh machine, then runs it (ruff and mypy first).
# Extra arguments go to both pytest runs (unit, then the rest), e.g. scripts/test.sh -k streaming
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v redis-server >/dev/null; then  # real Redis for the shared-state tests (Debian package)
  $SUDO apt-get install -y -q redis-server >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q redis-server >/dev/null; }
fi
# npm packages, pinned, into .tools (without npm the tests that need them skip and say why): Codex CLI
# and Claude Code for the agent-client tests; the Gateway API and Istio models and TypeScript, which validate
# deploy/gateways (tests/test_gateways.py).
if command -v npm >/dev/null; then
  missing=()
  for spec in @openai/codex@0.169.0 @anthropic-ai/claude-code@2.1.328 @kubernetes-models/gateway-api@2.0.0 @kubernetes-models/istio@3.0.1 typescript@5.9.3; do
    [ -f ".tools/node_modules/${spec%@*}/package.json" ] || missing+=("$spec")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    npm install --prefix .tools --no-audit --no-fund --loglevel=error "${missing[@]}" >/dev/null \
      || echo "warning: npm could not install ${missing[*]}; the tests that need them will be skipped" >&2
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/ruff check .
.venv/bin/mypy  # --strict over extproc/, configured in pyproject.toml
# pytest exits 5 when a -k selects nothing in one of the two runs: not a failure
run_pytest() { .venv/bin/python -m pytest -q "$@" || [ $? -eq 5 ]; }
# The unit tests need the core alone: run them where openai, Envoy and the e2e helpers cannot be imported.
PYTHONPATH=scripts/core-only run_pytest tests/unit "$@"
run_pytest tests --ignore=tests/unit "$@"


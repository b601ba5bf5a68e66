#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh machine, then runs it (ruff first).
# Extra arguments go to both pytest runs (unit, then the rest), e.g. scripts/test.sh -k streaming
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v redis-server >/dev/null; then  # real Redis for the shared-state tests (Debian package)
  $SUDO apt-get install -y -q redis-server >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q redis-server >/dev/null; }
fi
# Codex CLI for the agent-client tests (npm registry); without npm those tests skip and say why.
if [ ! -x .tools/node_modules/.bin/codex ] && command -v npm >/dev/null; then
  npm install --prefix .tools --no-audit --no-fund --loglevel=error @openai/codex@0.169.0 >/dev/null \
    || echo "warning: npm could not install @openai/codex; the Codex CLI tests will be skipped" >&2
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/ruff check .
# pytest exits 5 when a -k selects nothing in one of the two runs: not a failure
run_pytest() { .venv/bin/python -m pytest -q "$@" || [ $? -eq 5 ]; }
# The unit tests need the core alone: run them where openai, Envoy and the e2e helpers cannot be imported.
PYTHONPATH=scripts/core-only run_pytest tests/unit "$@"
run_pytest tests --ignore=tests/unit "$@"


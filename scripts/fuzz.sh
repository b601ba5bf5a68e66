#!/usr/bin/env bash
# The property tests with many more cases than CI runs (20,000 per property; about ten minutes).
# Usage: scripts/fuzz.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
HYPOTHESIS_PROFILE=long exec .venv/bin/python -m pytest tests/unit/test_fuzz.py -q --hypothesis-show-statistics "$@"

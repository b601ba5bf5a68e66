#!/usr/bin/env bash
# The property tests of tests/unit/test_fuzz.py with many more cases than CI runs (20,000 per
# property instead of 150), with hypothesis statistics: how often each outcome (translated, 502,
# failed stream...) came up. About 40 minutes on two shared cores.
# Usage: scripts/fuzz.sh [pytest args], e.g. scripts/fuzz.sh -k stream
set -euo pipefail
cd "$(dirname "$0")/.."
HYPOTHESIS_PROFILE=long exec .venv/bin/python -m pytest tests/unit/test_fuzz.py -q -p no:cacheprovider \
  --hypothesis-show-statistics "$@"

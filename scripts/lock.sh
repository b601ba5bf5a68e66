#!/usr/bin/env bash
# Regenerates deploy/requirements.lock, the sidecar image's exact runtime dependencies with their
# hashes (the Dockerfile installs it with --require-hashes), from pyproject.toml's [project]
# dependencies, resolved for the image's Python (the Dockerfile's base, on Linux). Run it after
# changing those dependencies or that base image.
set -euo pipefail
cd "$(dirname "$0")/.."
python_version=$(sed -n 's/^FROM python:\([0-9.]*\)-.*/\1/p' Dockerfile | head -n 1)
[ -n "$python_version" ] || { echo "no FROM python:X.Y.Z-... line in the Dockerfile" >&2; exit 1; }
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools"
"$tools/bin/pip" install -q --disable-pip-version-check uv==0.13.8
"$tools/bin/uv" pip compile pyproject.toml --quiet --generate-hashes --python-version "$python_version" --python-platform linux \
  --custom-compile-command scripts/lock.sh --output-file deploy/requirements.lock

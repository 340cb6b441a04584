#!/usr/bin/env bash
# The library test suite (CPU, tiny random-weight models). Host tests (tests/host/) need a live
# WebUI and run separately: see tests/host/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Lint and format first (pyproject.toml): a finding fails the run before the slow tests.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest tests --ignore=tests/host -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# The test suite: creates/refreshes .venv, runs ruff, then pytest (extra args go to pytest,
# e.g. `-m slow` for the real-model tests, `-m "slow or not slow"` for everything).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
.venv/bin/ruff check autoqra tests benchmarks
exec .venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# The main job on the embedded default: creates/refreshes .venv, then runs `autoqra demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
exec .venv/bin/autoqra demo "$@"

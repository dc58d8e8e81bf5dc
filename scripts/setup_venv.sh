#!/usr/bin/env bash
# Create or refresh the project virtualenv (.venv) and install autoqra with its dev extras.
# torch is installed first, pinned, in its own pip call: an unpinned torch pulls a multi-GB CUDA build.
# autoqra is installed editable, so code changes need no reinstall: when pyproject.toml and this script
# are unchanged since the last complete install (a stamp in .venv), the pip calls are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=.venv/.autoqra-setup
WANT=$(cat pyproject.toml scripts/setup_venv.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && .venv/bin/python -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('autoqra') and u.find_spec('torch')))"; then
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev,onnx,hqq,bnb,search]"
echo "$WANT" > "$STAMP"

#!/usr/bin/env bash
# Create or refresh the project virtualenv (.venv) and install autoqra with its dev extras.
# torch is installed first, pinned, in its own pip call: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev,onnx,hqq,bnb,search]"

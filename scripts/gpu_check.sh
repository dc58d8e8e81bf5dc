#!/usr/bin/env bash
# The GPU check, on a machine with a CUDA GPU (aim: under 8 minutes): the CUDA-marked tests, then
# benchmarks/gpu_check.py (packed layer, eager and under torch.compile with CUDA graphs, vs bf16 nn.Linear vs
# bitsandbytes nf4; a SmolLM2 compile on the GPU against the CPU figure; fine-tuning peak memory of autoqra vs
# peft LoRA on fp32 / bf16 bases vs QLoRA; decoding, eager and compiled; scripts/finetune_ddp.py on 2 GPUs with
# NCCL when there are two). One table; benchmarks/results/gpu_check.json. The torch.compile rows add their
# compile times (about a minute each on a CPU, warm cache): --sections picks parts when time is short.
#
# It uses the Python on PATH (or $PYTHON) with its CUDA build of torch and autoqra's dependencies
# installed (scripts/setup_venv.sh installs the CPU build of torch, so it is not used here), and this
# checkout on PYTHONPATH. Extra arguments go to benchmarks/gpu_check.py (e.g. --steps 20, --sections layer).
# A CPU smoke run of the same benchmark steps: python benchmarks/gpu_check.py --device cpu --quick
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to $PY (torch.cuda.is_available() is False): run it on a GPU machine" >&2
  exit 2
fi
"$PY" - <<'PY'
import importlib.util, sys
missing = [m for m in ("transformers", "peft", "networkx", "tqdm", "pytest") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: install {' '.join(missing)} first (pip install -e '.[dev]' without torch)")
PY
[ $? -eq 0 ] || exit 2
status=0
"$PY" -m pytest -m cuda -p no:cacheprovider -q tests/test_cuda.py || status=1
"$PY" benchmarks/gpu_check.py "$@" || status=1
exit "$status"

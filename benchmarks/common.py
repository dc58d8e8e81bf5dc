"""Shared helpers of the benchmark scripts: results folder, JSON writing, machine facts."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

#: where the JSON results go; ``AUTOQRA_BENCH_RESULTS`` overrides it (the CI smoke tests write to a
#: temporary folder, so running the tests leaves the committed results untouched)
RESULTS = Path(os.environ.get("AUTOQRA_BENCH_RESULTS") or Path(__file__).parent / "results")


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def rss() -> int:
    """This process's resident set size in bytes (``VmRSS``; 0 where /proc is missing)."""
    status = Path("/proc/self/status")
    if not status.exists():
        return 0
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
    return 0


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=1, sort_keys=True, default=str) + "\n")
    return path


def truncated_smollm2(n_layers: int):
    """SmolLM2-135M with only its first ``n_layers`` decoder blocks (and the tokenizer)."""
    from autoqra.zoo import load_default_model

    model, tokenizer = load_default_model()
    model.model.layers = model.model.layers[:n_layers]
    model.config.num_hidden_layers = n_layers
    return model, tokenizer


def smollm2_360m_shape(base: Any) -> Any:
    """A Llama of SmolLM2-360M's shape (960 hidden, 2560 MLP, 32 blocks, 15 / 5 heads, SmolLM2-135M's tokenizer
    and vocabulary) with random weights (seed 0), built from the config of ``base`` (SmolLM2-135M): speed and
    memory at a size where the weights weigh more, without a download; its quality means nothing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**base.config.to_dict(), "hidden_size": 960, "intermediate_size": 2560,
                            "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5,
                            "head_dim": 64})
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()

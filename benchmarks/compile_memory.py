"""Peak memory of compiling and evaluating, against the model's fp32 weights.

Each measurement runs in a fresh subprocess (peak RSS = ``ru_maxrss`` of that process): load the model,
measure the RSS after loading, run ``autoqra.compile`` (calibration with gradients, error tables,
selection, rewrite) or ``autoqra.evaluate.perplexity``, and report the peak. Models: SmolLM2-135M
(vocabulary 49k) and the same architecture with a 262,144-token vocabulary (random weights from a
config, 4 blocks: the vocabulary is what makes full ``[batch, seq, vocab]`` logits expensive).
Goal: peak ≤ 2 × the fp32 weights + one batch's activations.

    python benchmarks/compile_memory.py            # both models, ~10 min on 2 cores
    python benchmarks/compile_memory.py --quick    # a tiny Llama (CI smoke)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autoqra.report import table  # noqa: E402
from benchmarks.common import write_json  # noqa: E402

_WORKER = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {root!r} + "/tests")
import autoqra
from autoqra.evaluate import perplexity
from autoqra.passes.select import SelectConfig
kind, task, windows, seq = {kind!r}, {task!r}, {windows}, {seq}
if kind == "tiny":
    from tiny_models import tiny_llama
    model = tiny_llama()
elif kind == "smollm2":
    from autoqra.zoo import load_default_model
    model, _ = load_default_model()
else:
    from transformers import LlamaConfig, LlamaForCausalLM
    from autoqra.zoo import load_default_model
    cfg = load_default_model()[0].config.to_dict()
    cfg.update(vocab_size=262144, num_hidden_layers=4)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
vocab = model.config.vocab_size
fp32 = sum(p.numel() for p in model.parameters()) * 4
after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
gen = torch.Generator().manual_seed(0)
data = torch.randint(3, vocab, (windows, seq), generator=gen)
start = time.perf_counter()
if task == "compile":
    autoqra.compile(model, "4.5bits", calib=data, cache_dir=None, progress=False,
                    select=SelectConfig(score_steps=2, max_finetuned=2))
else:
    perplexity(model, data, progress=False)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(kind=kind, task=task, vocab=vocab, fp32_bytes=fp32, rss_after_load=after_load, peak_rss=peak,
                      seconds=seconds, windows=windows, seq_len=seq)))
"""


def measure(kind: str, task: str, windows: int, seq: int) -> dict:
    root = str(Path(__file__).resolve().parent.parent)
    code = _WORKER.format(root=root, kind=kind, task=task, windows=windows, seq=seq)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        return {"kind": kind, "task": task, "error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    runs = [("tiny", "compile", 8, 32), ("tiny", "eval", 4, 32)] if args.quick else [
        ("smollm2", "eval", 16, 512), ("smollm2", "compile", 8, 512),
        ("vocab262k", "eval", 16, 512), ("vocab262k", "compile", 8, 512),
    ]
    rows = []
    name = "compile_memory_quick" if args.quick else "compile_memory"
    for kind, task, windows, seq in runs:
        row = measure(kind, task, windows, seq)
        if "peak_rss" in row:
            row["peak_over_fp32"] = row["peak_rss"] / row["fp32_bytes"]
        rows.append(row)
        write_json(name, {"quick": args.quick, "rows": rows})
        print(row if "error" in row else f"{kind} {task}: peak {row['peak_rss'] / 2**30:.2f} GiB = "
              f"{row['peak_over_fp32']:.2f}× fp32 weights", flush=True)
    ok = [r for r in rows if "peak_rss" in r]
    print(table(["model", "task", "vocab", "fp32 weights", "RSS after load", "peak RSS", "peak / fp32", "seconds"],
                [[r["kind"], r["task"], r["vocab"], f"{r['fp32_bytes'] / 2**20:.0f} MiB",
                  f"{r['rss_after_load'] / 2**20:.0f} MiB", f"{r['peak_rss'] / 2**20:.0f} MiB",
                  f"{r['peak_over_fp32']:.2f}", f"{r['seconds']:.0f}"] for r in ok]))


if __name__ == "__main__":
    main()

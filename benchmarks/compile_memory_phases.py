"""Where compiling SmolLM2 holds its memory: the peak RSS of every pass and of the selection's phases.

One default compile (``autoqra.compile(model, "4.24bits", calib=8×512 Lee windows)``: calibration with
weight gradients, error tables, plasticity, every λ plan built and scored, six short fine-tunes, rewrite)
while a thread samples ``VmRSS`` every 0.1 s and files it under the pass (or selection phase) running at
that moment; before and after each short fine-tune the live memory is read after ``gc.collect()`` and
``trim_heap()``. Run it under jemalloc (``LD_PRELOAD=.../libjemalloc.so.2``) to see the peaks without
glibc's retained heap.

    python benchmarks/compile_memory_phases.py --out compile_memory_phases     # ~6 min on 2 cores
    python benchmarks/compile_memory_phases.py --model gemma3-270m-shape --out compile_memory_phases_gemma3

``--activations``: instead of compiling, what one batch's forward and backward (one 512-token window,
frozen weights, the chunked loss, as calibration runs it) adds to the resident model: the "one
batch's activations" of the goal (≤ 2× the fp32 weights + one batch's activations).

``--model gemma3-270m-shape``: Gemma 3's text decoder at the published shape of Gemma-3-270M (a
262,144-token vocabulary: the tied embedding is 60% of the weights; 18 blocks, 5 sliding-window to 1
global), random weights from a config in code (no download), 8×512 random tokens as calibration data.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import autoqra  # noqa: E402
import autoqra.passes.select as select  # noqa: E402
from autoqra.data import lee_corpus_text, split_tokens, window_bos_id, windows  # noqa: E402
from autoqra.memory import jemalloc_loaded, trim_heap  # noqa: E402
from autoqra.passes.base import PassBase  # noqa: E402
from autoqra.zoo import load_default_model  # noqa: E402
from benchmarks.common import rss, write_json  # noqa: E402


class Sampler:
    """Peak RSS per phase label, sampled in a background thread."""

    def __init__(self) -> None:
        self.phase = "import"
        self.peaks: dict[str, int] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            value, label = rss(), self.phase
            self.peaks[label] = max(self.peaks.get(label, 0), value)
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop = True
        self._thread.join()


def gemma3_270m_shape() -> torch.nn.Module:
    """Gemma 3's text decoder at Gemma-3-270M's shape, random weights (seeded)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32_768,
        sliding_window=512, layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
        query_pre_attn_scalar=256, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    return Gemma3ForCausalLM(cfg).eval()


def activations(out: str, name: str, model: torch.nn.Module, batch: torch.Tensor, fp32: int) -> None:
    """Peak RSS of one forward + backward of ``batch`` above the resident model (twice; the larger)."""
    from autoqra.loss import auto_chunk_tokens, causal_lm_loss

    for p in model.parameters():
        p.requires_grad_(False)
        p.data.add_(0)  # every page resident (a mapped safetensors file is read lazily), as during calibration
    model.get_input_embeddings().register_forward_hook(lambda _m, _a, o: o.requires_grad_())
    chunk = auto_chunk_tokens(model)
    gc.collect()
    trim_heap()
    resident = rss()
    sampler = Sampler()
    for _ in range(2):
        mean, count = causal_lm_loss(model, {"input_ids": batch}, chunk_tokens=chunk, use_cache_flag=True)
        (mean * count).backward()
        del mean, count
        gc.collect()
        trim_heap()
    sampler.stop()
    peak = max(sampler.peaks.values())
    data = {"model": name, "allocator": "jemalloc" if jemalloc_loaded() else "default (glibc)", "fp32_weights": fp32,
            "tokens": batch.numel(), "resident": resident, "peak": peak, "activations": peak - resident}
    write_json(out, data)
    mib = 2**20
    print(f"{name}: resident {resident / mib:.0f} MiB, one {batch.shape[1]}-token forward/backward peaks "
          f"{peak / mib:.0f} MiB: activations {data['activations'] / mib:.0f} MiB; goal = 2 × {fp32 / mib:.0f} + "
          f"{data['activations'] / mib:.0f} = {(2 * fp32 + data['activations']) / mib:.0f} MiB above the interpreter")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="compile_memory_phases")
    parser.add_argument("--model", choices=("smollm2", "gemma3-270m-shape"), default="smollm2")
    parser.add_argument("--activations", action="store_true", help="measure one batch's forward/backward only")
    args = parser.parse_args()
    baseline = rss()
    # the code a user's job imports anyway to load the model (transformers' model and tokenizer classes:
    # ~2,000 modules, ~160 MiB): fixed, whatever the model's size
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, LlamaForCausalLM  # noqa: F401

    libraries = rss()
    sampler = Sampler()
    sampler.phase = "load"
    if args.model == "smollm2":
        model, tokenizer = load_default_model()
        splits = split_tokens(lee_corpus_text(), tokenizer)
        calib = windows(splits.calibration, seq_len=512, max_windows=8, bos_token_id=window_bos_id(tokenizer))
    else:
        model = gemma3_270m_shape()
        calib = torch.randint(3, model.config.vocab_size, (8, 512), generator=torch.Generator().manual_seed(0))
    fp32 = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())

    if args.activations:
        sampler.stop()
        activations(args.out, args.model, model, calib[:1], fp32)
        return
    base_call = PassBase.__call__

    def labelled(self, program):  # noqa: ANN001, ANN202
        sampler.phase = self.name
        try:
            return base_call(self, program)
        finally:
            sampler.phase = "between passes"

    PassBase.__call__ = labelled  # type: ignore[method-assign]
    live: list[dict[str, int]] = []
    finetune_loss = select.SelectPlanPass._finetune_loss

    def finetune(self, program, modules, *args):  # noqa: ANN001, ANN002, ANN202
        gc.collect()
        trim_heap()
        before = rss()
        sampler.phase = f"short fine-tune {len(live) + 1}"
        try:
            return finetune_loss(self, program, modules, *args)
        finally:
            sampler.phase = "SelectPlanPass"
            gc.collect()
            trim_heap()
            live.append({"before": before, "peak": sampler.peaks.get(f"short fine-tune {len(live) + 1}", 0),
                         "after": rss()})

    select.SelectPlanPass._finetune_loss = finetune  # type: ignore[method-assign]
    start = time.perf_counter()
    autoqra.compile(model, "4.24bits", calib=calib, progress=False, cache_dir=None)
    seconds = time.perf_counter() - start
    sampler.stop()
    mib = 2**20
    data = {
        "model": args.model,
        "allocator": "jemalloc" if jemalloc_loaded() else "default (glibc)",
        "fp32_weights": fp32, "rss_after_import": baseline, "rss_after_libraries": libraries, "seconds": seconds,
        "peaks": sampler.peaks, "short_finetunes": live,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    write_json(args.out, data)
    print(f"allocator: {data['allocator']}; fp32 weights {fp32 / mib:.0f} MiB; RSS after import {baseline / mib:.0f} MiB, "
          f"after transformers' model classes {libraries / mib:.0f} MiB")
    for label, value in sampler.peaks.items():
        print(f"  {label:<28} {value / mib:8.0f} MiB")
    for i, row in enumerate(live, 1):
        print(f"  short fine-tune {i}: live before {row['before'] / mib:.0f}, peak {row['peak'] / mib:.0f}, "
              f"live after {row['after'] / mib:.0f} MiB")
    print(f"peak RSS {data['ru_maxrss'] / mib:.0f} MiB = {data['ru_maxrss'] / fp32:.2f}× the fp32 weights")


if __name__ == "__main__":
    main()

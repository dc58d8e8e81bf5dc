"""What sharing a tied embedding with the compiled ``lm_head`` saves (``compile(tied_embedding=...)``).

SmolLM2-135M ties its ``lm_head`` to the input embedding (21% of its parameters). Every linear layer at 4
bits rank 8, the ``lm_head`` included and pinned to 4 or 8 bits (data-free compile, no selection: the same
plan for both modes), compiled with ``tied_embedding="share"`` and ``"keep"``; for each: the plan's bytes,
the bytes the whole model holds (distinct tensor storages, `autoqra.footprint.held_bytes`), perplexity on
8 Lee evaluation windows of 512 tokens, and with ``--export`` the ONNX file's bytes (4-bit ``lm_head``,
accuracy level 4, verified). Writes ``benchmarks/results/tied_embedding.json``.

    python benchmarks/tied_embedding.py [--export]
    python benchmarks/tied_embedding.py --quick --export    # seconds: a tiny tied Llama, random tokens (CI smoke)
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import autoqra  # noqa: E402
from autoqra.analysis import analyze  # noqa: E402
from autoqra.evaluate import perplexity  # noqa: E402
from autoqra.footprint import held_bytes  # noqa: E402
from autoqra.ir.capture import CaptureConfig  # noqa: E402
from autoqra.ir.cost import CostModel  # noqa: E402
from benchmarks.common import write_json  # noqa: E402


def load(quick: bool) -> tuple[torch.nn.Module, object, torch.Tensor, str]:
    """(model, tokenizer or None, evaluation windows, what they are)."""
    if quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny_models import VOCAB, tiny_llama

        windows = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
        return tiny_llama(tie=True), None, windows, "tiny tied Llama (config in code, random weights), random tokens"
    from autoqra import data, zoo

    model, tokenizer = zoo.load_default_model()
    windows = data.lee_windows(tokenizer, split="eval", seq_len=512, n=8)
    return model, tokenizer, windows, "SmolLM2-135M-Instruct (fp32 from GGUF Q4_1) + 8x512 Lee evaluation tokens"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", action="store_true", help="also export the 4-bit lm_head plans to ONNX")
    parser.add_argument("--quick", action="store_true", help="tiny tied Llama, random tokens (CI smoke)")
    args = parser.parse_args()
    torch.manual_seed(0)
    base, tokenizer, windows, what = load(args.quick)
    results: dict[str, dict] = {"fp32": {"ppl": perplexity(base, windows, progress=False),
                                         "held_bytes": held_bytes(base.modules())}}
    print("fp32", results["fp32"], flush=True)
    graph = analyze(base, capture_config=CaptureConfig(include=("lm_head",))).graph
    cost = CostModel(group_size=64)

    def budget(head_bits: int) -> int:  # every layer at 4 bits r8, the lm_head at head_bits r8
        return sum(cost.layer_bytes(graph.layer(n).in_features, graph.layer(n).out_features,
                                    head_bits if n == "lm_head" else 4, 8) for n in graph.order())

    for head in (4, 8):
        for mode in ("share", "keep"):
            model = copy.deepcopy(base)
            start = time.perf_counter()
            result = autoqra.compile(model, budget(head), include=("lm_head",), bits=(4, 8), ranks=(8,),
                                     patterns={"lm_head": {"bits": head}}, tied_embedding=mode, select=False,
                                     cache_dir=None, progress=False)
            row = {"plan_bytes": result.plan.total_bytes, "lm_head": list(result.plan.layers["lm_head"]),
                   "held_bytes": held_bytes(model.modules()), "ppl": perplexity(model, windows, progress=False),
                   "shared": result.report["shared_embeddings"], "compile_s": round(time.perf_counter() - start, 1)}
            if args.export and head == 4:
                from autoqra.export import export_onnx

                with tempfile.TemporaryDirectory() as tmp:
                    exported = export_onnx(model, Path(tmp) / "onnx", tokenizer=tokenizer, progress=False,
                                           accuracy_level=0 if args.quick else 4)  # exact on random weights
                row.update(onnx_bytes=exported.file_bytes, onnx_max_rel=exported.parity.max_rel)
            results[f"4-bit r8, lm_head {head}-bit, {mode}"] = row
            print(f"lm_head {head}-bit, {mode}:", row, flush=True)
            write_json("tied_embedding_quick" if args.quick else "tied_embedding",
                       {"quick": args.quick, "data": what, "results": results})


if __name__ == "__main__":
    main()

"""Rounding quality: what the packed backend's MSE-grid fit of (scale, zero) gains over plain
min/max rounding at 2, 3 and 4 bits, with and without the calibration importance.

Fake quantization (rounding alone, no adapters, rank 0): every decoder linear layer's weight
in a deep copy of the model is replaced by ``dequantize(quantize(W))`` with
``PackedBackend(method=...)`` at group size 64; perplexity on the Lee evaluation split
(16 x 512 tokens). "mse+imp" passes ``importance`` = the per-input-channel second moment
``E[x_j**2]`` of each layer's inputs, collected with forward pre-hooks on the fp32 model over 4 Lee
calibration windows of 512 tokens.

    python benchmarks/rounding.py            # SmolLM2-135M + Lee (~26 min on the busy 2-core VM)
    python benchmarks/rounding.py --quick    # seconds: a tiny Llama and random tokens
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autoqra.evaluate import perplexity  # noqa: E402
from autoqra.quant.base import QuantSpec  # noqa: E402
from autoqra.quant.packed import PackedBackend  # noqa: E402
from autoqra.report import table  # noqa: E402
from benchmarks.common import write_json  # noqa: E402

BITS = (2, 3, 4)
GROUP_SIZE = 64
METHODS = ("minmax", "mse", "mse+imp")


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside the decoder blocks (lm_head and embeddings excluded)."""
    return {name: m for name, m in model.model.layers.named_modules(prefix="model.layers")
            if isinstance(m, nn.Linear)}


@torch.no_grad()
def input_second_moments(model: nn.Module, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-input-channel ``E[x_j**2]`` of each decoder linear's input over all calibration tokens."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name, layer in decoder_linears(model).items():
        def hook(_module: nn.Module, args: tuple, name: str = name) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        model.eval()
        for window in calib:
            model(input_ids=window.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return {name: (sums[name] / counts[name]).float() for name in sums}


@torch.no_grad()
def fake_quantized(
    model: nn.Module, method: str, bits: int, importance: dict[str, torch.Tensor] | None
) -> tuple[nn.Module, dict[str, float]]:
    """A deep copy whose decoder linears hold ``dequantize(quantize(W))``; also the mean relative
    weight error and the seconds spent quantizing."""
    backend = PackedBackend(method="minmax" if method == "minmax" else "mse")
    spec = QuantSpec(bits=bits, group_size=GROUP_SIZE)
    qmodel = copy.deepcopy(model)
    errs = []
    start = time.perf_counter()
    for name, layer in decoder_linears(qmodel).items():
        w = layer.weight.data
        imp = importance[name] if importance is not None else None
        wq = backend.dequantize(backend.quantize(w, spec, importance=imp, name=name))
        errs.append(float((wq - w).norm() / w.norm()))
        layer.weight.data.copy_(wq)
    return qmodel, {"quantize_seconds": time.perf_counter() - start, "mean_rel_weight_error": sum(errs) / len(errs)}


def load(quick: bool, eval_windows: int, calib_windows: int, seq_len: int):
    if quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny_models import VOCAB, tiny_llama

        model = tiny_llama(layers=1)
        gen = torch.Generator().manual_seed(0)
        eval_w = torch.randint(3, VOCAB, (eval_windows, seq_len), generator=gen)
        calib_w = torch.randint(3, VOCAB, (calib_windows, seq_len), generator=gen)
        return model, eval_w, calib_w, "tiny Llama (config in code, random weights), random tokens"
    from autoqra.data import lee_windows
    from autoqra.zoo import load_default_model

    model, tokenizer = load_default_model()
    eval_w = lee_windows(tokenizer, split="eval", seq_len=seq_len, n=eval_windows)
    calib_w = lee_windows(tokenizer, split="calib", seq_len=seq_len, n=calib_windows)
    return model, eval_w, calib_w, "SmolLM2-135M-Instruct (fp32 from GGUF Q4_1) + Lee corpus"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny Llama, random tokens (CI smoke)")
    parser.add_argument("--eval-windows", type=int, default=None, help="default 16 (quick 2)")
    parser.add_argument("--calib-windows", type=int, default=None, help="default 4 (quick 2)")
    args = parser.parse_args()
    if args.quick:
        torch.set_num_threads(1)  # tiny tensors: threads only add barrier stalls on a busy machine
    torch.manual_seed(0)
    seq_len = 32 if args.quick else 512
    n_eval = args.eval_windows or (2 if args.quick else 16)
    n_calib = args.calib_windows or (2 if args.quick else 4)
    t0 = time.perf_counter()
    model, eval_w, calib_w, what = load(args.quick, n_eval, n_calib, seq_len)
    layers = decoder_linears(model)
    print(f"rounding quality: {what}; {len(layers)} decoder linear layers, group size {GROUP_SIZE}; "
          f"eval {tuple(eval_w.shape)} tokens, calib {tuple(calib_w.shape)}; torch threads {torch.get_num_threads()}")

    start = time.perf_counter()
    importance = input_second_moments(model, calib_w)
    calib_s = time.perf_counter() - start
    start = time.perf_counter()
    fp32_ppl = perplexity(model, eval_w, progress=False)
    eval_s = time.perf_counter() - start
    print(f"fp32 perplexity {fp32_ppl:.3f} ({eval_s:.0f} s); importance collected in {calib_s:.1f} s")

    rows = [{"method": "fp32", "bits": 32, "perplexity": fp32_ppl, "mean_rel_weight_error": 0.0,
             "quantize_seconds": 0.0}]
    for bits in BITS:
        for method in METHODS:
            qmodel, info = fake_quantized(model, method, bits, importance if method == "mse+imp" else None)
            ppl = perplexity(qmodel, eval_w, progress=False)
            del qmodel
            rows.append({"method": method, "bits": bits, "perplexity": ppl, **info})
            print(f"  {method:8s} {bits}-bit: ppl {ppl:.3f}, rel. weight err {info['mean_rel_weight_error']:.4f}, "
                  f"quantized in {info['quantize_seconds']:.1f} s", flush=True)

    by = {(r["method"], r["bits"]): r for r in rows}
    print()
    print(table(
        ["bits", *[f"{m} ppl" for m in METHODS], "mse / minmax", "mse+imp / minmax", *[f"{m} w-err" for m in METHODS]],
        [[b, *[f"{by[(m, b)]['perplexity']:.2f}" for m in METHODS],
          f"{by[('mse', b)]['perplexity'] / by[('minmax', b)]['perplexity']:.3f}",
          f"{by[('mse+imp', b)]['perplexity'] / by[('minmax', b)]['perplexity']:.3f}",
          *[f"{by[(m, b)]['mean_rel_weight_error']:.4f}" for m in METHODS]] for b in BITS],
    ))
    print(f"fp32 perplexity {fp32_ppl:.2f}; w-err: mean over layers of ||W_q - W|| / ||W||; total "
          f"{time.perf_counter() - t0:.0f} s")
    payload = {
        "quick": args.quick,
        "model": what,
        "layers": len(layers),
        "group_size": GROUP_SIZE,
        "eval_shape": list(eval_w.shape),
        "calib_shape": list(calib_w.shape),
        "fp32_perplexity": fp32_ppl,
        "rows": rows,
        "perplexity": {f"{r['method']}-{r['bits']}" if r["method"] != "fp32" else "fp32": r["perplexity"]
                       for r in rows},
        "ratio_to_minmax": {f"{m}-{b}": by[(m, b)]["perplexity"] / by[("minmax", b)]["perplexity"]
                            for m in METHODS[1:] for b in BITS},
    }
    path = write_json("rounding_quick" if args.quick else "rounding", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

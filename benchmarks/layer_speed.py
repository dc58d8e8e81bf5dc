"""Speed of the quantized layer: packed 2/3/4/8-bit ``QuantLoRALinear`` (rank 8) against fp32
``nn.Linear`` and bitsandbytes nf4 ``Linear4bit``, forward and forward+backward, batch 1 and 32.

Every layer is timed in the same process, interleaved: each round times every layer once (a few
calls each), and a layer's ratio is the median over rounds of (its time / fp32's time in that
round), so load from other jobs on the machine hits numerator and denominator alike.

* forward: under ``torch.no_grad()``.
* forward+backward: the input requires grad; ``QuantLoRALinear`` trains its adapters (base
  frozen); ``nn.Linear`` and nf4 have frozen weights, so they compute only the input gradient.

    python benchmarks/layer_speed.py            # 4096x4096 at 1 and 2 threads (~5 min on 2 cores)
    python benchmarks/layer_speed.py --quick    # 512x512, seconds (CI smoke)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autoqra.modules.quant_lora_linear import QuantLoRALinear  # noqa: E402
from autoqra.report import table  # noqa: E402
from benchmarks.common import write_json  # noqa: E402

BITS = (2, 3, 4, 8)
RANK = 8


def build_bnb_nf4(linear: nn.Linear, train: bool) -> tuple[nn.Module | None, str | None]:
    """bitsandbytes nf4 ``Linear4bit`` (fp32 compute) holding ``linear``'s weights, or (None, why).

    In eval mode, bitsandbytes >= 0.49 converts the weight on the first no-grad CPU call to a
    layout for its own CPU kernel, after which the layer can no longer backpropagate; in train
    mode it keeps the dequantize-then-matmul path that autograd goes through."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes as bnb

            layer = bnb.nn.Linear4bit(
                linear.in_features, linear.out_features, bias=linear.bias is not None,
                compute_dtype=torch.float32, quant_type="nf4",
            )
            layer.load_state_dict(linear.state_dict())
            layer = layer.to("cpu")  # quantizes the weight
            if getattr(layer.weight, "quant_state", None) is None or layer.weight.dtype != torch.uint8:
                return None, "bitsandbytes did not quantize the weight on CPU"
            layer.weight.requires_grad_(False)
            x = torch.randn(2, linear.in_features, requires_grad=True)
            y = layer(x)
            y.sum().backward()
            if x.grad is None or not torch.isfinite(y).all():
                return None, "bitsandbytes nf4 forward/backward gave no input gradient or non-finite output"
            if not train:
                layer.eval()
                with torch.no_grad():
                    layer(x.detach())  # triggers bitsandbytes' CPU inference layout, where it applies
        return layer.train(train), None
    except Exception as exc:  # noqa: BLE001 -- any failure means "cannot run here", reported as such
        return None, f"{type(exc).__name__}: {exc}"


def bnb_bytes(layer: nn.Module) -> int:
    w = layer.weight
    n = w.numel() * w.element_size()
    qs = getattr(w, "quant_state", None)
    if qs is not None and getattr(qs, "absmax", None) is not None:
        n += qs.absmax.numel() * qs.absmax.element_size()
    return n


def make_step(layer: nn.Module, x: torch.Tensor, backward: bool) -> Callable[[], None]:
    """One call: forward under no_grad, or forward + backward with the input requiring grad."""
    params = [p for p in layer.parameters() if p.requires_grad]
    if not backward:
        def forward() -> None:
            with torch.no_grad():
                layer(x)

        return forward
    xg = x.detach().clone().requires_grad_(True)
    grad_out = torch.randn(x.shape[0], layer.out_features, generator=torch.Generator().manual_seed(1))

    def forward_backward() -> None:
        xg.grad = None
        for p in params:
            p.grad = None
        layer(xg).backward(grad_out)

    return forward_backward


def time_calls(step: Callable[[], None], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) / calls


def measure(
    layers: dict[str, nn.Module], batch: int, backward: bool, rounds: int, target_s: float, max_calls: int
) -> dict:
    # fp32 must come first in ``layers``: it is the baseline of every ratio
    """Seconds per call (median over rounds) and per-round ratios to fp32, layers interleaved."""
    in_f = layers["fp32"].in_features
    x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(0))
    steps = {name: make_step(layer, x, backward) for name, layer in layers.items()}
    calls = {}
    for name, step in steps.items():  # warm up (builds kernel layouts), size the inner loop
        step()
        once = time_calls(step, 1)
        calls[name] = max(1, min(max_calls, round(target_s / max(once, 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))  # alternate the order too
        for name in order:
            samples[name].append(time_calls(steps[name], calls[name]))
    base = samples["fp32"]
    out = {}
    for name, s in samples.items():
        ratios = [t / b for t, b in zip(s, base, strict=True)]
        out[name] = {
            "seconds": statistics.median(s),
            "ratio_to_fp32": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "calls_per_round": calls[name],
            "rounds": rounds,
        }
    return out


def rel_error(layer: nn.Module, ref: nn.Linear, batch: int) -> float:
    x = torch.randn(batch, ref.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y_ref = ref(x)
        return float((layer(x) - y_ref).norm() / y_ref.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="512x512, few rounds (CI smoke)")
    parser.add_argument("--size", type=int, default=None, help="in = out features (default 4096, quick 512)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9, quick 2)")
    parser.add_argument(
        "--threads", default=None,
        help="comma-separated torch thread counts to measure, e.g. 1,2 (default: quick 1; full 1 and torch's default)",
    )
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    if args.threads:
        thread_counts = [int(t) for t in args.threads.split(",")]
    else:
        # quick: one thread, so that CI smoke runs do not stall on OpenMP barriers of a busy machine
        thread_counts = [1] if args.quick else sorted({1, default_threads})
    size = args.size or (512 if args.quick else 4096)
    rounds = args.rounds or (2 if args.quick else 9)
    target_s = 0.002 if args.quick else 0.15
    batches = (1, 32)
    print(f"layer speed: {size}x{size}, rank {RANK}, torch {torch.__version__}, torch default threads "
          f"{default_threads} (cpus {os.cpu_count()}), measured at threads {thread_counts}, "
          f"{rounds} interleaved rounds")

    torch.manual_seed(0)
    linear = nn.Linear(size, size)
    linear.weight.requires_grad_(False)
    linear.bias.requires_grad_(False)
    linear.eval()
    layers: dict[str, nn.Module] = {"fp32": linear}
    build_s = {}
    for bits in BITS:
        start = time.perf_counter()
        layers[f"packed-{bits}"] = QuantLoRALinear.from_linear(linear, bits, RANK, loftq_iters=0).eval()
        build_s[f"packed-{bits}"] = time.perf_counter() - start
    slow = QuantLoRALinear(size, size, 4, RANK, fast_path=False)
    slow.load_state_dict(layers["packed-4"].state_dict())
    layers["packed-4 chunked"] = slow.eval()  # same weights, int4 kernel off: what the fast path buys
    bnb_status = {}
    forward_only = set()
    for name, train in (("bnb-nf4", False), ("bnb-nf4 train-mode", True)):
        bnb_layer, bnb_error = build_bnb_nf4(linear, train)
        bnb_status[name] = {"measured": bnb_layer is not None, "error": bnb_error}
        if bnb_layer is None:
            print(f"{name}: NOT MEASURED, bitsandbytes cannot run here: {bnb_error}")
            continue
        layers[name] = bnb_layer
        if not train:
            forward_only.add(name)
            bnb_status[name]["cpu_inference_layout"] = bool(
                getattr(bnb_layer.weight.quant_state, "packing_format_for_cpu", False))

    nbytes = {"fp32": size * size * 4}
    for name, layer in layers.items():
        if isinstance(layer, QuantLoRALinear):
            nbytes[name] = layer.state_nbytes()
        elif name.startswith("bnb"):
            nbytes[name] = bnb_bytes(layer)
    errors = {name: rel_error(layer, linear, 32) for name, layer in layers.items()}

    by_threads: dict[str, dict] = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        results: dict[str, dict] = {}
        for backward in (False, True):
            for batch in batches:
                key = f"{'fwd+bwd' if backward else 'fwd'}_b{batch}"
                chosen = {n: m for n, m in layers.items() if not (backward and n in forward_only)}
                results[key] = measure(chosen, batch, backward, rounds, target_s, 5 if args.quick else 200)
        by_threads[str(threads)] = results
        headers = ["layer", "base bytes", "rel. err"] + [k.replace("_b", " b") for k in results]
        rows = []
        for name in layers:
            cells = []
            for res in results.values():
                r = res.get(name)
                cells.append("n/a" if r is None else f"{1e3 * r['seconds']:.2f} ms ({r['ratio_to_fp32']:.2f}x)")
            rows.append([name, nbytes.get(name, ""), f"{errors[name]:.4f}", *cells])
        print(f"\ntorch threads = {torch.get_num_threads()}")
        print(table(headers, rows))
    torch.set_num_threads(default_threads)
    print("\nratios: median over interleaved rounds of (layer time / fp32 time in the same round); "
          "rel. err: ||y - y_fp32|| / ||y_fp32|| at batch 32 (forward).\n"
          "base bytes: packed codes + fp16 scales/zeros + rank-8 adapters at 2 B/param (bias excluded); "
          "bnb: packed weight + absmax.\n"
          "packed-4 chunked: same weights with the int4 kernel off (fast_path=False). bnb-nf4: eval mode "
          "(bitsandbytes' CPU inference layout, cannot backpropagate); bnb-nf4 train-mode: its "
          "dequantize + matmul path, the one QLoRA training uses.")
    goal = {t: {k: res[k]["packed-4"]["ratio_to_fp32"] for k in res} for t, res in by_threads.items()}
    for t, g in goal.items():
        print(f"goal (BENCHMARKS.md #4) packed 4-bit forward <= 2x fp32, {t} thread(s): "
              + ", ".join(f"{k} {v:.2f}x {'ok' if v <= 2 else 'MISSED'}" for k, v in g.items() if "bwd" not in k)
              + "; fwd+bwd (no goal): " + ", ".join(f"{k} {v:.2f}x" for k, v in g.items() if "bwd" in k))

    payload = {
        "quick": args.quick,
        "size": size,
        "rank": RANK,
        "batches": list(batches),
        "torch_threads": default_threads,
        "thread_counts": thread_counts,
        "rounds": rounds,
        "layers": list(layers),
        "base_bytes": nbytes,
        "build_seconds": build_s,
        "rel_error_b32": errors,
        "results": by_threads,
        "bnb": bnb_status,
        "goal_packed4_le_2x": {t: {k: v <= 2.0 for k, v in g.items()} for t, g in goal.items()},
    }
    path = write_json("layer_speed_quick" if args.quick else "layer_speed", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

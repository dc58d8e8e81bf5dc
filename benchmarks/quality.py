"""Quality at equal memory, after fine-tuning: autoqra's plans against uniform plans and the ceiling.

One fine-tuning recipe for every row (adapters only, AdamW, constant lr, same data order per seed),
perplexity on the Lee evaluation split at step 0 and at every step of ``--steps``; one calibration
shared by every compile (its held-back quarter scores autoqra's candidates, never the evaluation
split). Rows are written to the JSON as they finish, so a long run can be stopped and its partial
table kept.

    python benchmarks/quality.py                 # SmolLM2 + Lee: hours on 2 cores
    python benchmarks/quality.py --quick         # seconds: a tiny Llama, random tokens (CI smoke)
    python benchmarks/quality.py --budgets u3 --rows default,uniform --steps 20,100 --seeds 0,1,2

Budgets: ``u3`` = the bytes of uniform 3-bit r8 (fp32 adapters), ``u2`` = uniform 2-bit r8, ``q08`` = 0.8× the
bytes of the QLoRA recipe (``q10``: 1.0×, any ``qNN`` = NN/10) as bitsandbytes holds it (:func:`qlora_bytes`; only autoqra's rows run there: no
uniform plan has those bytes).
Rows: ``fp32`` (fp32 weights kept as fp16 at 16 bits + LoRA r8, plain init: the ceiling, not bound to the
budget), ``uniform`` (uniform at the budget's bits, r8, our init), ``uniform4`` (uniform 4-bit r8, more
bytes), ``qlora`` (bitsandbytes NF4 + LoRA r16, B = 0 init, alpha = 2r: the recipe people use, its own
bytes), ``hqq`` (HQQ-fitted scales and zeros at the budget's uniform bits + r8, our init: equal bytes),
``hqq4`` (HQQ 4-bit + r8, its own bytes), ``deploy`` (autoqra, objective deploy), ``evolutionary`` (autoqra,
``solver="evolutionary"``), ``default`` (autoqra's default: objective finetune), ``lambdaX`` (the default
with ``lambda_=X`` fixed, e.g. ``lambda4``), ``noprobe`` (the default without the block probe).
``--model gemma3-270m`` (or a local ``save_pretrained`` folder) runs another causal LM on the same Lee protocol.
``--group-size N`` compiles autoqra's rows (default, deploy, evolutionary, lambdaX, noprobe) with quantization
groups of N instead of 64; the budgets and the baselines stay at 64 (the same bytes, spent on other metadata).
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import autoqra  # noqa: E402
from autoqra.analysis import analyze, uniform_costs  # noqa: E402
from autoqra.errors import ConfigError  # noqa: E402
from autoqra.evaluate import perplexity  # noqa: E402
from autoqra.footprint import layers_held_bytes  # noqa: E402
from autoqra.ir.cost import CostModel  # noqa: E402
from autoqra.passes.select import SelectConfig  # noqa: E402
from autoqra.report import table  # noqa: E402
from autoqra.train import finetune  # noqa: E402
from benchmarks.common import write_json  # noqa: E402

ROWS = ("default", "uniform", "deploy", "evolutionary", "fp32", "uniform4", "qlora", "hqq", "hqq4", "lambda1", "lambda2",
        "noprobe")
#: rows that autoqra plans (``--group-size`` applies to them), besides ``lambdaX``
AUTOQRA_ROWS = ("default", "deploy", "evolutionary", "noprobe")
#: ``lambdaX`` rows (X a number, e.g. lambda4, lambda0.5): the default compile with ``lambda_=X`` fixed
_LAMBDA_ROW = re.compile(r"lambda(\d+(?:\.\d+)?)")


def _data(quick: bool, calib_windows: int, eval_windows: int, model_dir: str | None = None):
    if quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny_models import tiny_llama

        gen = torch.Generator().manual_seed(0)
        # a learnable stream: a repeated random phrase, so fine-tuning has something to find
        phrase = torch.randint(3, 128, (37,), generator=gen)
        stream = phrase.repeat(400)
        calib = stream[: 12 * 64].view(12, 64)
        evals = stream[2000 : 2000 + 4 * 64].view(4, 64)
        return tiny_llama(), calib, evals, stream[:1500], 64
    from autoqra.data import lee_corpus_text, split_tokens, window_bos_id, windows
    from autoqra.zoo import load_default_model, load_model

    model, tokenizer = load_default_model() if model_dir is None else load_model(model_dir)
    splits = split_tokens(lee_corpus_text(), tokenizer)
    bos = window_bos_id(tokenizer)
    calib = windows(splits.calibration, seq_len=512, max_windows=calib_windows, bos_token_id=bos)
    evals = windows(splits.evaluation, seq_len=512, max_windows=eval_windows, bos_token_id=bos)
    return model, calib, evals, splits.calibration, 256


def qlora_bytes(graph: Any, rank: int = 16, group_size: int = 64) -> int:
    """Bytes of QLoRA as bitsandbytes holds it: NF4 codes (4 bits a weight), double-quantized absmax (one
    uint8 per block of ``group_size`` + one fp32 per 256 blocks + one fp32 offset per layer) and fp32 LoRA
    adapters of ``rank``; the shared code tables (< 2 KB) are left out. Smaller than our ``bnb`` format
    (fp16 absmax + an unused fp16 zero), so the comparison does not flatter autoqra."""
    total = 0
    for layer in graph.layers():
        blocks = layer.out_features * math.ceil(layer.in_features / group_size)
        total += blocks * group_size // 2 + blocks + 4 * math.ceil(blocks / 256) + 4
        r = min(rank, layer.in_features, layer.out_features)
        total += 4 * r * (layer.in_features + layer.out_features)
    return total


def _row_kwargs(row: str, bits: int | None, budget: int) -> tuple[int | str, dict[str, Any]] | None:
    if row == "default":
        return budget, {}
    if row == "deploy":
        return budget, {"objective": "deploy"}
    if row == "noprobe":  # the default without the block probe (its tables as predicted); the seed is set in run
        return budget, {}
    if (fixed := _LAMBDA_ROW.fullmatch(row)) is not None:  # one fixed plasticity weight instead of the fitted
        # one (the selection still measures it against the uniform plans): does a longer horizon want more rank?
        return budget, {"lambda_": float(fixed.group(1))}
    if row == "evolutionary":
        return budget, {"solver": "evolutionary"}
    if row == "hqq":
        if bits is None:
            return None
        return budget, {"bits": (bits,), "ranks": (8,), "backend": "hqq"}
    if row == "hqq4":
        return "100GB", {"bits": (4,), "ranks": (8,), "backend": "hqq"}
    if row == "uniform":
        if bits is None:
            return None  # no uniform plan at this budget
        return budget, {"bits": (bits,), "ranks": (8,)}
    if row == "uniform4":
        return "100GB", {"bits": (4,), "ranks": (8,)}
    if row == "fp32":
        return "100GB", {"bits": (16,), "ranks": (8,), "loftq_iters": 0}
    if row == "qlora":
        return "100GB", {"bits": (4,), "ranks": (16,), "backend": "bnb", "alpha": 32.0, "loftq_iters": 0}
    raise SystemExit(f"unknown row {row!r}; rows: {', '.join(ROWS)}, or lambdaX (a fixed λ = X, e.g. lambda4)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, calib, evals, train_tokens, seq_len = _data(args.quick, args.calib_windows, args.eval_windows, args.model)
    steps = sorted({int(s) for s in args.steps.split(",")})
    seeds = [int(s) for s in args.seeds.split(",")]
    t = time.perf_counter()
    cal = autoqra.calibrate(model, calib, progress=not args.quick)
    calib_seconds = time.perf_counter() - t
    graph = analyze(model).graph
    n_weights = graph.total_numel()
    budgets = {}
    for name in args.budgets.split(","):
        if len(name) == 3 and name[0] == "q" and name[1:].isdigit():  # q08 = 0.8x, q10 = 1.0x QLoRA's bytes
            budgets[name] = (None, int(int(name[1:]) / 10 * qlora_bytes(graph)))
            continue
        bits = {"u3": 3, "u2": 2}.get(name)
        if bits is None:
            raise SystemExit(f"unknown budget {name!r}; budgets: u3, u2, qNN (NN/10 x QLoRA's bytes, e.g. q08)")
        (u,) = uniform_costs(graph, CostModel(), (bits,), 8)
        budgets[name] = (bits, u.nbytes)
    fp32_ppl = perplexity(model, evals, progress=False)
    rows: list[dict[str, Any]] = []
    payload: dict[str, Any] = {"quick": args.quick, "model": "tiny-llama" if args.quick else args.model or "smollm2-135m",
                               "steps": steps, "seeds": seeds, "fp32_ppl": fp32_ppl,
                               "calibration_seconds": calib_seconds, "budgets": budgets, "rows": rows,
                               "group_size": args.group_size,
                               "qlora_bytes_bitsandbytes": qlora_bytes(graph),
                               "recipe": {"lr": args.lr, "batch_size": args.batch_size, "seq_len": seq_len,
                                          "eval_windows": int(evals.shape[0]), "calib_windows": int(calib.shape[0])}}
    name = "quality_quick" if args.quick else args.out
    for budget_name, (bits, nbytes) in budgets.items():
        for row in args.rows.split(","):
            if row in ("fp32", "uniform4", "qlora", "hqq4") and budget_name != next(iter(budgets)):
                continue  # budget-independent rows: once
            spec = _row_kwargs(row, bits, nbytes)
            if spec is None:
                print(f"{budget_name} {row}: skipped (no uniform plan has these bytes)", flush=True)
                continue
            for seed in seeds:
                record: dict[str, Any] = {"budget": budget_name, "row": row, "seed": seed}
                try:
                    work = copy.deepcopy(model)
                    budget, kwargs = spec
                    if row == "noprobe":
                        kwargs = {**kwargs, "select": SelectConfig(probe=None, seed=seed)}
                    if row in AUTOQRA_ROWS or _LAMBDA_ROW.fullmatch(row):
                        kwargs = {**kwargs, "group_size": args.group_size}
                    record["group_size"] = kwargs.get("group_size", CostModel().group_size)
                    t = time.perf_counter()
                    result = autoqra.compile(work, budget, calib=cal, cache_dir=None, progress=not args.quick,
                                             seed=seed, **kwargs)
                    record["search_seconds"] = time.perf_counter() - t
                    record["plan_bytes"] = result.plan.total_bytes
                    record["held_bytes"] = layers_held_bytes(work)
                    record["bits_per_weight"] = 8 * record["held_bytes"] / n_weights
                    chosen = list(result.plan.layers.values())
                    record["mean_bits"] = sum(b for b, _ in chosen) / len(chosen)
                    record["mean_rank"] = sum(r for _, r in chosen) / len(chosen)
                    record["winner"] = (result.report.get("selection") or {}).get("winner")
                    record["candidates"] = [  # the selection's held-back scores: step 0, screen, short fine-tune
                        [c["label"], c.get("loss0"), c.get("loss_screen"), c.get("loss_ft"), c.get("mix")]
                        for c in (result.report.get("selection") or {}).get("candidates", [])]
                    probe = result.report.get("error_probe") or {}
                    record["probe_seconds"] = probe.get("seconds")
                    ppl = {0: perplexity(work, evals, progress=False)}

                    def at_steps(info, work=work, ppl=ppl):
                        if info.step in steps:
                            ppl[info.step] = perplexity(work, evals, progress=False)

                    t = time.perf_counter()
                    fit = finetune(work, train_tokens, steps=max(steps), lr=args.lr, batch_size=args.batch_size,
                                   seq_len=seq_len, seed=seed, callbacks=[at_steps], progress=not args.quick)
                    record["finetune_seconds"] = time.perf_counter() - t
                    record["final_loss"] = fit.losses[-1]
                    record["ppl"] = {str(k): v for k, v in sorted(ppl.items())}
                except Exception as exc:  # a row that cannot run here (e.g. bitsandbytes) is recorded, not fatal
                    record["error"] = f"{type(exc).__name__}: {exc}"
                rows.append(record)
                write_json(name, payload)
                print(_line(record), flush=True)
                del work
                gc.collect()
    payload["figures"] = figures(rows, steps)
    path = write_json(name, payload)
    plot(rows, steps, payload["fp32_ppl"], path.with_suffix(".png"))
    return payload


def plot(rows: list[dict[str, Any]], steps: list[int], fp32_ppl: float, path: Path) -> None:
    """Perplexity against held bytes, every row (means over seeds): as compiled and after the last step;
    the uniform plans joined by a line."""
    from autoqra.demo_figures import DemoRow, summary_plot

    last = str(max(steps))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if "ppl" in r:
            groups.setdefault((r["budget"], r["row"]), []).append(r)
    points = []
    for (budget, row), rs in groups.items():
        after = [r["ppl"][last] for r in rs if last in r["ppl"]]
        points.append(DemoRow(f"{row} ({budget})" if row in ("default", "uniform", "deploy", "evolutionary", "hqq") else row,
                              rs[0]["held_bytes"], sum(r["ppl"]["0"] for r in rs) / len(rs),
                              sum(after) / len(after) if after else None, row in ("uniform", "uniform4")))
    if points:
        summary_plot(points, path, fp32_ppl=fp32_ppl, steps=int(last))


def _line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['budget']} {r['row']} seed {r['seed']}: {r['error']}"
    ppl = ", ".join(f"{k}: {v:.2f}" for k, v in r["ppl"].items())
    return (f"{r['budget']} {r['row']} seed {r['seed']}: {r['held_bytes']:,} B ({r['bits_per_weight']:.2f} bits), "
            f"mean bits {r['mean_bits']:.2f}, mean rank {r['mean_rank']:.1f}, ppl {ppl}")


def figures(rows: list[dict[str, Any]], steps: list[int]) -> dict[str, Any]:
    """Equal-memory ratios and gap closed after the last step (means over seeds)."""
    last = str(max(steps))

    def mean(budget: str, row: str) -> float | None:
        vals = [r["ppl"][last] for r in rows if r["budget"] == budget and r["row"] == row and "ppl" in r]
        return sum(vals) / len(vals) if vals else None

    out: dict[str, Any] = {"step": int(last)}
    for budget in sorted({r["budget"] for r in rows}):
        default, uniform = mean(budget, "default"), mean(budget, "uniform")
        if default and uniform:
            out[f"{budget}_default_vs_uniform"] = default / uniform
        for other in ("deploy", "evolutionary", "hqq"):
            value = mean(budget, other)
            if value and uniform:
                out[f"{budget}_{other}_vs_uniform"] = value / uniform
        fp32 = next((mean(b, "fp32") for b in sorted({r["budget"] for r in rows}) if mean(b, "fp32")), None)
        if default and uniform and fp32 and uniform != fp32:
            out[f"{budget}_gap_closed"] = (uniform - default) / (uniform - fp32)
        qlora = next((mean(b, "qlora") for b in sorted({r["budget"] for r in rows}) if mean(b, "qlora")), None)
        if default and qlora:
            # below 1 at q08: the default at 0.8x QLoRA's bytes beats it, so memory at equal quality <= 0.8
            out[f"{budget}_default_vs_qlora"] = default / qlora
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default=None, help="gemma3-270m, or a local Hugging Face causal-LM folder "
                        "(save_pretrained), instead of the embedded SmolLM2; the text stays Lee")
    parser.add_argument("--budgets", default="u3,u2")
    parser.add_argument("--rows", default=None, help=f"comma-separated, of: {', '.join(ROWS)} (default: all; "
                        "--quick: default,uniform,deploy,fp32)")
    parser.add_argument("--steps", default="20,100")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=64, help="quantization group of autoqra's rows "
                        "(the budgets and the baselines stay at 64)")
    parser.add_argument("--out", default="quality", help="results file name (without .json)")
    args = parser.parse_args()
    try:  # a bad group fails here, not as an error row per compile
        CostModel(group_size=args.group_size)
    except ConfigError as exc:
        parser.error(f"--group-size: {exc}")
    if args.quick:
        args.steps, args.budgets = "4,8", "u3"
        args.rows = args.rows or "default,uniform,deploy,fp32"
    args.rows = args.rows or ",".join(ROWS)
    payload = run(args)
    rows = [r for r in payload["rows"] if "ppl" in r]
    steps = [str(s) for s in payload["steps"]]
    print(table(["budget", "row", "seed", "bytes", "bits/w", "mean bits", "mean rank", "ppl@0",
                 *[f"ppl@{s}" for s in steps], "search s", "winner"],
                [[r["budget"], r["row"], r["seed"], f"{r['held_bytes']:,}", f"{r['bits_per_weight']:.2f}",
                  f"{r['mean_bits']:.2f}", f"{r['mean_rank']:.1f}", f"{r['ppl']['0']:.2f}",
                  *[f"{r['ppl'].get(s, float('nan')):.2f}" for s in steps], f"{r['search_seconds']:.0f}",
                  r["winner"] or "-"] for r in rows]))
    print("figures:", payload["figures"])


if __name__ == "__main__":
    main()

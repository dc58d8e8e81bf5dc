"""Cost of compiling: time per pass for SmolLM2 truncated to 4/8/16/30 blocks, and solver time
and optimality gap on synthetic problems of 10–2000 groups × up to 40 choices.

    python benchmarks/compile_cost.py            # full (SmolLM2, ~10 min on 2 cores)
    python benchmarks/compile_cost.py --quick    # seconds: a tiny Llama and small problems
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import autoqra  # noqa: E402
from autoqra.report import table  # noqa: E402
from autoqra.search import SearchProblem, get_solver  # noqa: E402
from benchmarks.common import truncated_smollm2, write_json  # noqa: E402


def synthetic(rng: np.random.Generator, groups: int, choices: int) -> SearchProblem:
    bits = [2, 3, 4, 8, 16]
    ranks = [0, 4, 8, 16, 32, 64, 128, 256][: max(1, choices // len(bits))]
    ch, co, er = [], [], []
    for _ in range(groups):
        n_in, n_out = int(rng.choice([576, 1536, 4096])), int(rng.choice([192, 576, 1536]))
        sens = float(rng.lognormal(0, 1))
        keys, cost, err = [], [], []
        for b in bits:
            for r in ranks:
                keys.append((b, r))
                cost.append(n_in * n_out * b // 8 + r * (n_in + n_out) * 2)
                err.append(0.0 if b == 16 else sens * 4.0 ** (-b) * (1 - r / (2 * max(ranks) + 1)))
        ch.append(keys[:choices])
        co.append(cost[:choices])
        er.append(err[:choices])
    lo, hi = sum(min(c) for c in co), sum(max(c) for c in co)
    return SearchProblem.build([f"g{i}" for i in range(groups)], ch, co, er, int(lo + 0.3 * (hi - lo)))


def solver_table(sizes: list[tuple[int, int]]) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for groups, choices in sizes:
        problem = synthetic(rng, groups, choices)
        best = None
        for name in ("exact", "greedy", "differentiable"):
            start = time.perf_counter()
            result = get_solver(name)(problem, 0)
            seconds = time.perf_counter() - start
            if name == "exact":
                best = result.error
            gap = result.error / best - 1 if best else 0.0
            rows.append({"groups": groups, "choices": choices, "solver": name, "seconds": seconds,
                         "gap_vs_exact": gap, "within_budget": result.cost <= problem.budget})
    return rows


def model_table(layer_counts: list[int], quick: bool, calib_windows: int) -> list[dict]:
    rows = []
    for n in layer_counts:
        if quick:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
            from tiny_models import tiny_llama

            model = tiny_llama(layers=n)
            calib = torch.randint(3, 128, (calib_windows, 64), generator=torch.Generator().manual_seed(0))
        else:
            from autoqra.data import lee_windows

            model, tokenizer = truncated_smollm2(n)
            calib = lee_windows(tokenizer, split="calib", seq_len=512, n=calib_windows)
        start = time.perf_counter()
        result = autoqra.compile(model, "3.87bits", calib=calib, cache_dir=None, progress=False)
        total = time.perf_counter() - start
        row = {"blocks": n, "layers": result.report["layers"], "total_seconds": total,
               "capture_route": result.report["capture_route"]}
        row.update({t["pass"]: t["seconds"] for t in result.report["timings"]})
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--calib-windows", type=int, default=8)
    args = parser.parse_args()
    layer_counts = [1, 2] if args.quick else [4, 8, 16, 30]
    sizes = [(10, 10), (100, 20)] if args.quick else [(10, 10), (100, 20), (500, 40), (1000, 40), (2000, 40)]
    models = model_table(layer_counts, args.quick, 2 if args.quick else args.calib_windows)
    passes = [k for k in models[0] if k.endswith("Pass")]
    print(table(["blocks", "layers", *[p.removesuffix("Pass") for p in passes], "total s"],
                [[r["blocks"], r["layers"], *[f"{r[p]:.2f}" for p in passes], f"{r['total_seconds']:.1f}"] for r in models]))
    solvers = solver_table(sizes)
    print(table(["groups", "choices", "solver", "seconds", "gap vs exact", "in budget"],
                [[r["groups"], r["choices"], r["solver"], f"{r['seconds']:.3f}", f"{100 * r['gap_vs_exact']:.3f}%",
                  r["within_budget"]] for r in solvers]))
    path = write_json("compile_cost_quick" if args.quick else "compile_cost", {"models": models, "solvers": solvers,
                                                                               "quick": args.quick})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Proxy fidelity: does the objective rank plans the way measured perplexity does?

Random plans of (about) equal bytes plus the solvers' plans at the same budget are materialized one by
one, measured on the evaluation split at step 0 and after a short adapter fine-tune (same recipe for
all), and the Spearman correlation of each objective with the measured perplexity is reported:
``deploy`` (the step-0 error) and ``finetune`` (error − λ·plasticity at the λ the selection fitted).
Also: whether low bits come with higher ranks in the best measured plans (the paper's compensation
pattern). Rows are written as they finish.

    python benchmarks/proxy_fidelity.py            # SmolLM2 + Lee, 12 random plans: hours on 2 cores
    python benchmarks/proxy_fidelity.py --quick    # seconds: a tiny Llama (CI smoke)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import autoqra  # noqa: E402
from autoqra.analysis import uniform_costs  # noqa: E402
from autoqra.evaluate import perplexity  # noqa: E402
from autoqra.ir.cost import CostModel  # noqa: E402
from autoqra.passes.materialize import MaterializePass  # noqa: E402
from autoqra.passes.search import SearchPass  # noqa: E402
from autoqra.report import table  # noqa: E402
from autoqra.search.evolutionary import _repair_index  # noqa: E402
from autoqra.train import finetune  # noqa: E402
from benchmarks.common import write_json  # noqa: E402
from benchmarks.quality import _data  # noqa: E402


def random_plans(problem, n: int, seed: int) -> list[np.ndarray]:
    """Random choices repaired to the budget, then random upgrades while they fit (≈ the budget)."""
    rng = np.random.default_rng(seed)
    plans = []
    for _ in range(n):
        index = _repair_index(problem, np.asarray([rng.integers(0, len(c)) for c in problem.choices]))
        cost = problem.evaluate(index)[0]
        for g in rng.permutation(problem.n_groups):
            k = problem.cost[g]
            up = [j for j in range(len(k)) if k[j] > k[index[g]] and cost - k[index[g]] + k[j] <= problem.budget]
            if up:
                j = int(rng.choice(up))
                cost += int(k[j]) - int(k[index[g]])
                index[g] = j
        plans.append(index)
    return plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plans", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    if args.quick:
        args.plans, args.steps = 4, 3
    model, calib, evals, train_tokens, seq_len = _data(args.quick, 8, 16)
    cal = autoqra.calibrate(model, calib, progress=not args.quick)
    from autoqra.analysis import analyze

    (u3,) = uniform_costs(analyze(model).graph, CostModel(), (3,), 8)
    # one plan-only compile: the tables, the plasticity, and the λ the measured selection fits
    fitted = autoqra.compile(model, u3.nbytes, calib=cal, materialize=False, cache_dir=None, progress=False)
    selection = fitted.report["selection"]
    winner = selection["winner"]
    lam = float(winner.split("=")[1].split()[0]) if "λ=" in winner else 0.0
    program = fitted.program
    search = SearchPass(autoqra.Budget(nbytes=u3.nbytes))
    base = search.build_problem(program, lambda_=0.0)
    unit = selection["lambda_unit"]
    tuned = search.build_problem(program, lambda_=lam * unit)
    plans: list[tuple[str, np.ndarray]] = [(f"random {i}", p) for i, p in enumerate(random_plans(base, args.plans, 0))]
    from autoqra.search.registry import get_solver

    plans.append(("deploy (exact, λ=0)", np.asarray(get_solver("exact")(base).index)))
    plans.append((f"finetune (exact, λ={lam:g})", np.asarray(get_solver("exact")(tuned).index)))
    rows: list[dict[str, Any]] = []
    graph = program.require_graph()
    groups = graph.groups()
    payload: dict[str, Any] = {"quick": args.quick, "budget": u3.nbytes, "lambda": lam, "lambda_unit": unit,
                               "steps": args.steps, "rows": rows}
    name = "proxy_fidelity_quick" if args.quick else "proxy_fidelity"
    for label, index in plans:
        choices = [base.choices[g][i] for g, i in enumerate(index)]
        for group, choice in zip(base.groups, choices, strict=True):
            for m in groups[group]:
                graph.set_choice(m, *choice)
        work = copy.deepcopy(model)
        run = dataclasses.replace(program, model=work, state={**program.state, "built_layers": {}})
        MaterializePass(progress=False).call(run)
        row: dict[str, Any] = {
            "plan": label, "bytes": base.evaluate(index)[0],
            "deploy_objective": base.evaluate(index)[1], "finetune_objective": tuned.evaluate(index)[1],
            "mean_bits": float(np.mean([c[0] for c in choices])), "mean_rank": float(np.mean([c[1] for c in choices])),
        }
        row["ppl0"] = perplexity(work, evals, progress=False)
        if any(c[1] for c in choices):
            finetune(work, train_tokens, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=seq_len,
                     seed=0, progress=False)
        row["ppl_ft"] = perplexity(work, evals, progress=False)
        low = [graph.annotation(n).rank for n in graph.order() if graph.annotation(n).bits <= 3]
        high = [graph.annotation(n).rank for n in graph.order() if graph.annotation(n).bits >= 4]
        row["mean_rank_low_bits"] = float(np.mean(low)) if low else None
        row["mean_rank_high_bits"] = float(np.mean(high)) if high else None
        rows.append(row)
        write_json(name, payload)
        print(f"{label}: {row['bytes']:,} B, ppl {row['ppl0']:.2f} → {row['ppl_ft']:.2f}", flush=True)
        del work
        gc.collect()
    figures = {}
    for objective in ("deploy_objective", "finetune_objective"):
        for measured in ("ppl0", "ppl_ft"):
            rho = spearmanr([r[objective] for r in rows], [r[measured] for r in rows]).statistic
            figures[f"spearman_{objective.split('_')[0]}_vs_{measured}"] = None if np.isnan(rho) else float(rho)
    best = min(rows, key=lambda r: r["ppl_ft"])
    figures["best_plan"] = best["plan"]
    figures["best_mean_rank_low_bits"] = best["mean_rank_low_bits"]
    figures["best_mean_rank_high_bits"] = best["mean_rank_high_bits"]
    payload["figures"] = figures
    path = write_json(name, payload)
    print(table(["plan", "bytes", "deploy obj", "finetune obj", "ppl@0", f"ppl@{args.steps}", "mean bits", "mean rank"],
                [[r["plan"], f"{r['bytes']:,}", f"{r['deploy_objective']:.4g}", f"{r['finetune_objective']:.4g}",
                  f"{r['ppl0']:.2f}", f"{r['ppl_ft']:.2f}", f"{r['mean_bits']:.2f}", f"{r['mean_rank']:.1f}"]
                 for r in rows]))
    print("figures:", figures)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

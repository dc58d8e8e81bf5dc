"""Proxy fidelity: does the objective rank plans the way measured perplexity does?

Random plans of (about) equal bytes plus the solvers' plans at the same budget are materialized one by
one, measured on the evaluation split at step 0 and after a short adapter fine-tune (same recipe for
all), and the Spearman correlation of each objective with the measured perplexity is reported:
``deploy`` (the step-0 error) and ``finetune`` (error − λ·plasticity at the λ the selection fitted),
both on the error tables as the compile uses them (calibrated by `autoqra.passes.probe` since 2026-12-06).
Also: whether low bits come with higher ranks in the best measured plans (the paper's compensation
pattern). Rows are written as they finish.

``--rescore FILE`` re-scores a finished run's plans with today's objective against the perplexities that
run measured (minutes, no fine-tuning): the plans are regenerated from the same seed on the tables as
predicted, each checked against the file (bytes and objective), then scored on the calibrated tables.

    python benchmarks/proxy_fidelity.py            # SmolLM2 + Lee, 12 random plans: hours on 2 cores
    python benchmarks/proxy_fidelity.py --quick    # seconds: a tiny Llama (CI smoke)
    python benchmarks/proxy_fidelity.py --rescore benchmarks/results/proxy_fidelity.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
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
from autoqra.passes.probe import ProbeBlocksPass, ProbeConfig  # noqa: E402
from autoqra.passes.search import SearchPass  # noqa: E402
from autoqra.passes.select import SelectConfig, lambda_unit, uniform_candidates  # noqa: E402
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


def plans_of(base, tuned, n: int, lam: float) -> list[tuple[str, np.ndarray]]:  # noqa: ANN001
    """The benchmark's plans: ``n`` random ones (seed 0), then the exact solver's at λ = 0 and at ``lam``."""
    from autoqra.search.registry import get_solver

    plans: list[tuple[str, np.ndarray]] = [(f"random {i}", p) for i, p in enumerate(random_plans(base, n, 0))]
    plans.append(("deploy (exact, λ=0)", np.asarray(get_solver("exact")(base).index)))
    plans.append((f"finetune (exact, λ={lam:g})", np.asarray(get_solver("exact")(tuned).index)))
    return plans


def _spearman(xs: list[float], ys: list[float]) -> float | None:
    rho = spearmanr(xs, ys).statistic
    return None if np.isnan(rho) else float(rho)


def rescore(path: Path, quick: bool) -> None:
    """Today's objectives (tables calibrated by the probe) on a finished run's plans and perplexities."""
    old = json.loads(path.read_text())
    if old.get("probe"):
        raise SystemExit(f"{path} was scored on calibrated tables already: rescore a run made with --no-probe "
                         "(or before 2026-12-06)")
    if bool(old.get("quick")) != quick:
        raise SystemExit(f"{path} is {'a' if old.get('quick') else 'not a'} --quick run: pass --quick to match")
    model, calib, _, _, _ = _data(quick, 8, 16)
    cal = autoqra.calibrate(model, calib, progress=not quick)
    raw = autoqra.compile(model, old["budget"], calib=cal, select=False, materialize=False, cache_dir=None,
                          progress=False)
    program = raw.program
    search = SearchPass(autoqra.Budget(nbytes=old["budget"]))
    base = search.build_problem(program, lambda_=0.0)
    tuned = search.build_problem(program, lambda_=old["lambda"] * old["lambda_unit"])
    plans = plans_of(base, tuned, len(old["rows"]) - 2, old["lambda"])
    drift = 0.0  # the statistics' arithmetic changed since some runs (e.g. float16 gradient sums): ~1e-6
    for (label, index), row in zip(plans, old["rows"], strict=True):
        cost, error = base.evaluate(index)
        if label != row["plan"] or cost != row["bytes"] or not math.isclose(error, row["deploy_objective"],
                                                                            rel_tol=1e-3):
            raise SystemExit(f"{label}: regenerated plan differs from {path} ({cost:,} B, objective {error:.6g} vs "
                             f"{row['bytes']:,} B, {row['deploy_objective']:.6g}); the tables changed since")
        drift = max(drift, abs(error / row["deploy_objective"] - 1))
    probe = ProbeBlocksPass(ProbeConfig(), holdout=list(cal.holdout), progress=not quick)
    probe.call(program)
    calibrated = search.build_problem(program, lambda_=0.0)
    uniform = uniform_candidates(calibrated)
    unit = lambda_unit(calibrated, program.state.get("plasticity", {}), program, uniform)
    lambdas = sorted({float(old["lambda"]), 1.0})
    rows = []
    for (label, index), row in zip(plans, old["rows"], strict=True):
        out = {"plan": label, "ppl0": row["ppl0"], "ppl_ft": row["ppl_ft"],
               "deploy_raw": row["deploy_objective"], "finetune_raw": row["finetune_objective"],
               "deploy": calibrated.evaluate(index)[1]}
        for lam in lambdas:
            out[f"finetune_{lam:g}"] = search.build_problem(program, lambda_=lam * unit).evaluate(index)[1]
        rows.append(out)
    objectives = ["deploy_raw", "finetune_raw", "deploy", *[f"finetune_{lam:g}" for lam in lambdas]]
    figures: dict[str, float | None] = {}
    for subset, chosen in (("all", rows), ("random", [r for r in rows if r["plan"].startswith("random")])):
        for objective in objectives:
            for measured in ("ppl0", "ppl_ft"):
                figures[f"{subset}:{objective}_vs_{measured}"] = _spearman(
                    [r[objective] for r in chosen], [r[measured] for r in chosen])
    name = "proxy_fidelity_rescored_quick" if quick else "proxy_fidelity_rescored"
    out_path = write_json(name, {"quick": quick, "source": str(path), "budget": old["budget"],
                                 "lambda_unit_calibrated": unit, "lambdas": lambdas, "rows": rows,
                                 "objective_drift": drift,
                                 "figures": figures, "probe": program.state.get("error_probe")})
    print(table(["objective", "vs ppl@0 (all)", f"vs ppl@{old['steps']} (all)", "vs ppl@0 (random)",
                 f"vs ppl@{old['steps']} (random)"],
                [[o, *(f"{v:.3f}" if (v := figures[f"{s}:{o}_vs_{m}"]) is not None else "-"
                       for s in ("all", "random") for m in ("ppl0", "ppl_ft"))] for o in objectives]))
    print(f"the regenerated plans' objectives on the tables as predicted: within {drift:.1e} relative of {path}'s")
    print(f"wrote {out_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plans", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--no-probe", action="store_true",
                        help="the error tables as predicted (SelectConfig(probe=None)), as before 2026-12-06")
    parser.add_argument("--rescore", type=Path, default=None, metavar="FILE",
                        help="re-score a finished run's plans with today's objective (no fine-tuning)")
    args = parser.parse_args()
    if args.rescore is not None:
        rescore(args.rescore, args.quick)
        return
    if args.quick:
        args.plans, args.steps = 4, 3
    model, calib, evals, train_tokens, seq_len = _data(args.quick, 8, 16)
    cal = autoqra.calibrate(model, calib, progress=not args.quick)
    from autoqra.analysis import analyze

    (u3,) = uniform_costs(analyze(model).graph, CostModel(), (3,), 8)
    # one plan-only compile: the tables, the plasticity, and the λ the measured selection fits
    fitted = autoqra.compile(model, u3.nbytes, calib=cal, materialize=False, cache_dir=None, progress=False,
                             select=SelectConfig(probe=None) if args.no_probe else None)
    selection = fitted.report["selection"]
    winner = selection["winner"]
    lam = float(winner.split("=")[1].split()[0]) if "λ=" in winner else 0.0
    program = fitted.program
    search = SearchPass(autoqra.Budget(nbytes=u3.nbytes))
    base = search.build_problem(program, lambda_=0.0)
    unit = selection["lambda_unit"]
    tuned = search.build_problem(program, lambda_=lam * unit)
    plans = plans_of(base, tuned, args.plans, lam)
    rows: list[dict[str, Any]] = []
    graph = program.require_graph()
    groups = graph.groups()
    payload: dict[str, Any] = {"quick": args.quick, "budget": u3.nbytes, "lambda": lam, "lambda_unit": unit,
                               "steps": args.steps, "rows": rows, "probe": fitted.report["error_probe"]}
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

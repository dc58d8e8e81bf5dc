"""The public entry points; the only place where the passes are wired together."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from autoqra.budget import Budget
from autoqra.config import SearchSpace
from autoqra.errors import ConfigError
from autoqra.ir.capture import CaptureConfig, capture
from autoqra.ir.cost import CostModel
from autoqra.ir.program import Program
from autoqra.passes import AnnotateCostPass, AssignGroupsPass, BuildLayerGraphPass, PassManager
from autoqra.passes.calibrate import CalibratePass, Calibration
from autoqra.passes.search import Patterns, SearchPass
from autoqra.passes.sensitivity import EstimateSensitivityPass
from autoqra.passes.validate import ValidatePlanPass
from autoqra.plan import Plan
from autoqra.search.estimators import check_estimator_inputs, default_estimator
from autoqra.search.pareto import ParetoPoint, pareto_front

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("AUTOQRA_CACHE", Path.home() / ".cache" / "autoqra"))


@dataclass
class CompileResult:
    """``model`` is the user's model, changed in place; ``plan`` the decision; ``report`` the facts."""

    model: nn.Module
    plan: Plan
    report: dict[str, Any] = field(default_factory=dict)
    program: Program | None = None

    def table(self) -> str:
        from autoqra.report import plan_table

        return plan_table(self.plan)


def _front_half(
    model: nn.Module, *, calib: object | None, space: SearchSpace, cost_model: CostModel, backend: str,
    estimator: str | None, capture_config: CaptureConfig, example_inputs: object, gradients: bool,
    calib_batches: int | None, cache_dir: Path | None, progress: bool, rounding: str = "rtn",
) -> tuple[Program, PassManager, str]:
    program = capture(model, example_inputs, config=capture_config)
    calibrate = CalibratePass(calib, gradients=gradients, max_batches=calib_batches, progress=progress)
    if isinstance(calib, Calibration):
        gradients = calib.gradients
    name = estimator or default_estimator(calib is not None, gradients)
    check_estimator_inputs(name, calib is not None, calib is not None and gradients)
    manager = PassManager([
        BuildLayerGraphPass(),
        AssignGroupsPass(),
        AnnotateCostPass(cost_model, space),
        calibrate,
        EstimateSensitivityPass(name, backend=backend, group_size=cost_model.group_size,
                                cache_dir=None if cache_dir is None else cache_dir / "errors", progress=progress,
                                rounding=rounding),
    ])
    manager.run(program)
    return program, manager, name


ROUNDINGS = ("auto", "gptq", "rtn")


def resolve_rounding(rounding: str, calib: object | None, backend: str) -> str:
    """``auto`` → ``gptq`` (error-compensating) with calibration data on the packed backend, else ``rtn``."""
    if rounding not in ROUNDINGS:
        raise ConfigError(f"unknown rounding {rounding!r}; available: {', '.join(ROUNDINGS)}")
    if rounding == "auto":
        return "gptq" if calib is not None and backend == "packed" else "rtn"
    if rounding == "gptq" and (calib is None or backend != "packed"):
        raise ConfigError("rounding='gptq' needs calibration data and backend='packed'; use rounding='rtn'")
    return rounding


def calibrate(
    model: nn.Module,
    calib: object,
    *,
    gradients: bool = True,
    calib_batches: int | None = None,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    progress: bool = True,
) -> Calibration:
    """Collect calibration statistics once; pass the result as ``calib=`` to several `compile` calls."""
    program = capture(model, None, config=CaptureConfig(include=tuple(include), exclude=tuple(exclude)))
    PassManager([BuildLayerGraphPass(), CalibratePass(calib, gradients=gradients, max_batches=calib_batches,
                                                      progress=progress)]).run(program)
    return program.state["calibration"]


def compile(  # noqa: A001  (the product's verb)
    model: nn.Module,
    budget: int | str | Budget,
    *,
    calib: object | None = None,
    bits: tuple[int, ...] = (2, 3, 4, 8, 16),
    ranks: tuple[int, ...] = (0, 4, 8, 16, 32),
    group_size: int = 64,
    backend: str = "packed",
    estimator: str | None = None,
    solver: str = "exact",
    patterns: Patterns | None = None,
    seed: int = 0,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    example_inputs: object = None,
    alpha: float | None = None,
    loftq_iters: int = 2,
    gradients: bool = True,
    calib_batches: int | None = None,
    cache_dir: Path | str | None = "default",
    materialize: bool = True,
    progress: bool = True,
    rounding: str = "rtn",
) -> CompileResult:
    """Choose bits and LoRA rank for every layer under ``budget`` and rewrite ``model`` in place.

    Args:
        model: a Hugging Face causal LM or any ``nn.Module`` (pass ``example_inputs`` then).
        budget: bytes (int), ``"50MB"``, ``"48MiB"``, ``"3.25bits"`` or a `Budget`.
        calib: token batches (LongTensor [n, seq], list, DataLoader), a `Calibration` from
            `autoqra.calibrate`, or None (data-free).
        bits / ranks: the search space. group_size: quantization group (default 64).
        backend: quantization backend (``packed`` default). estimator: default
            ``fisher_weighted`` with calibration data, ``lora_residual`` without.
        solver: ``exact`` (default), ``greedy``, ``differentiable``.
        patterns: ``{regex: {"bits": 16}}`` pins (see `SearchPass`).
        cache_dir: where error tables are cached (``"default"``: ``$AUTOQRA_CACHE`` or
            ``~/.cache/autoqra``; None: no cache).
        materialize: False plans only (no module is changed).
        rounding: ``rtn`` (default: per-group MSE-fitted rounding, input-weighted by the
            diagonal of the calibration second moments), ``gptq`` (error-compensating rounding
            under each layer's full input second moments; estimator and adapter init in the exact
            output-error norm; several times slower: a Python loop over columns), or ``auto``
            (``gptq`` when calibration data is given on the packed backend, else ``rtn``).
    """
    start = time.perf_counter()
    budget = Budget.parse(budget)
    space = SearchSpace(bits=bits, ranks=ranks)
    cost_model = CostModel(group_size=group_size)
    cache = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
    rounding = resolve_rounding(rounding, calib, backend)
    program, front, est_name = _front_half(
        model, calib=calib, space=space, cost_model=cost_model, backend=backend, estimator=estimator,
        capture_config=CaptureConfig(include=tuple(include), exclude=tuple(exclude)), example_inputs=example_inputs,
        gradients=gradients, calib_batches=calib_batches, cache_dir=cache, progress=progress, rounding=rounding,
    )
    graph = program.require_graph()
    budget_bytes = budget.resolve(graph.total_numel())
    back = [
        SearchPass(budget, solver=solver, seed=seed, patterns=patterns),
        ValidatePlanPass(backend=backend, group_size=group_size, budget_bytes=budget_bytes),
    ]
    if materialize:
        from autoqra.passes.materialize import MaterializePass

        back.append(MaterializePass(backend=backend, group_size=group_size, alpha=alpha, loftq_iters=loftq_iters,
                                    progress=progress, rounding=rounding))
    PassManager(back, initial=frozenset({"model", "fx", "graph", "groups", "cost", "stats", "error"})).run(program)
    layers = {n: (graph.annotation(n).bits, graph.annotation(n).rank) for n in graph.order()}
    plan = Plan(
        layers=layers,
        total_bytes=sum(graph.annotation(n).cost[c] for n, c in layers.items()),
        budget_bytes=budget_bytes,
        predicted_error=float(sum(graph.annotation(n).error[c] for n, c in layers.items())),
        layer_bytes={n: graph.annotation(n).cost[c] for n, c in layers.items()},
        layer_error={n: graph.annotation(n).error[c] for n, c in layers.items()},
        settings={
            "group_size": group_size, "backend": backend, "estimator": est_name, "solver": solver, "seed": seed,
            "bits": list(space.bits), "ranks": list(space.ranks), "alpha": alpha, "budget": budget.to_dict(),
            "rounding": rounding,
        },
    )
    report = {
        "capture_route": program.route,
        "capture_attempts": program.attempts,
        "layers": len(graph),
        "groups": len(graph.groups()),
        "calibration_tokens": program.state.get("calib_tokens", 0),
        "timings": program.state.get("timings", []),
        "seconds": round(time.perf_counter() - start, 3),
        "materialized": materialize,
        "total_bytes": plan.total_bytes,
        "budget_bytes": plan.budget_bytes,
        "budget_used": plan.total_bytes / plan.budget_bytes if plan.budget_bytes else None,
        "predicted_error": plan.predicted_error,
        "per_layer": [
            {"layer": n, "bits": b, "rank": r, "bytes": plan.layer_bytes[n], "predicted_error": plan.layer_error[n]}
            for n, (b, r) in plan.layers.items()
        ],
    }
    if materialize:
        from autoqra.footprint import layers_held_bytes

        # measured through the tensor storages the compiled layers hold, not through the cost model
        report["held_bytes"] = layers_held_bytes(model)
        if report["held_bytes"] != plan.total_bytes:
            logger.warning("the compiled layers hold %d bytes, the plan counted %d", report["held_bytes"],
                           plan.total_bytes)
        model.autoqra_plan = plan  # carried into autoqra.save
    return CompileResult(model=model, plan=plan, report=report, program=program)


def pareto(
    model: nn.Module,
    budgets: list[int | str | Budget] | None = None,
    *,
    calib: object | None = None,
    bits: tuple[int, ...] = (2, 3, 4, 8, 16),
    ranks: tuple[int, ...] = (0, 4, 8, 16, 32),
    group_size: int = 64,
    backend: str = "packed",
    estimator: str | None = None,
    solver: str = "exact",
    n_points: int = 12,
    seed: int = 0,
    gradients: bool = True,
    calib_batches: int | None = None,
    cache_dir: Path | str | None = "default",
    progress: bool = True,
    rounding: str = "rtn",
) -> list[ParetoPoint]:
    """The front of bytes vs predicted error (one estimation, many solves). No module is changed."""
    space = SearchSpace(bits=bits, ranks=ranks)
    cost_model = CostModel(group_size=group_size)
    cache = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
    program, _, _ = _front_half(
        model, calib=calib, space=space, cost_model=cost_model, backend=backend, estimator=estimator,
        capture_config=CaptureConfig(), example_inputs=None, gradients=gradients, calib_batches=calib_batches,
        cache_dir=cache, progress=progress, rounding=resolve_rounding(rounding, calib, backend),
    )
    graph = program.require_graph()
    numel = graph.total_numel()
    problem = SearchPass(Budget(nbytes=1), solver=solver).build_problem(program)
    resolved = None if budgets is None else [Budget.parse(b).resolve(numel) for b in budgets]
    return pareto_front(problem, resolved, n_points=n_points, solver=solver, seed=seed)

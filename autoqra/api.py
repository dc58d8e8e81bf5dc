"""The public entry points; the only place where the passes are wired together."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoqra.budget import Budget
from autoqra.config import SearchSpace
from autoqra.data import cache_root
from autoqra.errors import ConfigError, require_module
from autoqra.ir.capture import CaptureConfig, capture
from autoqra.ir.cost import CostModel
from autoqra.ir.program import Program
from autoqra.modules.quant_lora_linear import QuantLoRALinear
from autoqra.park import default_park_dir
from autoqra.passes import AnnotateCostPass, AssignGroupsPass, BuildLayerGraphPass, PassManager
from autoqra.passes.calibrate import CalibratePass, Calibration, as_batches
from autoqra.passes.probe import ProbeBlocksPass
from autoqra.passes.search import CheckBudgetPass, CheckWeightsPass, Patterns, SearchPass
from autoqra.passes.select import OBJECTIVES, SelectConfig, SelectPlanPass
from autoqra.passes.sensitivity import EstimateSensitivityPass
from autoqra.passes.validate import ValidatePlanPass
from autoqra.plan import Plan
from autoqra.quant.memo import active_memo, quant_memo
from autoqra.search.estimators import check_estimator_inputs, default_estimator
from autoqra.search.pareto import ParetoPoint, pareto_front
from autoqra.search.plasticity import EstimatePlasticityPass
from autoqra.search.registry import get_solver

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$AUTOQRA_CACHE`` (when set and not empty), else ``~/.cache/autoqra`` (`autoqra.data.cache_root`)."""
    return cache_root()


@dataclass
class CompileResult:
    """``model`` is the user's model, changed in place; ``plan`` the decision; ``report`` the facts.

    ``scored_adapters``: the adapters of every candidate plan the selection fine-tuned, after its
    short fine-tune (label as in ``report["selection"]`` → layer → ``lora_A`` / ``lora_B``; empty when
    no short fine-tune ran, e.g. scores from the cache or ``objective="deploy"``). The model itself
    carries the winner's adapters *as initialized*; ``autoqra.train.load_adapter_state(model,
    result.scored_adapters[result.report["selection"]["winner"]])`` warm-starts it from the selection's
    short fine-tune (`autoqra.passes.select.short_finetune` reproduces it)."""

    model: nn.Module
    plan: Plan
    report: dict[str, Any] = field(default_factory=dict)
    program: Program | None = None
    scored_adapters: dict[str, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)

    def table(self) -> str:
        from autoqra.report import plan_table

        return plan_table(self.plan)


def _front_half(
    model: nn.Module, *, calib: object | None, space: SearchSpace, cost_model: CostModel, backend: str,
    estimator: str | None, capture_config: CaptureConfig, example_inputs: object, gradients: bool,
    calib_batches: int | None, cache_dir: Path | None, progress: bool, rounding: str = "rtn",
    weight_gradients: bool = False, budget: Budget | None = None, patterns: Patterns | None = None,
    back: tuple = (),
) -> tuple[Program, PassManager, str]:
    """Capture, then ONE pipeline: the analysis passes followed by ``back`` (search ... materialize)."""
    program = capture(model, example_inputs, config=capture_config)
    # the inputs' full second moments ([in, in] per layer, ~the fp32 weights' size in all) are read only by
    # gptq rounding: not collected otherwise
    calibrate = CalibratePass(calib, gradients=gradients, max_batches=calib_batches, progress=progress,
                              weight_gradients=weight_gradients,
                              covariance_max_dim=2048 if rounding == "gptq" else 0)
    if isinstance(calib, Calibration):
        gradients = calib.gradients
    name = estimator or default_estimator(calib is not None, gradients)
    check_estimator_inputs(name, calib is not None, calib is not None and gradients)
    manager = PassManager([
        BuildLayerGraphPass(),
        AssignGroupsPass(),
        AnnotateCostPass(cost_model, space),
        CheckWeightsPass(),
        *([CheckBudgetPass(budget, patterns=patterns)] if budget is not None else []),
        calibrate,
        EstimateSensitivityPass(name, backend=backend, group_size=cost_model.group_size,
                                cache_dir=None if cache_dir is None else cache_dir / "errors", progress=progress,
                                rounding=rounding),
        EstimatePlasticityPass(progress=progress, release_gradients=not isinstance(calib, Calibration)),
        *back,
    ])
    manager.run(program)
    return program, manager, name


ROUNDINGS = ("auto", "gptq", "rtn")


def check_model(model: object, function: str = "compile") -> None:
    """A plain, not yet compiled ``nn.Module`` (else a `ConfigError` that says what to pass)."""
    require_module(model, function)
    if any(isinstance(m, QuantLoRALinear) for m in model.modules()):
        raise ConfigError(
            "the model is already compiled (it has QuantLoRALinear layers): compile the original model again "
            "(reload it), or fine-tune / save this one"
        )


def resolve_objective(objective: str | None, calib: object | None) -> str:
    """``None`` → ``finetune`` with calibration data, ``deploy`` without (``finetune`` needs
    gradients of the loss, hence data)."""
    if objective is None:
        return "finetune" if calib is not None else "deploy"
    if not isinstance(objective, str) or objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)} (or None), got {objective!r}")
    if objective == "finetune" and calib is None:
        raise ConfigError("objective='finetune' needs calibration data (it values what adapters learn from the "
                          "loss gradient): pass calib=... or use objective='deploy'")
    return objective


def _select_config(select: SelectConfig | bool | None, objective: str, lambda_: float | None, seed: int,
                   calib: object | None) -> SelectConfig | None:
    if select is False:
        if lambda_ is not None:
            raise ConfigError("lambda_ needs the selection pipeline; drop select=False")
        return None
    if select is not None and select is not True and not isinstance(select, SelectConfig):
        raise ConfigError(f"select must be a SelectConfig, True, False or None, got {type(select).__name__}")
    if calib is None:
        if isinstance(select, SelectConfig) or select is True:
            raise ConfigError("measuring candidate plans needs calibration data: pass calib=... or select=False")
        return None
    if isinstance(select, SelectConfig):
        if select.objective != objective or (lambda_ is not None and select.lambda_ != lambda_):
            raise ConfigError("select.objective / select.lambda_ disagree with objective= / lambda_=; set them once")
        return select
    return SelectConfig(objective=objective, lambda_=lambda_, seed=seed)


def resolve_rounding(rounding: str, calib: object | None, backend: str) -> str:
    """``auto`` → ``gptq`` (error-compensating) with calibration data on the packed backend, else ``rtn``."""
    if rounding not in ROUNDINGS:
        raise ConfigError(f"unknown rounding {rounding!r}; available: {', '.join(ROUNDINGS)}")
    if rounding == "auto":
        return "gptq" if calib is not None and backend == "packed" else "rtn"
    if rounding == "gptq" and (calib is None or backend != "packed"):
        raise ConfigError("rounding='gptq' needs calibration data and backend='packed'; use rounding='rtn'")
    return rounding


#: the share of the calibration batches held back to score candidate plans by measured loss
HOLDOUT_FRACTION = 0.25


def split_holdout(calib: object, fraction: float, max_batches: int | None = None,
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(statistics / short fine-tune batches, held-back batches): the last ``fraction`` of the
    calibration batches (at least one) is held back; a single batch is used for both (warned)."""
    if not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ConfigError(f"holdout must be a fraction in [0, 1), got {fraction!r}")
    batches = as_batches(calib)
    if max_batches is not None:
        batches = batches[:max_batches]
    if fraction == 0:
        return batches, []
    if len(batches) < 2:
        logger.warning("one calibration batch: candidate plans are scored on the batch the statistics came from; "
                       "pass more calibration windows for a held-back score")
        return batches, list(batches)
    n_held = min(len(batches) - 1, max(1, round(len(batches) * fraction)))
    return batches[:-n_held], batches[-n_held:]


def calibrate(
    model: nn.Module,
    calib: object,
    *,
    gradients: bool = True,
    calib_batches: int | None = None,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    progress: bool = True,
    weight_gradients: bool = True,
    holdout: float = HOLDOUT_FRACTION,
    covariance: bool = False,
) -> Calibration:
    """Collect calibration statistics once; pass the result as ``calib=`` to several `compile` calls.
    A ``holdout`` fraction of the batches is kept out of the statistics for scoring candidate plans;
    ``weight_gradients`` collects what ``objective="finetune"`` needs; ``covariance`` the inputs'
    second-moment matrices that ``rounding="gptq"`` needs (off by default: about the size of the fp32
    weights)."""
    require_module(model, "calibrate")
    train, held = split_holdout(calib, holdout, calib_batches)
    program = capture(model, None, config=CaptureConfig(include=tuple(include), exclude=tuple(exclude)))
    PassManager([BuildLayerGraphPass(), CalibratePass(train, gradients=gradients, progress=progress,
                                                      weight_gradients=weight_gradients,
                                                      covariance_max_dim=2048 if covariance else 0)]).run(program)
    cal = program.state["calibration"]
    cal.holdout = held
    return cal



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
    objective: str | None = None,
    lambda_: float | None = None,
    select: SelectConfig | bool | None = None,
    adapter_dtype: torch.dtype = torch.float32,
    tied_embedding: str = "share",
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
        objective: what the plan is for. ``finetune`` (the default with calibration data): quality
            *after* fine-tuning — every layer is also valued for what its adapter can learn
            (plasticity, from the loss gradient), and candidates are scored after a short
            fine-tune. ``deploy`` (the default data-free): quality as compiled (step-0 error).
        lambda_: a fixed plasticity weight (normalized units, see `autoqra.passes.select`)
            instead of fitting it among several by measured loss.
        select: the measured selection (`SelectConfig`; None: defaults for the objective;
            False: trust the proxy, no candidate is measured). With calibration data, candidate
            plans — always including the uniform plans that fit — are scored by their loss on a
            held-back quarter of the calibration batches, and the best is returned: the plan is
            never worse there than the best uniform plan (no regret).
        adapter_dtype: the dtype adapters are held (and trained, and counted) in.
        tied_embedding: an input embedding tied to a compiled layer (a tied ``lm_head`` selected with
            ``include=("lm_head",)``): ``share`` (default) reads its rows from that layer's codes, so the
            tied matrix is held once, in the plan's format (`autoqra.modules.tied_embedding`); ``keep``
            leaves its float matrix beside the codes (held outside the budget).
    """
    from autoqra.passes.materialize import MaterializePass

    start = time.perf_counter()
    # -- every argument checked before any work (calibration takes minutes on a real model) --
    check_model(model)
    budget = Budget.parse(budget)
    space = SearchSpace(bits=bits, ranks=ranks)
    if not isinstance(adapter_dtype, torch.dtype) or not adapter_dtype.is_floating_point:
        raise ConfigError(f"adapter_dtype must be a floating-point torch.dtype, got {adapter_dtype!r}")
    cost_model = CostModel(group_size=group_size, adapter_bytes=adapter_dtype.itemsize)
    cache = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
    rounding = resolve_rounding(rounding, calib, backend)
    get_solver(solver)
    objective = resolve_objective(objective, calib)
    select_config = _select_config(select, objective, lambda_, seed, calib)
    reuse = calib if isinstance(calib, Calibration) else None
    if reuse is not None and rounding == "gptq" and not reuse.covariance:
        raise ConfigError("rounding='gptq' needs the inputs' second moments: collect the Calibration with "
                          "autoqra.calibrate(model, calib, covariance=True), or use rounding='rtn'")
    if calib is None or reuse is not None:
        train, held = (reuse.batches, reuse.holdout) if reuse is not None else ([], [])
    else:
        train, held = split_holdout(calib, HOLDOUT_FRACTION if select_config else 0.0, calib_batches)
    if select_config is not None and not held:
        raise ConfigError("measured selection needs held-back calibration batches: this Calibration has none; "
                          "collect it with autoqra.calibrate(model, calib, holdout=0.25) or pass select=False")
    stats_calib = reuse if reuse is not None else (train or None)
    materializer = MaterializePass(backend=backend, group_size=group_size, alpha=alpha, loftq_iters=loftq_iters,
                                   progress=progress, rounding=rounding, adapter_dtype=adapter_dtype,
                                   tied_embedding=tied_embedding)
    search = SearchPass(budget, solver=solver, seed=seed, patterns=patterns)
    back: list = []
    if select_config is not None:
        if select_config.probe is not None and select_config.probe.bits:
            back.append(ProbeBlocksPass(select_config.probe, holdout=list(held), progress=progress,
                                        cache_dir=None if cache is None else cache / "selection"))
        back.append(SelectPlanPass(search, materializer, select_config, train=list(train), holdout=list(held),
                                   progress=progress, cache_dir=None if cache is None else cache / "selection",
                                   free_memo=active_memo() is None, park_dir=default_park_dir(cache)))
    else:
        back.append(search)
    back.append(ValidatePlanPass(backend=backend, group_size=group_size, budget=budget))
    if materialize:
        back.append(materializer)
    with quant_memo() as memo:  # the selection's builds reuse the sensitivity pass's roundings
        before = memo.stats()
        program, front, est_name = _front_half(
            model, calib=stats_calib, space=space, cost_model=cost_model, backend=backend, estimator=estimator,
            capture_config=CaptureConfig(include=tuple(include), exclude=tuple(exclude)), example_inputs=example_inputs,
            gradients=gradients, calib_batches=None, cache_dir=cache, progress=progress, rounding=rounding,
            weight_gradients=objective == "finetune", budget=budget, patterns=patterns, back=tuple(back),
        )
        after = memo.stats()
    graph = program.require_graph()
    budget_bytes = budget.resolve(graph.total_numel())
    program.state.pop("built_layers", None)
    scored_adapters = program.state.pop("scored_adapters", {})
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
            "rounding": rounding, "objective": objective,
            "adapter_dtype": str(adapter_dtype).removeprefix("torch."),
            "select": None if select_config is None else select_config.to_dict(),
            "include": list(include), "exclude": list(exclude), "loftq_iters": loftq_iters,
            "tied_embedding": tied_embedding,
        },
    )
    report = {
        "capture_route": program.route,
        "capture_attempts": program.attempts,
        "layers": len(graph),
        "groups": len(graph.groups()),
        "calibration_tokens": program.state.get("calib_tokens", 0),
        "holdout_tokens": int(sum(b.numel() for b in held)),
        "timings": program.state.get("timings", []),
        "seconds": round(time.perf_counter() - start, 3),
        "materialized": materialize,
        # roundings of an unchanged weight answered from memory (see autoqra.quant.memo)
        "quant_memo": {"hits": after["hits"] - before["hits"], "misses": after["misses"] - before["misses"]},
        "total_bytes": plan.total_bytes,
        "budget_bytes": plan.budget_bytes,
        "budget_used": plan.total_bytes / plan.budget_bytes if plan.budget_bytes else None,
        "predicted_error": plan.predicted_error,
        "objective": objective,
        "selection": program.state.get("selection"),
        "error_probe": program.state.get("error_probe"),
        "per_layer": [
            {"layer": n, "bits": b, "rank": r, "bytes": plan.layer_bytes[n], "predicted_error": plan.layer_error[n]}
            for n, (b, r) in plan.layers.items()
        ],
    }
    if materialize:
        from autoqra.footprint import held_bytes, layers_held_bytes
        from autoqra.passes.materialize import shared_embeddings

        # measured through the tensor storages the compiled layers hold, not through the cost model
        report["held_bytes"] = layers_held_bytes(model)
        report["shared_embeddings"] = shared_embeddings(model)
        # the whole model: the plan's layers, what the rewrite left as it was, the adapters as initialized
        report["model_held_bytes"] = held_bytes(model.modules())
        if report["held_bytes"] != plan.total_bytes:
            logger.warning("the compiled layers hold %d bytes, the plan counted %d", report["held_bytes"],
                           plan.total_bytes)
        model.autoqra_plan = plan  # carried into autoqra.save
    return CompileResult(model=model, plan=plan, report=report, program=program, scored_adapters=scored_adapters)


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
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
) -> list[ParetoPoint]:
    """The front of bytes vs predicted error (one estimation, many solves). No module is changed.
    ``include`` / ``exclude``: regexes of layers to add to / leave out of the search, as in `compile`."""
    require_module(model, "pareto")
    space = SearchSpace(bits=bits, ranks=ranks)
    cost_model = CostModel(group_size=group_size)
    cache = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
    program, _, _ = _front_half(
        model, calib=calib, space=space, cost_model=cost_model, backend=backend, estimator=estimator,
        capture_config=CaptureConfig(include=tuple(include), exclude=tuple(exclude)), example_inputs=None,
        gradients=gradients, calib_batches=calib_batches,
        cache_dir=cache, progress=progress, rounding=resolve_rounding(rounding, calib, backend),
    )
    graph = program.require_graph()
    numel = graph.total_numel()
    problem = SearchPass(Budget(nbytes=1), solver=solver).build_problem(program)
    resolved = None if budgets is None else [Budget.parse(b).resolve(numel) for b in budgets]
    return pareto_front(problem, resolved, n_points=n_points, solver=solver, seed=seed)


def apply_plan(
    model: nn.Module,
    plan: Plan | str | Path,
    *,
    calib: object | None = None,
    example_inputs: object = None,
    progress: bool = True,
) -> CompileResult:
    """Materialize a saved `Plan` (``plan.json`` from ``autoqra compile --plan-only`` or
    ``plan.to_json()``) on ``model``, in place: no estimation and no search.

    The layers are built with the plan's settings (group size, backend, rounding, alpha, LoftQ
    iterations, adapter dtype, include/exclude). With ``calib`` — the calibration data the plan
    was compiled with — the adapters' initialization is weighted as in `compile` (the same
    batches are held back), so the result equals what ``compile`` would have built; without it the
    initialization is unweighted. A plan that does not fit the model raises `PlanMismatchError`
    listing every difference, before anything changes.
    """
    from autoqra.passes.apply import ApplyPlanPass
    from autoqra.passes.materialize import MaterializePass

    start = time.perf_counter()
    check_model(model, "apply_plan")
    if isinstance(plan, (str, Path)):
        plan = Plan.read(plan)
    if not isinstance(plan, Plan):
        raise ConfigError(f"plan must be a Plan or the path of a plan.json, got {type(plan).__name__}")
    settings = plan.settings
    rounding = settings.get("rounding", "rtn")
    if rounding == "gptq" and calib is None:
        raise ConfigError("this plan was compiled with rounding='gptq', which needs the calibration data: pass calib=")
    adapter_dtype = getattr(torch, str(settings.get("adapter_dtype", "float32")))
    group_size = int(settings.get("group_size", 64))
    backend = settings.get("backend", "packed")
    # the menu the plan was chosen from (a choice outside it is reported by ApplyPlanPass)
    space = SearchSpace(bits=tuple(settings.get("bits") or sorted({b for b, _ in plan.layers.values()})),
                        ranks=tuple(settings.get("ranks") or sorted({r for _, r in plan.layers.values()})))
    cost_model = CostModel(group_size=group_size, adapter_bytes=adapter_dtype.itemsize)
    front: list = [BuildLayerGraphPass(), AssignGroupsPass(), AnnotateCostPass(cost_model, space), CheckWeightsPass()]
    if calib is not None:
        reuse = calib if isinstance(calib, Calibration) else None
        if reuse is not None:
            train = reuse
        else:
            train, _ = split_holdout(calib, HOLDOUT_FRACTION if settings.get("select") else 0.0)
        front.append(CalibratePass(train, gradients=True, progress=progress,
                                   covariance_max_dim=2048 if rounding == "gptq" else 0))
    materializer = MaterializePass(backend=backend, group_size=group_size, alpha=settings.get("alpha"),
                                   loftq_iters=int(settings.get("loftq_iters", 2)), progress=progress,
                                   rounding=rounding, adapter_dtype=adapter_dtype,
                                   # plans saved before the setting existed were materialized with "keep"
                                   tied_embedding=str(settings.get("tied_embedding", "keep")))
    program = capture(model, example_inputs, config=CaptureConfig(include=tuple(settings.get("include", ())),
                                                                   exclude=tuple(settings.get("exclude", ()))))
    PassManager([*front, ApplyPlanPass(plan), ValidatePlanPass(backend=backend, group_size=group_size,
                                                               budget_bytes=plan.budget_bytes), materializer]
                ).run(program)
    from autoqra.footprint import layers_held_bytes
    from autoqra.passes.materialize import shared_embeddings

    report = {"applied": True, "capture_route": program.route, "layers": len(plan.layers),
              "timings": program.state.get("timings", []), "seconds": round(time.perf_counter() - start, 3),
              "total_bytes": plan.total_bytes, "budget_bytes": plan.budget_bytes,
              "held_bytes": layers_held_bytes(model), "weighted_init": calib is not None,
              "shared_embeddings": shared_embeddings(model)}
    model.autoqra_plan = plan
    return CompileResult(model=model, plan=plan, report=report, program=program)

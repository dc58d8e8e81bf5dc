"""SearchPass: SearchProblem from the annotated graph → solver → ``bits`` / ``rank`` per layer.

Pinning patterns (peft-style): ``{regex: {"bits": 16}}`` / ``{regex: {"rank": 0}}`` /
``{regex: {"bits": (3, 4)}}``. A layer matching several patterns must satisfy all of them.
A pattern that matches no layer is warned about, by name, never silently ignored.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import numpy as np
import torch

from autoqra.budget import Budget
from autoqra.errors import BudgetInfeasibleError, ConfigError
from autoqra.ir.program import Program
from autoqra.passes.base import PassBase, PassResult
from autoqra.search.problem import SearchProblem
from autoqra.search.registry import get_solver

logger = logging.getLogger(__name__)

Patterns = Mapping[str, Mapping[str, int | tuple[int, ...] | list[int]]]


def _allowed(values: int | tuple[int, ...] | list[int]) -> set[int]:
    return {int(values)} if isinstance(values, (int, np.integer)) else {int(v) for v in values}


def apply_patterns(names: list[str], patterns: Patterns | None) -> dict[str, dict[str, set[int]]]:
    """{layer: {"bits": allowed, "rank": allowed}} for the layers any pattern matches."""
    constraints: dict[str, dict[str, set[int]]] = {}
    unmatched = []
    for pattern, pin in (patterns or {}).items():
        bad = set(pin) - {"bits", "rank"}
        if bad:
            raise ConfigError(f"pattern {pattern!r} pins unknown keys {sorted(bad)}; use 'bits' and/or 'rank'")
        hits = [n for n in names if re.search(pattern, n)]
        if not hits:
            unmatched.append(pattern)
        for n in hits:
            c = constraints.setdefault(n, {})
            for key, values in pin.items():
                c[key] = c[key] & _allowed(values) if key in c else _allowed(values)
    if unmatched:
        logger.warning("patterns matched no layer and were not applied: %s", unmatched)
    return constraints


class SearchPass(PassBase):
    """Writes ``bits`` and ``rank`` of every layer (members of a group share one choice)."""

    reads = ("graph", "cost", "error")
    optional_reads = ("plasticity",)
    writes = ("bits", "rank")

    def __init__(self, budget: Budget, *, solver: str = "exact", seed: int = 0, patterns: Patterns | None = None,
                 lambda_: float = 0.0) -> None:
        self.budget = budget
        self.solver_name = solver
        self.solve = get_solver(solver)
        self.seed = seed
        self.patterns = patterns
        self.lambda_ = float(lambda_)

    def build_problem(self, program: Program, lambda_: float | None = None) -> SearchProblem:
        """The knapsack: per group, bytes and ``error(b, r) − λ·plasticity(r)`` (natural units of
        :mod:`autoqra.search.plasticity`), shifted so each group's best choice scores 0."""
        lam = self.lambda_ if lambda_ is None else float(lambda_)
        plasticity = program.state.get("plasticity", {}) if lam else {}
        graph = program.require_graph()
        constraints = apply_patterns(graph.order(), self.patterns)
        budget_bytes = self.budget.resolve(graph.total_numel())
        groups, choices, costs, errors = [], [], [], []
        for group, members in graph.groups().items():
            keys = None
            for m in members:
                ann = graph.annotation(m)
                allowed = {k for k in ann.cost if k in ann.error}
                c = constraints.get(m, {})
                allowed = {k for k in allowed if k[0] in c.get("bits", {k[0]}) and k[1] in c.get("rank", {k[1]})}
                keys = allowed if keys is None else keys & allowed
            keys = sorted(keys or ())
            if not keys:
                raise _no_choice_error(graph, members)
            groups.append(group)
            choices.append(keys)
            costs.append([sum(graph.annotation(m).cost[k] for m in members) for k in keys])
            objective = np.asarray([
                sum(graph.annotation(m).error[k] - lam * plasticity.get(m, {}).get(k[1], 0.0) for m in members)
                for k in keys
            ])
            errors.append(objective - objective.min() if lam else objective)
        return SearchProblem.build(groups, choices, costs, errors, budget_bytes)

    def call(self, program: Program) -> PassResult:
        graph = program.require_graph()
        problem = self.build_problem(program)
        dense_choice = [
            min((k for c, k in zip(ch, cost, strict=True) if c[0] == 16), default=None)
            for ch, cost in zip(problem.choices, problem.cost, strict=True)
        ]
        dense = None if None in dense_choice else sum(int(k) for k in dense_choice)
        if dense is not None and problem.budget >= dense:
            logger.warning(
                "the budget (%s bytes) is at or above the largest plan (%s bytes): nothing needs compressing",
                f"{problem.budget:,}", f"{dense:,}",
            )
        result = self.solve(problem, self.seed)
        groups = graph.groups()
        for group, choice in zip(problem.groups, result.choices, strict=True):
            for m in groups[group]:
                graph.set_choice(m, *choice)
        program.state["problem"] = problem
        program.state["assignment"] = result
        return PassResult(info={"solver": self.solver_name, "groups": problem.n_groups,
                                "bytes": result.cost, "budget": problem.budget, "error": result.error})


class CheckBudgetPass(PassBase):
    """Fails fast: the smallest plan the cost tables and pins allow is known right after costing,
    so an infeasible budget raises `BudgetInfeasibleError` (with ``min_bytes``) before calibration."""

    reads = ("graph", "cost")
    writes = ()

    def __init__(self, budget: Budget, *, patterns: Patterns | None = None) -> None:
        self.budget = budget
        self.patterns = patterns

    def call(self, program: Program) -> PassResult:
        graph = program.require_graph()
        constraints = apply_patterns(graph.order(), self.patterns)
        budget_bytes = self.budget.resolve(graph.total_numel())
        need = 0
        for members in graph.groups().values():
            keys = None
            for m in members:
                c = constraints.get(m, {})
                allowed = {k for k in graph.annotation(m).cost
                           if k[0] in c.get("bits", {k[0]}) and k[1] in c.get("rank", {k[1]})}
                keys = allowed if keys is None else keys & allowed
            if not keys:
                raise _no_choice_error(graph, members)
            need += min(sum(graph.annotation(m).cost[k] for m in members) for k in keys)
        if need > budget_bytes:
            raise BudgetInfeasibleError(
                f"budget of {budget_bytes:,} bytes is infeasible: the smallest plan needs {need:,} bytes "
                f"({need / 2**20:.2f} MiB); raise the budget to at least that, or allow fewer bits / rank 0",
                min_bytes=need,
            )
        return PassResult(changed=False, info={"min_bytes": need, "budget": budget_bytes})


class CheckWeightsPass(PassBase):
    """Fails fast on weights that cannot be quantized — on the meta device, or with NaN / Inf values —
    naming the layer, before calibration and estimation spend minutes (and before any module changes)."""

    reads = ("graph",)
    writes = ()

    def call(self, program: Program) -> PassResult:
        from autoqra.errors import QuantizationError
        from autoqra.passes.sensitivity import weight_matrix

        graph = program.require_graph()
        modules = dict(program.model.named_modules(remove_duplicate=False))
        bad: list[str] = []
        for name in graph.order():
            w = weight_matrix(modules[name], graph.layer(name))
            if w.device.type == "meta":
                raise ConfigError(
                    f"layer {name!r} has its weight on the meta device: load the model's weights before compiling "
                    "(autoqra.compile quantizes real values)"
                )
            if w.numel() and not bool(torch.isfinite(w).all()):
                n_nan, n_inf = int(torch.isnan(w).sum()), int(torch.isinf(w).sum())
                bad.append(f"{name} ({n_nan} NaN, {n_inf} Inf)")
        if bad:
            raise QuantizationError(
                f"non-finite weights in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}: fix the checkpoint, or "
                "leave the layers out with exclude=(...)"
            )
        return PassResult(changed=False)


def _no_choice_error(graph, members: list[str]) -> ConfigError:  # type: ignore[no-untyped-def]
    """What to change when a group has no (bits, rank) choice: a layer too narrow for every rank of
    the menu (its cost table is empty), or pinning patterns that exclude the rest."""
    for m in members:
        if not graph.annotation(m).cost:
            layer = graph.layer(m)
            width = min(layer.in_features, layer.out_features)
            return ConfigError(
                f"layer {m!r} ({layer.in_features}→{layer.out_features}) has no choice: every rank of the menu "
                f"exceeds min(in, out) = {width}; add rank 0 (or one ≤ {width}) to ranks, or leave the layer "
                f"out with exclude=[{re.escape('.' + m.rpartition('.')[2]) + '$'!r}]"
            )
    return ConfigError(
        f"no (bits, rank) choice is left for {members}: the pinning patterns exclude every choice "
        "in the search space; loosen them or add the pinned values to bits/ranks"
    )

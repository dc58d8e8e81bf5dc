"""Pareto front of bytes vs predicted error: one estimation, many solves."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autoqra.search.problem import SearchProblem
from autoqra.search.registry import get_solver


@dataclass(frozen=True)
class ParetoPoint:
    budget: int
    cost: int
    error: float
    choices: tuple[tuple[int, int], ...]


def pareto_front(
    problem: SearchProblem, budgets: list[int] | None = None, *, n_points: int = 12, solver: str = "exact", seed: int = 0
) -> list[ParetoPoint]:
    """Solve ``problem`` at each budget (default: ``n_points`` evenly spaced from the smallest
    feasible to the largest useful budget); returns the non-dominated points by increasing bytes."""
    if budgets is None:
        lo, hi = problem.min_cost(), problem.max_useful_cost()
        budgets = [int(b) for b in np.linspace(lo, max(lo, hi), n_points)]
    solve = get_solver(solver)
    points = []
    for budget in sorted(set(budgets)):
        a = solve(problem.with_budget(budget), seed)
        points.append(ParetoPoint(budget, a.cost, a.error, a.choices))
    front: list[ParetoPoint] = []
    for p in sorted(points, key=lambda p: (p.cost, p.error)):
        if not front or p.error < front[-1].error:
            front.append(p)
    return front

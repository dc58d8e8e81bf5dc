"""``exact``: the multiple-choice knapsack solved to optimality with ``scipy.optimize.milp`` (HiGHS).

Optimal for the additive proxy. Dominated choices (more bytes and more error than another choice
of the same group) are removed first; they can never be in an optimal solution.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from autoqra.errors import AutoQRAError
from autoqra.search.problem import Assignment, SearchProblem
from autoqra.search.registry import register_solver


@register_solver("exact")
def solve_exact(problem: SearchProblem, seed: int = 0) -> Assignment:
    keep = [problem.pareto_choices(g) for g in range(problem.n_groups)]
    sizes = np.array([len(k) for k in keep])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n = int(offsets[-1])
    cost = np.concatenate([problem.cost[g][k] for g, k in enumerate(keep)]).astype(np.float64)
    error = np.concatenate([problem.error[g][k] for g, k in enumerate(keep)])
    scale = float(np.abs(error).max()) or 1.0
    rows = np.repeat(np.arange(problem.n_groups), sizes)
    one_hot = csr_array((np.ones(n), (rows, np.arange(n))), shape=(problem.n_groups, n))
    # subtract each group's cheapest cost so the knapsack row has small, well-scaled numbers
    base = np.array([problem.cost[g][k[0]] for g, k in enumerate(keep)], dtype=np.float64)
    extra = cost - np.repeat(base, sizes)
    room = float(problem.budget - base.sum())
    constraints = [
        LinearConstraint(one_hot, 1, 1),
        LinearConstraint(extra.reshape(1, -1), -np.inf, room),
    ]
    result = milp(
        error / scale,
        constraints=constraints,
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 1e-9, "presolve": True},
    )
    if result.x is None:
        raise AutoQRAError(f"the exact solver found no solution ({result.message}); try solver='greedy'")
    x = np.round(result.x).astype(np.int64)
    index = []
    for g in range(problem.n_groups):
        local = int(np.argmax(x[offsets[g] : offsets[g + 1]]))
        index.append(int(keep[g][local]))
    assignment = problem.assignment(index, "exact")
    if assignment.cost > problem.budget:  # rounding of a tolerance-feasible point: repair by greedy
        from autoqra.search.greedy import repair

        assignment = problem.assignment(repair(problem, index), "exact")
    return assignment

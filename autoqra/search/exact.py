"""``exact``: the multiple-choice knapsack solved to optimality with ``scipy.optimize.milp`` (HiGHS).

Optimal for the additive proxy. Dominated choices (more bytes and more error than another choice
of the same group) are removed first; they can never be in an optimal solution.

Two safeguards, both logged: HiGHS runs under ``TIME_LIMIT`` seconds (large synthetic problems
with errors spanning many orders of magnitude occasionally branch for seconds), and the `greedy`
solution (convex-hull fill, ~0.1 s for 2,000 groups) is computed too; the better of the two is
returned. HiGHS accepts a point within its feasibility tolerance, which a byte budget of ~1e8 can
turn into a plan a few bytes over; the repair that follows can then land a hair above greedy's
error, and this comparison makes ``exact`` never worse than ``greedy``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from autoqra.errors import AutoQRAError
from autoqra.search.problem import Assignment, SearchProblem
from autoqra.search.registry import register_solver

logger = logging.getLogger(__name__)

#: seconds HiGHS may search before the best point found so far (or greedy's) is used
TIME_LIMIT = 20.0


@contextlib.contextmanager
def _c_stdout_to_log() -> Iterator[None]:
    """HiGHS writes some debug lines (``HighsMipSolverData::transformNewIntegerFeasibleSolution``)
    straight to the C stdout, past ``disp=False``: send the process's fd 1 to a temporary file
    for the call and log what it caught at DEBUG level."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no real stdout (e.g. captured): nothing to redirect
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            sink.seek(0)
            caught = sink.read().decode(errors="replace").strip()
            if caught:
                logger.debug("HiGHS printed: %s", caught)


@register_solver("exact")
def solve_exact(problem: SearchProblem, seed: int = 0) -> Assignment:
    keep = [problem.pareto_choices(g) for g in range(problem.n_groups)]
    sizes = np.array([len(k) for k in keep])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n = int(offsets[-1])
    cost = np.concatenate([problem.cost[g][k] for g, k in enumerate(keep)]).astype(np.float64)
    error = np.concatenate([problem.error[g][k] for g, k in enumerate(keep)])
    from autoqra.search.greedy import repair, solve_greedy

    greedy = solve_greedy(problem, seed)
    # HiGHS stops within an absolute gap of 1e-6 as well as the relative one: scale the objective so
    # the plan's total error is ~1e4 (greedy's is within a few % of optimal), not each coefficient
    # to <= 1, or small layers' errors fall under the tolerance and the plan is not quite optimal
    scale = (greedy.error / 1e4 if greedy.error > 0 else float(np.abs(error).max())) or 1.0
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
    with _c_stdout_to_log():
        result = milp(
            error / scale,
            constraints=constraints,
            integrality=np.ones(n),
            bounds=Bounds(0, 1),
            options={"mip_rel_gap": 1e-9, "presolve": True, "time_limit": TIME_LIMIT},
        )
    if result.x is None:
        if result.status == 1:  # time limit, no integer point yet
            logger.warning("exact: HiGHS found no plan in %.0f s (%d groups); using the greedy plan", TIME_LIMIT,
                           problem.n_groups)
            return problem.assignment(list(greedy.index), "exact")
        raise AutoQRAError(f"the exact solver found no solution ({result.message}); try solver='greedy'")
    if result.status == 1:
        logger.warning("exact: HiGHS stopped at its %.0f s time limit (%d groups); the plan may not be optimal",
                       TIME_LIMIT, problem.n_groups)
    x = np.round(result.x).astype(np.int64)
    index = []
    for g in range(problem.n_groups):
        local = int(np.argmax(x[offsets[g] : offsets[g + 1]]))
        index.append(int(keep[g][local]))
    assignment = problem.assignment(index, "exact")
    if assignment.cost > problem.budget:  # rounding of a tolerance-feasible point: repair by greedy
        assignment = problem.assignment(repair(problem, index), "exact")
    if greedy.error < assignment.error:
        logger.debug("exact: greedy's plan is better (%.9g < %.9g) after the tolerance repair", greedy.error,
                     assignment.error)
        assignment = problem.assignment(list(greedy.index), "exact")
    return assignment

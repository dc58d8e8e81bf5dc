"""``exact``: the multiple-choice knapsack solved to optimality with HiGHS (``highspy``).

Optimal for the additive proxy. Dominated choices (more bytes and more error than another choice
of the same group) are removed first; they can never be in an optimal solution.

Two safeguards, both logged: HiGHS runs under ``TIME_LIMIT`` seconds (large synthetic problems
with errors spanning many orders of magnitude occasionally branch for seconds), and the `greedy`
solution (convex-hull fill, ~0.1 s for 2,000 groups) is computed too; the better of the two is
returned. HiGHS accepts a point within its feasibility tolerance, which a byte budget of ~1e8 can
turn into a plan a few bytes over; the repair that follows can then land a hair above greedy's
error, and this comparison makes ``exact`` never worse than ``greedy``.

**Quiet by HiGHS's own option.** The solver is driven through ``highspy`` with ``output_flag``
off, set before anything else happens: nothing reaches the terminal and no file descriptor of
the process is touched (``scipy.optimize.milp``'s HiGHS build writes stray debug lines to the C
stdout past ``disp=False``, which could only be hidden by redirecting the whole process's
stdout). ``highspy.Highs()`` registers its Python callbacks in its constructor, which makes HiGHS
log its banner before any option can be set; this solver uses no callbacks, so `_QuietHighs`
skips that registration.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from autoqra.errors import AutoQRAError, MissingDependencyError
from autoqra.search.problem import Assignment, SearchProblem
from autoqra.search.registry import register_solver

logger = logging.getLogger(__name__)

#: seconds HiGHS may search before the best point found so far (or greedy's) is used
TIME_LIMIT = 20.0


@functools.cache
def _quiet_highs_class() -> tuple[type, object]:
    """(a `highspy.Highs` subclass that registers no Python callbacks, the highspy module)."""
    try:
        import highspy
    except ImportError as exc:  # a core dependency; only a broken install lands here
        raise MissingDependencyError("solver='exact' needs highspy: pip install highspy") from exc

    class _QuietHighs(highspy.Highs):
        def enableCallbacks(self) -> None:  # noqa: N802 (highspy's name)
            """No Python callbacks: registering them would log HiGHS's banner before output_flag is off."""

    return _QuietHighs, highspy


def _highs():  # noqa: ANN202 (highspy is imported lazily)
    """A HiGHS instance that prints nothing (see the module docstring), and the highspy module."""
    cls, highspy = _quiet_highs_class()
    h = cls()
    h.setOptionValue("output_flag", False)
    return h, highspy


def _milp(error: np.ndarray, group_of: np.ndarray, extra: np.ndarray, room: float, n_groups: int):  # noqa: ANN202
    """min error·x  s.t.  one choice per group, extra·x ≤ room, x binary. Returns (x or None, timed out)."""
    h, highspy = _highs()
    n = len(error)
    lp = highspy.HighsLp()
    lp.num_col_ = n
    lp.num_row_ = n_groups + 1
    lp.col_cost_ = error.astype(np.float64)
    lp.col_lower_ = np.zeros(n)
    lp.col_upper_ = np.ones(n)
    lp.row_lower_ = np.r_[np.ones(n_groups), -highspy.kHighsInf]
    lp.row_upper_ = np.r_[np.ones(n_groups), room]
    # column-wise: column k has a 1 in its group's row and its extra bytes in the knapsack row (if any)
    nonzero = extra != 0
    counts = 1 + nonzero.astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    index = np.empty(int(starts[-1]), dtype=np.int32)
    value = np.empty(int(starts[-1]), dtype=np.float64)
    index[starts[:-1]] = group_of
    value[starts[:-1]] = 1.0
    second = starts[:-1][nonzero] + 1
    index[second] = n_groups
    value[second] = extra[nonzero]
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = starts.astype(np.int32)
    lp.a_matrix_.index_ = index
    lp.a_matrix_.value_ = value
    lp.integrality_ = [highspy.HighsVarType.kInteger] * n
    for option, setting in (("mip_rel_gap", 1e-9), ("presolve", "on"), ("time_limit", TIME_LIMIT),
                            ("random_seed", 0)):
        h.setOptionValue(option, setting)
    h.passModel(lp)
    h.run()
    status = h.getModelStatus()
    timed_out = status == highspy.HighsModelStatus.kTimeLimit
    has_point = h.getInfo().primal_solution_status == 2  # kSolutionStatusFeasible
    if status != highspy.HighsModelStatus.kOptimal and not (timed_out and has_point):
        if timed_out:
            return None, True
        raise AutoQRAError(f"the exact solver found no solution (HiGHS: {h.modelStatusToString(status)}); "
                           "try solver='greedy'")
    return np.asarray(h.getSolution().col_value), timed_out


@register_solver("exact")
def solve_exact(problem: SearchProblem, seed: int = 0) -> Assignment:
    keep = [problem.pareto_choices(g) for g in range(problem.n_groups)]
    sizes = np.array([len(k) for k in keep])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    cost = np.concatenate([problem.cost[g][k] for g, k in enumerate(keep)]).astype(np.float64)
    error = np.concatenate([problem.error[g][k] for g, k in enumerate(keep)])
    from autoqra.search.greedy import repair, solve_greedy

    greedy = solve_greedy(problem, seed)
    # HiGHS stops within an absolute gap of 1e-6 as well as the relative one: scale the objective so
    # the plan's total error is ~1e4 (greedy's is within a few % of optimal), not each coefficient
    # to <= 1, or small layers' errors fall under the tolerance and the plan is not quite optimal
    scale = (greedy.error / 1e4 if greedy.error > 0 else float(np.abs(error).max())) or 1.0
    # subtract each group's cheapest cost so the knapsack row has small, well-scaled numbers
    base = np.array([problem.cost[g][k[0]] for g, k in enumerate(keep)], dtype=np.float64)
    extra = cost - np.repeat(base, sizes)
    room = float(problem.budget - base.sum())
    x, timed_out = _milp(error / scale, np.repeat(np.arange(problem.n_groups), sizes), extra, room,
                         problem.n_groups)
    if x is None:  # time limit, no integer point yet
        logger.warning("exact: HiGHS found no plan in %.0f s (%d groups); using the greedy plan", TIME_LIMIT,
                       problem.n_groups)
        return problem.assignment(list(greedy.index), "exact")
    if timed_out:
        logger.warning("exact: HiGHS stopped at its %.0f s time limit (%d groups); the plan may not be optimal",
                       TIME_LIMIT, problem.n_groups)
    x = np.round(x).astype(np.int64)
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

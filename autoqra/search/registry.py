"""Solver registry. A solver maps (SearchProblem, seed) → Assignment and never exceeds the budget."""

from __future__ import annotations

from collections.abc import Callable

from autoqra.errors import BudgetInfeasibleError, UnknownNameError
from autoqra.search.problem import Assignment, SearchProblem

SolverFn = Callable[[SearchProblem, int], Assignment]
_SOLVERS: dict[str, SolverFn] = {}


def register_solver(name: str) -> Callable[[SolverFn], SolverFn]:
    def deco(fn: SolverFn) -> SolverFn:
        _SOLVERS[name] = fn
        return fn

    return deco


def _load_builtin() -> None:
    from autoqra.search import differentiable, evolutionary, exact, greedy  # noqa: F401  (registers them)


def available_solvers() -> list[str]:
    _load_builtin()
    return sorted(_SOLVERS)


def get_solver(name: str) -> SolverFn:
    """The solver registered as ``name``; wrapped so that every result is checked against the budget."""
    _load_builtin()
    if name not in _SOLVERS:
        raise UnknownNameError(f"unknown solver {name!r}; available: {', '.join(sorted(_SOLVERS))}")
    fn = _SOLVERS[name]

    def checked(problem: SearchProblem, seed: int = 0) -> Assignment:
        problem.check_feasible()
        result = fn(problem, seed)
        if result.cost > problem.budget:  # a solver bug, never the user's fault
            raise BudgetInfeasibleError(
                f"solver {name!r} returned {result.cost:,} bytes over the budget of {problem.budget:,}; "
                "this is a bug: please report it and use solver='exact'"
            )
        return result

    return checked

"""The search: problems, solvers and estimators (registries)."""

from autoqra.search.problem import Assignment, SearchProblem
from autoqra.search.registry import available_solvers, get_solver, register_solver

__all__ = ["Assignment", "SearchProblem", "available_solvers", "get_solver", "register_solver"]

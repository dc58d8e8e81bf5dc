"""`SearchProblem` and `Assignment`: a multiple-choice knapsack, pure Python + numpy.

Each group (fusion group: its members share one choice) has a list of choices (bits, rank) with
a cost (bytes, summed over members) and an error (predicted loss of quality, summed over
members). A solver picks one choice per group minimizing total error with total cost ≤ budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autoqra.errors import BudgetInfeasibleError, ConfigError

Choice = tuple[int, int]  # (bits, rank)


@dataclass(frozen=True)
class SearchProblem:
    """Groups × choices with costs and errors, and the byte budget."""

    groups: tuple[str, ...]
    choices: tuple[tuple[Choice, ...], ...]
    cost: tuple[np.ndarray, ...]  # int64 bytes per choice
    error: tuple[np.ndarray, ...]  # float64 per choice
    budget: int

    def __post_init__(self) -> None:
        n = len(self.groups)
        if not (len(self.choices) == len(self.cost) == len(self.error) == n):
            raise ConfigError("groups, choices, cost and error must have the same length")
        for g, c, k, e in zip(self.groups, self.choices, self.cost, self.error, strict=True):
            if len(c) == 0 or len(k) != len(c) or len(e) != len(c):
                raise ConfigError(f"group {g!r} needs one cost and one error per choice ({len(c)} choices)")
            if not np.all(np.isfinite(e)):
                raise ConfigError(f"group {g!r} has a non-finite error; check the estimator")

    @classmethod
    def build(
        cls,
        groups: Sequence[str],
        choices: Sequence[Sequence[Choice]],
        cost: Sequence[Sequence[float]],
        error: Sequence[Sequence[float]],
        budget: int,
    ) -> SearchProblem:
        return cls(
            tuple(groups),
            tuple(tuple((int(b), int(r)) for b, r in c) for c in choices),
            tuple(np.asarray(k, dtype=np.int64) for k in cost),
            tuple(np.asarray(e, dtype=np.float64) for e in error),
            int(budget),
        )

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    def min_cost(self) -> int:
        return int(sum(int(k.min()) for k in self.cost))

    def max_useful_cost(self) -> int:
        """Cost of the least-error choice of every group (more budget buys nothing)."""
        return int(sum(int(k[np.lexsort((k, e))[0]]) for k, e in zip(self.cost, self.error, strict=True)))

    def check_feasible(self) -> None:
        """Raise `BudgetInfeasibleError` naming the smallest feasible budget."""
        need = self.min_cost()
        if need > self.budget:
            raise BudgetInfeasibleError(
                f"budget of {self.budget:,} bytes is infeasible: the smallest plan needs {need:,} bytes "
                f"({need / 2**20:.2f} MiB); raise the budget to at least that, or allow fewer bits / rank 0",
                min_bytes=need,
            )

    def with_budget(self, budget: int) -> SearchProblem:
        return SearchProblem(self.groups, self.choices, self.cost, self.error, int(budget))

    def evaluate(self, index: Sequence[int]) -> tuple[int, float]:
        """(total cost, total error) of choosing ``index[g]`` in every group."""
        cost = sum(int(self.cost[g][i]) for g, i in enumerate(index))
        error = float(sum(float(self.error[g][i]) for g, i in enumerate(index)))
        return cost, error

    def assignment(self, index: Sequence[int], solver: str) -> Assignment:
        index = tuple(int(i) for i in index)
        cost, error = self.evaluate(index)
        return Assignment(index=index, cost=cost, error=error, solver=solver,
                          choices=tuple(self.choices[g][i] for g, i in enumerate(index)))

    def pareto_choices(self, g: int) -> np.ndarray:
        """Indices of group ``g``'s non-dominated choices, by increasing cost (decreasing error)."""
        k, e = self.cost[g], self.error[g]
        order = np.lexsort((e, k))
        keep, best = [], np.inf
        for i in order:
            if not keep or e[i] < best - 1e-12 * max(1.0, abs(best)):
                keep.append(int(i))
                best = e[i]
        return np.asarray(keep, dtype=np.int64)


@dataclass(frozen=True)
class Assignment:
    """One choice per group, with its total cost and error."""

    index: tuple[int, ...]
    choices: tuple[Choice, ...]
    cost: int
    error: float
    solver: str

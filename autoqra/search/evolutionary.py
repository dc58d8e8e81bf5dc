"""``evolutionary``: NSGA-II over (bytes, objective) on pymoo, the AutoQRA paper's search.

Genes: one integer per fusion group, the index of its (bits, rank) choice. pymoo's NSGA-II
(non-dominated sorting + crowding) evolves them with simulated-binary crossover and polynomial
mutation rounded to integers, under the constraint bytes ≤ budget; every offspring first goes
through a **budget repair** that removes the least valuable bytes first (the group whose cheaper
choice loses the least objective per byte saved steps down, until the plan fits). The population
is **warm-started** from the exact and greedy solutions and from the uniform-like plans (every
group at the same bit-width, the largest rank that fits), then random plans; seeded, so the
same problem and seed give the same plan.

A progress bar shows the best feasible objective after every generation (tqdm's own decision
whether to draw, ``TQDM_DISABLE`` respected). **Ctrl-C** during the generations stops the search
where it is: the plans met so far are used, with a warning (the exact solution it was seeded with
is among them, so the result is never worse than ``exact``).

The solver returns the feasible plan of least objective it met (never worse than the exact
solution it was seeded with); :func:`evolve` also returns the final Pareto set of (bytes,
objective), which `autoqra.passes.select` adds to the candidates it scores by *measured* loss
(the multi-fidelity step: the static objective ranks everything, a short fine-tune decides).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from autoqra.errors import MissingDependencyError
from autoqra.progress import tqdm_disable
from autoqra.search.problem import Assignment, SearchProblem
from autoqra.search.registry import register_solver

__all__ = ["EvolutionResult", "evolve"]

logger = logging.getLogger(__name__)

POP_SIZE = 48
GENERATIONS = 40


@dataclass(frozen=True)
class EvolutionResult:
    best: Assignment
    front: tuple[Assignment, ...]  # non-dominated feasible plans, by increasing bytes
    generations: int  # generations completed
    interrupted: bool = False  # stopped by Ctrl-C: the best of what was met so far


def _repair_index(problem: SearchProblem, index: np.ndarray) -> np.ndarray:
    """Step groups down to cheaper choices, least objective lost per byte saved first, until it fits."""
    index = index.copy()
    cost = sum(int(problem.cost[g][i]) for g, i in enumerate(index))
    while cost > problem.budget:
        best, best_rate = None, np.inf
        for g, i in enumerate(index):
            k, e = problem.cost[g], problem.error[g]
            cheaper = np.nonzero(k < k[i])[0]
            if not len(cheaper):
                continue
            rates = (e[cheaper] - e[i]) / (k[i] - k[cheaper])
            j = int(np.argmin(rates))
            if rates[j] < best_rate:
                best, best_rate = (g, int(cheaper[j])), float(rates[j])
        if best is None:  # cannot happen for a feasible problem (the all-cheapest plan fits)
            break
        g, j = best
        cost -= int(problem.cost[g][index[g]]) - int(problem.cost[g][j])
        index[g] = j
    return index


def _warm_starts(problem: SearchProblem, seed: int) -> list[np.ndarray]:
    from autoqra.search.registry import get_solver

    starts = [np.asarray(get_solver(name)(problem, seed).index) for name in ("exact", "greedy")]
    bits = sorted({b for ch in problem.choices for b, _ in ch})
    for b in bits:  # uniform-like: every group at bits b (or its nearest), the largest rank; then repaired
        index = []
        for ch in problem.choices:
            same = [i for i, (cb, _) in enumerate(ch) if cb == b]
            pool = same or list(range(len(ch)))
            index.append(max(pool, key=lambda i, ch=ch: (ch[i][1], -abs(ch[i][0] - b))))
        starts.append(_repair_index(problem, np.asarray(index)))
    return starts


def _best_feasible(pop, upper: np.ndarray, problem: SearchProblem) -> float:  # noqa: ANN001 (a pymoo Population)
    """Least objective among the population's plans that fit (inf when none does)."""
    if pop is None or len(pop) == 0:
        return float("inf")
    errors = [problem.evaluate(np.clip(np.rint(x), 0, upper).astype(int)) for x in pop.get("X")]
    return min((e for c, e in errors if c <= problem.budget), default=float("inf"))


def evolve(problem: SearchProblem, seed: int = 0, *, pop_size: int = POP_SIZE, generations: int = GENERATIONS,
           progress: bool | None = None,
           on_generation: Callable[[int, float], None] | None = None) -> EvolutionResult:
    """NSGA-II on (bytes, objective) under the budget; see the module docstring.

    Args:
        progress: False hides the bar; None/True let tqdm decide (a terminal gets it).
        on_generation: called after each generation with (generation, best feasible objective).
    """
    try:
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.problem import ElementwiseProblem
        from pymoo.core.repair import Repair
        from pymoo.operators.crossover.sbx import SBX
        from pymoo.operators.mutation.pm import PM
        from pymoo.operators.repair.rounding import RoundingRepair
    except ImportError as exc:
        raise MissingDependencyError(
            "solver='evolutionary' needs pymoo: pip install 'autoqra[search]' (or pip install pymoo)"
        ) from exc

    n = problem.n_groups
    upper = np.array([len(c) - 1 for c in problem.choices], dtype=float)

    class Knapsack(ElementwiseProblem):
        def __init__(self) -> None:
            super().__init__(n_var=n, n_obj=2, n_ieq_constr=1, xl=np.zeros(n), xu=np.maximum(upper, 1e-9),
                             vtype=int)

        def _evaluate(self, x, out, *args, **kwargs) -> None:  # noqa: ANN001 (pymoo's signature)
            index = np.clip(np.rint(x).astype(int), 0, upper.astype(int))
            cost, error = problem.evaluate(index)
            out["F"] = [float(cost), error]
            out["G"] = [float(cost - problem.budget)]

    class BudgetRepair(Repair):
        def _do(self, _problem, X, **kwargs):  # noqa: ANN001, N803
            X = np.clip(np.rint(X), 0, upper).astype(int)  # noqa: N806
            return np.stack([_repair_index(problem, row) for row in X]).astype(float)

    rng = np.random.default_rng(seed)
    starts = _warm_starts(problem, seed)
    random_rows = [np.asarray([rng.integers(0, len(c)) for c in problem.choices]) for _ in range(pop_size)]
    initial = np.stack([*starts, *random_rows][:pop_size]).astype(float)
    algorithm = NSGA2(
        pop_size=pop_size, sampling=initial, repair=BudgetRepair(), eliminate_duplicates=True,
        crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
        mutation=PM(eta=20, vtype=float, repair=RoundingRepair()),
    )
    algorithm.setup(Knapsack(), termination=("n_gen", generations), seed=int(seed) % (2**31), verbose=False)
    done, interrupted = 0, False
    with tqdm(total=generations, desc="evolutionary", unit="gen", disable=tqdm_disable(progress)) as bar:
        try:
            while algorithm.has_next():
                algorithm.next()
                done += 1
                best_so_far = _best_feasible(algorithm.pop, upper, problem)
                bar.set_postfix(best=f"{best_so_far:.4g}")
                bar.update(1)
                if on_generation is not None:
                    on_generation(done, best_so_far)
        except KeyboardInterrupt:
            interrupted = True
            logger.warning("evolutionary: interrupted after %d of %d generations; returning the best plan met so far",
                           done, generations)
    pop = algorithm.pop
    pop_x = np.clip(np.rint(pop.get("X")), 0, upper).astype(int) if pop is not None and len(pop) else []
    seen: dict[tuple[int, ...], Assignment] = {}
    for row in [*pop_x, *starts]:
        a = problem.assignment(row, "evolutionary")
        if a.cost <= problem.budget:
            seen[a.index] = a
    plans = sorted(seen.values(), key=lambda a: (a.cost, a.error, a.index))
    front: list[Assignment] = []
    for a in plans:  # non-dominated: each has less error than every cheaper one
        if not front or a.error < front[-1].error:
            front.append(a)
    best = min(plans, key=lambda a: (a.error, a.cost, a.index))
    logger.info("evolutionary: %d generations × %d, %d plans on the front, best %.6g at %d bytes",
                done, pop_size, len(front), best.error, best.cost)
    return EvolutionResult(best=best, front=tuple(front), generations=done, interrupted=interrupted)


@register_solver("evolutionary")
def solve_evolutionary(problem: SearchProblem, seed: int = 0) -> Assignment:
    """The least-objective feasible plan NSGA-II met (warm-started with the exact solution)."""
    return evolve(problem, seed).best

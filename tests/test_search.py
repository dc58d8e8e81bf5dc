"""Solvers: exact == brute force, every solver respects the budget, stated gaps, determinism."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest

from autoqra.errors import BudgetInfeasibleError, UnknownNameError
from autoqra.search import SearchProblem, available_solvers, get_solver
from autoqra.search.pareto import pareto_front

#: stated optimality gaps against `exact` (mean over random problems, relative error)
STATED_MEAN_GAP = {"greedy": 0.02, "differentiable": 0.05}


def random_problem(rng: np.random.Generator, groups: int, choices: int) -> SearchProblem:
    ch, co, er = [], [], []
    for _ in range(groups):
        n = int(rng.integers(1, choices + 1))
        k = rng.integers(10, 1000, size=n)
        e = 1000.0 / (k + rng.random(n) * 300) * rng.random()
        ch.append([(2 + i, 0) for i in range(n)])
        co.append(k)
        er.append(e)
    lo, hi = sum(int(min(k)) for k in co), sum(int(max(k)) for k in co)
    return SearchProblem.build([f"g{i}" for i in range(groups)], ch, co, er, int(lo + (hi - lo) * rng.random()))


def brute_force(problem: SearchProblem) -> float:
    best = np.inf
    for index in itertools.product(*[range(len(c)) for c in problem.choices]):
        cost, err = problem.evaluate(index)
        if cost <= problem.budget:
            best = min(best, err)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_exact_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    problem = random_problem(rng, int(rng.integers(1, 7)), 6)
    result = get_solver("exact")(problem)
    assert result.cost <= problem.budget
    assert result.error == pytest.approx(brute_force(problem), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("solver", ["exact", "greedy", "differentiable"])
def test_every_solver_respects_budget_and_gap(solver):
    rng = np.random.default_rng(123)
    gaps = []
    for _ in range(60):
        problem = random_problem(rng, int(rng.integers(1, 30)), 8)
        result = get_solver(solver)(problem, 0)
        assert result.cost <= problem.budget
        assert result.cost == problem.evaluate(result.index)[0]
        best = get_solver("exact")(problem).error
        assert result.error >= best - 1e-9 * max(1.0, best)
        gaps.append(result.error / best - 1 if best > 0 else 0.0)
    if solver in STATED_MEAN_GAP:
        assert np.mean(gaps) <= STATED_MEAN_GAP[solver]


def test_all_solvers_registered_and_unknown_name_lists_them():
    assert {"exact", "greedy", "differentiable"} <= set(available_solvers())
    with pytest.raises(UnknownNameError, match="available: .*differentiable.*exact.*greedy"):
        get_solver("simulated_annealing")


@pytest.mark.parametrize("solver", ["exact", "greedy", "differentiable"])
def test_infeasible_budget_names_smallest(solver):
    problem = SearchProblem.build(["a", "b"], [[(2, 0), (4, 0)], [(2, 0)]], [[10, 20], [5]], [[2.0, 1.0], [1.0]], 14)
    with pytest.raises(BudgetInfeasibleError, match="at least") as info:
        get_solver(solver)(problem)
    assert info.value.min_bytes == 15


@pytest.mark.parametrize("solver", ["exact", "greedy", "differentiable"])
def test_solvers_are_deterministic(solver):
    problem = random_problem(np.random.default_rng(7), 50, 10)
    assert get_solver(solver)(problem, 3) == get_solver(solver)(problem, 3)


def test_pareto_front_is_monotone():
    problem = random_problem(np.random.default_rng(1), 20, 6)
    front = pareto_front(problem, n_points=15)
    assert len(front) >= 3
    costs = [p.cost for p in front]
    errors = [p.error for p in front]
    assert costs == sorted(costs) and all(a > b for a, b in zip(errors, errors[1:], strict=False))
    assert all(p.cost <= p.budget for p in front)


def test_exact_at_its_time_limit_falls_back_to_the_best_plan_it_has(monkeypatch, caplog):
    import logging

    from autoqra.search import exact

    rng = np.random.default_rng(7)
    problem = random_problem(rng, 400, 8)
    monkeypatch.setattr(exact, "TIME_LIMIT", 1e-6)
    with caplog.at_level(logging.WARNING, logger="autoqra.search.exact"):
        result = get_solver("exact")(problem, 0)
    assert result.cost <= problem.budget and result.solver == "exact"
    assert "time limit" in caplog.text or "no plan in" in caplog.text
    assert result.error <= get_solver("greedy")(problem, 0).error  # never worse than greedy


def test_exact_keeps_the_c_stdout_clean():
    """HiGHS prints nothing (its own output_flag, set before anything else): not a banner, not a debug line."""
    import subprocess
    import sys

    code = ("import numpy as np, sys; sys.path.insert(0, 'tests'); from test_search import random_problem; "
            "from autoqra.search import get_solver; p = random_problem(np.random.default_rng(3), 300, 8); "
            "r = get_solver('exact')(p); print('cost', r.cost <= p.budget)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "cost True"


def test_exact_leaves_the_process_file_descriptors_alone():
    """No process-wide stdout redirection: the solve never duplicates a file descriptor."""
    import os

    calls: list[tuple] = []
    saved = os.dup, os.dup2
    os.dup, os.dup2 = (lambda *a: calls.append(a) or saved[0](*a)), (lambda *a, **k: calls.append(a) or saved[1](*a, **k))
    try:
        problem = random_problem(np.random.default_rng(3), 300, 8)
        assert get_solver("exact")(problem).cost <= problem.budget
    finally:
        os.dup, os.dup2 = saved
    assert calls == []


def test_evolutionary_reports_each_generation_and_ctrl_c_returns_the_best_so_far(caplog):
    from autoqra.search.evolutionary import evolve

    problem = random_problem(np.random.default_rng(11), 20, 6)
    seen: list[tuple[int, float]] = []

    def interrupt_at_three(generation: int, best: float) -> None:
        seen.append((generation, best))
        if generation == 3:
            raise KeyboardInterrupt

    with caplog.at_level(logging.WARNING, logger="autoqra.search.evolutionary"):
        result = evolve(problem, 0, generations=10, on_generation=interrupt_at_three)
    assert result.interrupted and result.generations == 3
    assert [g for g, _ in seen] == [1, 2, 3]
    bests = [b for _, b in seen]
    assert bests == sorted(bests, reverse=True)  # elitist: the best feasible objective never gets worse
    assert "interrupted after 3 of 10 generations" in caplog.text
    assert result.best.cost <= problem.budget
    assert result.best.error <= get_solver("exact")(problem).error + 1e-12  # the exact warm start is kept
    full = evolve(problem, 0, generations=10)
    assert not full.interrupted and full.generations == 10 and full.best.error <= result.best.error


def test_evolutionary_is_seeded_repairs_to_budget_and_is_never_worse_than_exact():
    from autoqra.search.evolutionary import _repair_index, evolve

    rng = np.random.default_rng(7)
    for _ in range(3):
        problem = random_problem(rng, 15, 6)
        first, again = evolve(problem, 3, generations=5), evolve(problem, 3, generations=5)
        assert first.best.index == again.best.index  # seeded: deterministic
        assert first.best.cost <= problem.budget and all(a.cost <= problem.budget for a in first.front)
        assert first.best.error <= get_solver("exact")(problem).error + 1e-12  # warm-started from exact
        costs = [a.cost for a in first.front]
        errors = [a.error for a in first.front]
        assert costs == sorted(costs) and errors == sorted(errors, reverse=True)  # a real front
        # the repair steps the most expensive plan down until it fits, least objective per byte first
        priciest = np.asarray([int(np.argmax(k)) for k in problem.cost])
        repaired = _repair_index(problem, priciest)
        assert problem.evaluate(repaired)[0] <= problem.budget

"""``greedy``: start from each group's cheapest choice, then buy the upgrade with the best error
reduction per byte until nothing more fits (on each group's lower convex hull). A baseline."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from autoqra.search.problem import Assignment, SearchProblem
from autoqra.search.registry import register_solver


def _hull(problem: SearchProblem, g: int) -> list[int]:
    """Lower convex hull of group g's non-dominated (cost, error) points, by cost."""
    pts = problem.pareto_choices(g)
    k, e = problem.cost[g], problem.error[g]
    hull: list[int] = []
    for i in pts:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # keep b only if the slope a→b is steeper (more error saved per byte) than b→i
            if (e[a] - e[b]) * (k[i] - k[b]) <= (e[b] - e[i]) * (k[b] - k[a]):
                hull.pop()
            else:
                break
        hull.append(int(i))
    return hull


def _best_move(problem: SearchProblem, g: int, cur: int, room: int | None) -> tuple[float, int, int] | None:
    """Group g's best move from choice ``cur``.

    ``room`` given: the upgrade (error down) with the most error saved per byte within ``room``
    extra bytes → (-ratio, choice, extra). ``room`` None: the downgrade (bytes down) adding the
    least error per byte saved → (ratio, choice, -saved).
    """
    k, e = problem.cost[g], problem.error[g]
    delta_k = (k - k[cur]).astype(np.float64)
    delta_e = e - e[cur]
    if room is not None:
        ok = (delta_e < 0) & (delta_k <= room)
        if not ok.any():
            return None
        ratio = np.where(ok, -delta_e / np.maximum(delta_k, 1e-9), -np.inf)
        ratio = np.where(ok & (delta_k <= 0), np.inf, ratio)
        i = int(np.lexsort((delta_e, -ratio))[0])
        return (-float(ratio[i]), i, int(delta_k[i]))
    ok = delta_k < 0
    if not ok.any():
        return None
    ratio = np.where(ok, delta_e / np.maximum(-delta_k, 1e-9), np.inf)
    i = int(np.argmin(ratio))
    return (float(ratio[i]), i, int(delta_k[i]))


def fill(problem: SearchProblem, index: Sequence[int]) -> list[int]:
    """Spend the remaining budget on the best error-per-byte upgrades (lazy heap, exact check)."""
    index = list(index)
    spent = sum(int(problem.cost[g][i]) for g, i in enumerate(index))
    heap: list[tuple[float, int, int, int]] = []
    for g in range(problem.n_groups):
        move = _best_move(problem, g, index[g], problem.budget - spent)
        if move is not None:
            heap.append((move[0], g, move[1], move[2]))
    heapq.heapify(heap)
    while heap:
        _, g, i, extra = heapq.heappop(heap)
        if spent + extra > problem.budget:  # stale: the room shrank; recompute this group
            move = _best_move(problem, g, index[g], problem.budget - spent)
            if move is not None:
                heapq.heappush(heap, (move[0], g, move[1], move[2]))
            continue
        index[g] = i
        spent += extra
        move = _best_move(problem, g, i, problem.budget - spent)
        if move is not None:
            heapq.heappush(heap, (move[0], g, move[1], move[2]))
    return index


def repair(problem: SearchProblem, index: Sequence[int]) -> list[int]:
    """Move groups to cheaper choices (least error added per byte saved) until the budget holds."""
    index = list(index)
    spent = sum(int(problem.cost[g][i]) for g, i in enumerate(index))
    heap: list[tuple[float, int, int, int]] = []
    for g in range(problem.n_groups):
        move = _best_move(problem, g, index[g], None)
        if move is not None:
            heap.append((move[0], g, move[1], move[2]))
    heapq.heapify(heap)
    while spent > problem.budget and heap:
        _, g, i, delta = heapq.heappop(heap)
        index[g] = i
        spent += delta
        move = _best_move(problem, g, i, None)
        if move is not None:
            heapq.heappush(heap, (move[0], g, move[1], move[2]))
    return index


@register_solver("greedy")
def solve_greedy(problem: SearchProblem, seed: int = 0) -> Assignment:
    hulls = [_hull(problem, g) for g in range(problem.n_groups)]
    pos = [0] * problem.n_groups
    index = [h[0] for h in hulls]
    spent = sum(int(problem.cost[g][i]) for g, i in enumerate(index))
    heap: list[tuple[float, int, int]] = []

    def push(g: int) -> None:
        if pos[g] + 1 < len(hulls[g]):
            a, b = hulls[g][pos[g]], hulls[g][pos[g] + 1]
            extra = int(problem.cost[g][b] - problem.cost[g][a])
            gain = float(problem.error[g][a] - problem.error[g][b])
            heapq.heappush(heap, (-gain / max(extra, 1), g, extra))

    for g in range(problem.n_groups):
        push(g)
    while heap:
        _, g, extra = heapq.heappop(heap)
        if spent + extra > problem.budget:
            continue  # this group's next step does not fit; later (steeper-first) steps are larger
        pos[g] += 1
        index[g] = hulls[g][pos[g]]
        spent += extra
        push(g)
    return problem.assignment(fill(problem, index), "greedy")

"""``differentiable``: a continuous relaxation of the discrete (bits, rank) choice.

Every group g holds logits θ_g over its choices; p_g = softmax((θ_g + Gumbel noise) / τ). The
relaxed objective is Σ_g p_g·error_g + λ·(Σ_g p_g·cost_g − budget)/budget, minimized over θ by
Adam while λ rises by dual ascent whenever the expected cost is over budget and τ anneals from
1 to 0.05. The argmax of each group is then repaired to the budget (cheapest error increase per
byte saved) and the leftover bytes are spent on the best error-per-byte upgrades. Seeded.

This is the relaxation over the proxy table; gradients are analytic (no autograd needed):
∂E[v]/∂θ_c = p_c (v_c − E[v]) / τ.
"""

from __future__ import annotations

import numpy as np

from autoqra.search.greedy import fill, repair
from autoqra.search.problem import Assignment, SearchProblem
from autoqra.search.registry import register_solver

STEPS = 400
LR = 0.1


@register_solver("differentiable")
def solve_differentiable(problem: SearchProblem, seed: int = 0) -> Assignment:
    rng = np.random.default_rng(seed)
    sizes = np.array([len(c) for c in problem.choices])
    width = int(sizes.max())
    mask = np.arange(width)[None, :] < sizes[:, None]
    err = np.zeros((problem.n_groups, width))
    cost = np.zeros((problem.n_groups, width))
    for g in range(problem.n_groups):
        err[g, : sizes[g]] = problem.error[g]
        cost[g, : sizes[g]] = problem.cost[g]
    # normalize: errors to the per-group spread, cost to the budget
    err_scale = float(np.abs(err[mask]).mean()) or 1.0
    e = err / err_scale
    c = cost / float(problem.budget)
    theta = np.zeros_like(e)
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    lam = 0.0
    beta1, beta2 = 0.9, 0.999
    for step in range(1, STEPS + 1):
        tau = max(0.05, 1.0 * (0.05 / 1.0) ** (step / STEPS))
        gumbel = -np.log(-np.log(rng.uniform(1e-9, 1 - 1e-9, size=theta.shape))) * 0.3 * tau
        z = np.where(mask, (theta + gumbel) / tau, -np.inf)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        value = np.where(mask, e + lam * c * problem.n_groups, 0.0)
        expected = (p * value).sum(axis=1, keepdims=True)
        grad = np.where(mask, p * (value - expected) / tau, 0.0)
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad**2
        theta -= LR * (m / (1 - beta1**step)) / (np.sqrt(v / (1 - beta2**step)) + 1e-8)
        over = float((p * c).sum() - 1.0)
        lam = max(0.0, lam + 0.05 * over * problem.n_groups / max(1, problem.n_groups) * 10)
    relaxed = [int(np.argmax(np.where(mask[g], theta[g], -np.inf))) for g in range(problem.n_groups)]
    candidates = [fill(problem, repair(problem, relaxed))]
    # Lagrangian rounding: the hard argmin of error + μ·cost for the smallest feasible μ, found by
    # bisection around the multiplier the relaxation converged to.
    big = np.where(mask, 0.0, np.inf)
    def argmin_at(mu: float) -> list[int]:
        return list(np.argmin(err + mu * cost + big, axis=1))
    lo, hi = 0.0, max(1e-12, lam * problem.n_groups * err_scale / problem.budget) * 2
    while sum(cost[g, i] for g, i in enumerate(argmin_at(hi))) > problem.budget and hi < 1e30:
        hi *= 4
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if sum(cost[g, i] for g, i in enumerate(argmin_at(mid))) > problem.budget:
            lo = mid
        else:
            hi = mid
    candidates.append(fill(problem, repair(problem, argmin_at(hi))))
    index = min(candidates, key=lambda ix: problem.evaluate(ix)[1])
    return problem.assignment(index, "differentiable")

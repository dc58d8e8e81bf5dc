"""Plasticity: what a rank-r adapter can learn during fine-tuning, per layer.

The error tables (:mod:`autoqra.search.estimators`) say how much loss a layer's quantization
costs at step 0. Fine-tuning then moves the adapter ``B A`` along the loss gradient with respect
to the weight, ``G = E_t[g_t x_tᵀ]`` (collected by the calibration pass on the calibration data,
which stands for the fine-tuning data). A rank-``r`` adapter can only follow the part of ``G``
in ``r`` directions; to first order a gradient step of size ``η`` lowers the loss by
``η·‖P_r G‖²``, so::

    plasticity(r) = Σ_{i ≤ r} σ_i(G)²        (0 at rank 0)

and the fine-tuning objective is ``error(b, r) − λ·plasticity(r)``. ``λ`` plays the part of the
learning rate × steps and is reported in normalized units (``λ = 1``: the total plasticity of
the best uniform plan equals its total step-0 error), and is *fitted by measured loss*
(:mod:`autoqra.passes.select`), never trusted blindly. The Fisher-whitened gradient
``diag(1/g)·G·diag(1/d)`` (a Newton step) was tried first: on SmolLM2 its totals were ~10⁴ × the
error totals, dominated by channels of tiny curvature, so the plain gradient energy is used.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from autoqra.errors import ConfigError
from autoqra.ir.layer import LayerKind
from autoqra.ir.program import Program
from autoqra.passes.base import PassBase, PassResult
from autoqra.progress import tqdm_disable

__all__ = ["EstimatePlasticityPass", "energy_table", "plasticity_table", "squared_singular_values"]

logger = logging.getLogger(__name__)


def energy_table(sv2: torch.Tensor, ranks: tuple[int, ...]) -> dict[int, float]:
    """``{rank: Σ_{i≤rank} sv2[i]}`` for squared singular values ``sv2`` in descending order."""
    cum = torch.cat([sv2.new_zeros(1), sv2.double().cumsum(0)])
    return {r: float(cum[min(r, sv2.numel())]) for r in ranks}


def squared_singular_values(grad: torch.Tensor) -> torch.Tensor:
    """σ_i(grad)², descending (float64), from the Gram matrix on the smaller side (in float64: ~6× faster
    than svdvals for SmolLM2's 576 × 1536 layers, equal to ~1e-15 relative in the cumulative sums)."""
    g = grad.double()
    gram = g @ g.T if g.shape[0] <= g.shape[1] else g.T @ g
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)


def plasticity_table(grad: torch.Tensor, ranks: tuple[int, ...]) -> dict[int, float]:
    """``{rank: Σ_{i≤rank} σ_i(grad)²}`` for a weight gradient ``[out, in]``."""
    if grad.dim() != 2:
        raise ConfigError(f"plasticity needs a 2-D weight gradient, got shape {tuple(grad.shape)}")
    return energy_table(squared_singular_values(grad), ranks)


class EstimatePlasticityPass(PassBase):
    """Writes ``plasticity``: ``{layer: {rank: value}}`` in ``program.state['plasticity']`` (empty
    without weight gradients: the objective then reduces to the step-0 error)."""

    reads = ("graph", "cost", "stats")
    writes = ("plasticity",)

    def __init__(self, *, progress: bool | None = None, release_gradients: bool = False) -> None:
        self.progress = progress
        #: drop the weight gradients when no table needs them (one rank per layer) — compile's own
        #: calibration; a reused one keeps them for a later compile. Wherever tables are made, each layer's
        #: gradient is reduced to its spectrum and dropped.
        self.release_gradients = release_gradients

    def call(self, program: Program) -> PassResult:
        graph = program.require_graph()
        stats = program.state.get("stats", {})
        table: dict[str, dict[int, float]] = {}
        names = [n for n in graph.order() if graph.layer(n).kind is not LayerKind.EMBEDDING]
        if all(len({r for _, r in graph.annotation(n).cost}) <= 1 for n in names):
            # one rank per layer (e.g. a uniform plan): λ·plasticity is a constant per layer and cannot change
            # the choice; zeros say "nothing to trade" without the SVDs (~1 s a block on SmolLM2)
            program.state["plasticity"] = {n: dict.fromkeys({r for _, r in graph.annotation(n).cost}, 0.0)
                                           for n in names}
            if self.release_gradients:
                for st in stats.values():
                    st.grad_sum = None
            return PassResult(info={"layers": 0, "skipped": "one rank per layer"})
        for name in tqdm(names, desc="plasticity", unit="layer", disable=tqdm_disable(self.progress)):
            st = stats.get(name)
            # the spectrum is all any rank menu needs: computed once, the [out, in] gradient sum dropped
            # (also from a Calibration the caller reuses: later compiles read the spectrum)
            sv2 = None if st is None else st.grad_spectrum(release=True)
            if sv2 is None:
                continue
            ranks = tuple(sorted({r for _, r in graph.annotation(name).cost}))
            table[name] = energy_table(sv2, ranks)
        program.state["plasticity"] = table
        if names and not table:
            logger.warning("no weight gradients were collected: plasticity is zero everywhere")
        return PassResult(info={"layers": len(table)})

"""ValidatePlanPass: check everything before any module is touched; collect ALL failures."""

from __future__ import annotations

from autoqra.errors import AutoQRAError
from autoqra.ir.cost import DENSE_BITS
from autoqra.ir.layer import LayerKind
from autoqra.ir.program import Program
from autoqra.passes.base import PassBase, PassResult
from autoqra.quant.base import QuantSpec, get_backend


class PlanValidationError(AutoQRAError):
    """The plan cannot be materialized; the message lists every failing layer."""


class ValidatePlanPass(PassBase):
    reads = ("graph", "bits", "rank")
    writes = ("validated",)

    def __init__(self, *, backend: str = "packed", group_size: int = 64, budget_bytes: int | None = None,
                 budget: object | None = None) -> None:
        """``budget``: a `Budget`, resolved against the graph when the pass runs (or ``budget_bytes``)."""
        self.backend = get_backend(backend)
        self.group_size = group_size
        self.budget_bytes = budget_bytes
        self.budget = budget

    def call(self, program: Program) -> PassResult:
        graph = program.require_graph()
        if self.budget_bytes is None and self.budget is not None:
            self.budget_bytes = self.budget.resolve(graph.total_numel())
        failures: list[str] = []
        total = 0
        for name in graph.order():
            ann, layer = graph.annotation(name), graph.layer(name)
            if ann.bits is None or ann.rank is None:
                failures.append(f"{name}: no (bits, rank) chosen")
                continue
            total += ann.cost.get((ann.bits, ann.rank), 0)
            if layer.kind is LayerKind.EMBEDDING and (ann.bits, ann.rank) != (DENSE_BITS, 0):
                failures.append(f"{name}: embeddings can only stay at 16 bits, rank 0 (exclude it or pin bits=16, rank=0)")
                continue
            if ann.bits != DENSE_BITS:
                if ann.bits not in self.backend.supported_bits:
                    failures.append(f"{name}: backend {self.backend.name!r} supports bits {self.backend.supported_bits}, "
                                    f"not {ann.bits}")
                    continue
                support = self.backend.supports(layer.in_features, layer.out_features,
                                                QuantSpec(bits=ann.bits, group_size=self.group_size))
                if not support.ok:
                    failures.append(f"{name}: {support.reason}")
            if ann.rank > min(layer.in_features, layer.out_features):
                failures.append(f"{name}: rank {ann.rank} > min(in, out) = {min(layer.in_features, layer.out_features)}")
        if self.budget_bytes is not None and total > self.budget_bytes:
            failures.append(f"plan needs {total:,} bytes, over the budget of {self.budget_bytes:,}")
        if failures:
            raise PlanValidationError(
                f"{len(failures)} problem(s) with the plan, nothing was changed:\n  " + "\n  ".join(failures)
                + "\nFix: pin the failing layers with patterns, choose another backend, or change the search space."
            )
        return PassResult(changed=False, info={"layers": len(graph), "bytes": total})

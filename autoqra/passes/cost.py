"""AnnotateCostPass: bytes of every (bits, rank) choice of every layer, from `ir/cost.py`."""

from __future__ import annotations

from autoqra.config import SearchSpace
from autoqra.ir.cost import CostModel
from autoqra.ir.program import Program
from autoqra.passes.base import PassBase, PassResult


class AnnotateCostPass(PassBase):
    """Writes the cost table {(bits, rank): bytes} of every layer."""

    reads = ("graph",)
    writes = ("cost",)

    def __init__(self, cost_model: CostModel | None = None, space: SearchSpace | None = None) -> None:
        self.cost_model = cost_model or CostModel()
        self.space = space or SearchSpace()

    def call(self, program: Program) -> PassResult:
        graph = program.require_graph()
        for name in graph.order():
            layer = graph.layer(name)
            graph.set_cost(name, self.cost_model.table(layer.in_features, layer.out_features, self.space.bits, self.space.ranks))
        program.state["cost_model"] = self.cost_model
        program.state["space"] = self.space
        return PassResult(info={"choices": sum(len(graph.annotation(n).cost) for n in graph.order())})

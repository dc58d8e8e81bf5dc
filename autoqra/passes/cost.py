"""AnnotateCostPass: bytes of every (bits, rank) choice of every layer, from `ir/cost.py`.

A rank above ``min(in, out)`` is not a choice for a layer; a narrow layer that reads the same input
as wider ones (e.g. Qwen-MoE's one-output ``shared_expert_gate`` beside the shared expert's gate/up)
would otherwise leave its fusion group with fewer common choices (or none, and no plan at all): such
a layer leaves the group and is chosen on its own (logged).
"""

from __future__ import annotations

import logging

from autoqra.config import SearchSpace
from autoqra.ir.cost import CostModel
from autoqra.ir.program import Program
from autoqra.passes.base import PassBase, PassResult

logger = logging.getLogger(__name__)


class AnnotateCostPass(PassBase):
    """Writes the cost table {(bits, rank): bytes} of every layer."""

    reads = ("graph", "groups")
    writes = ("cost",)

    def __init__(self, cost_model: CostModel | None = None, space: SearchSpace | None = None) -> None:
        self.cost_model = cost_model or CostModel()
        self.space = space or SearchSpace()

    def call(self, program: Program) -> PassResult:
        graph = program.require_graph()
        for name in graph.order():
            layer = graph.layer(name)
            graph.set_cost(name, self.cost_model.table(layer.in_features, layer.out_features, self.space.bits, self.space.ranks))
        split = _split_narrow_members(graph)
        program.state["cost_model"] = self.cost_model
        program.state["space"] = self.space
        return PassResult(info={"choices": sum(len(graph.annotation(n).cost) for n in graph.order()),
                                "split_from_groups": split})


def _split_narrow_members(graph) -> list[str]:  # type: ignore[no-untyped-def]
    """Members of a fusion group with fewer choices than the group's widest member become their own
    group; the rest keep one group (named after its members). Returns the layers split off."""
    split: list[str] = []
    for members in list(graph.groups().values()):
        if len(members) < 2:
            continue
        keys = {m: set(graph.annotation(m).cost) for m in members}
        widest = max(len(k) for k in keys.values())
        narrow = [m for m in members if len(keys[m]) < widest]
        if not narrow:
            continue
        rest = [m for m in members if m not in narrow]
        for m in narrow:
            graph.set_group(m, m)
        for m in rest:
            graph.set_group(m, rest[0] if len(rest) == 1 else "+".join(rest))
        split += narrow
        logger.info("%s left the fusion group %s: ranks above min(in, out) are not choices for it",
                    ", ".join(narrow), "+".join(members))
    return split

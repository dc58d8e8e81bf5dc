"""AssignGroupsPass: fusion groups, transformer-block index (tied weights are already one node).

Fusion group: layers reading the same activation tensor (q/k/v, gate/up) share one (bits, rank)
choice. On the module-tree route the groups come from sibling names instead (known families).
"""

from __future__ import annotations

import re

import networkx as nx

from autoqra.ir.program import Program
from autoqra.passes.base import PassBase, PassResult

_BLOCK_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")

#: sibling-name families fused when no dataflow graph is available.
NAME_FAMILIES: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"query", "key", "value"}),
    frozenset({"gate_proj", "up_proj"}),
    frozenset({"w1", "w3"}),
    frozenset({"q", "k", "v"}),
)


def block_index(name: str) -> int | None:
    """The first integer path component (``model.layers.7.mlp.up_proj`` → 7), or None."""
    match = _BLOCK_RE.search(name)
    return int(match.group(1)) if match else None


def _name_groups(names: list[str]) -> list[list[str]]:
    by_parent: dict[tuple[str, frozenset[str]], list[str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        family = next((f for f in NAME_FAMILIES if leaf in f), None)
        if family is not None:
            by_parent.setdefault((parent, family), []).append(name)
    return [members for members in by_parent.values() if len(members) > 1]


class AssignGroupsPass(PassBase):
    """Writes ``group`` and ``block`` for every layer."""

    reads = ("graph",)
    writes = ("groups",)

    def call(self, program: Program) -> PassResult:
        graph = program.require_graph()
        order = graph.order()
        inputs: dict[str, frozenset[str]] = program.state.get("layer_inputs", {})
        union = nx.Graph()
        union.add_nodes_from(order)
        if program.graph_module is not None:
            readers: dict[frozenset[str], list[str]] = {}
            for name in order:
                if inputs.get(name):
                    readers.setdefault(inputs[name], []).append(name)
            for members in readers.values():
                nx.add_path(union, members)
        else:
            for members in _name_groups(order):
                nx.add_path(union, members)
        position = {name: i for i, name in enumerate(order)}
        n_fused = 0
        for component in nx.connected_components(union):
            members = sorted(component, key=position.__getitem__)
            group = members[0] if len(members) == 1 else "+".join(members)
            n_fused += len(members) > 1
            for name in members:
                graph.set_group(name, group)
        blocks = set()
        for name in order:
            block = block_index(name)
            graph.set_block(name, block)
            blocks.add(block)
        blocks.discard(None)
        return PassResult(info={"groups": len(graph.groups()), "fused_groups": n_fused, "blocks": len(blocks)})

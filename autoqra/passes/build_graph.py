"""BuildLayerGraphPass: the captured program → `LayerGraph` (nodes, dataflow edges, inputs)."""

from __future__ import annotations

from collections import deque

from torch import fx

from autoqra.ir.graph import LayerGraph
from autoqra.ir.layer import LayerNode
from autoqra.ir.program import Program
from autoqra.passes.base import PassBase, PassResult


def _canonical(program: Program) -> dict[str, str]:
    """Module name → layer key (tied modules map to the layer that owns the weight)."""
    mapping = {}
    for layer in program.discovered.layers:
        mapping[layer.name] = layer.name
        for alias in layer.tied:
            mapping[alias] = layer.name
    return mapping


def layer_inputs(gm: fx.GraphModule, owner: dict[str, str], static: set[str]) -> dict[str, frozenset[str]]:
    """{layer: fx nodes carrying activations into it from outside the layer}."""
    inputs: dict[str, set[str]] = {}
    for node in gm.graph.nodes:
        layer = owner.get(node.name)
        if layer is None:
            continue
        for arg in node.all_input_nodes:
            if owner.get(arg.name) == layer or arg.name in static:
                continue
            inputs.setdefault(layer, set()).add(arg.name)
    return {k: frozenset(v) for k, v in inputs.items()}


def dataflow_edges(gm: fx.GraphModule, owner: dict[str, str]) -> set[tuple[str, str]]:
    """(u, v) for every pair where u's output reaches v without crossing another layer."""
    by_layer: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.name in owner:
            by_layer.setdefault(owner[node.name], []).append(node)
    edges: set[tuple[str, str]] = set()
    for src, nodes in by_layer.items():
        queue = deque(nodes)
        seen = {n.name for n in nodes}
        while queue:
            node = queue.popleft()
            for user in node.users:
                if user.name in seen:
                    continue
                seen.add(user.name)
                dst = owner.get(user.name)
                if dst is not None and dst != src:
                    edges.add((src, dst))  # stop: crossing another quantizable layer
                    continue
                queue.append(user)
    return edges


class BuildLayerGraphPass(PassBase):
    """One node per selected quantizable weight; edges from the fx dataflow (or the module order)."""

    reads = ("model", "fx")
    writes = ("graph",)

    def call(self, program: Program) -> PassResult:
        canonical = _canonical(program)
        layers: list[LayerNode] = list(program.discovered.layers)
        graph = LayerGraph()
        if program.graph_module is None:
            for index, layer in enumerate(layers):
                graph.add_layer(layer, index=index)
            for a, b in zip(layers, layers[1:], strict=False):
                graph.add_edge(a.name, b.name)
            graph.edges_exact = False
            program.state["layer_inputs"] = {}
            program.graph = graph
            return PassResult(info={"layers": len(graph), "edges": "approximate"})

        owner = {node: canonical[mod] for node, mod in program.owner.items() if mod in canonical}
        first_node: dict[str, str] = {}
        position: dict[str, int] = {}
        for pos, node in enumerate(program.graph_module.graph.nodes):
            layer = owner.get(node.name)
            if layer is not None and layer not in first_node:
                first_node[layer] = node.name
                position[layer] = pos
        # layers never called in the forward still get a node (after the called ones)
        tail = len(position) + 10**6
        ordered = sorted(layers, key=lambda ly: (position.get(ly.name, tail), ly.name))
        calls: dict[str, int] = {}
        gm = program.graph_module
        for node in gm.graph.nodes:
            layer = owner.get(node.name)
            if layer is not None and all(owner.get(a.name) != layer for a in node.all_input_nodes):
                calls[layer] = calls.get(layer, 0) + 1
        for index, layer in enumerate(ordered):
            if layer.name in first_node:
                layer = LayerNode.from_dict(
                    {**layer.to_dict(), "fx_node": first_node[layer.name], "calls": max(layer.calls, calls.get(layer.name, 1))}
                )
            graph.add_layer(layer, index=index)
        for src, dst in sorted(dataflow_edges(gm, owner)):
            graph.add_edge(src, dst)
        program.state["layer_inputs"] = layer_inputs(gm, owner, program.static_nodes)
        program.graph = graph
        unused = sorted(set(canonical.values()) - set(first_node))
        return PassResult(info={"layers": len(graph), "edges": graph.nx.number_of_edges(), "unused": unused})

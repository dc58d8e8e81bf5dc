"""`LayerGraph`: one node per quantizable weight, edges for dataflow, annotations per node."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import networkx as nx

from autoqra.errors import AutoQRAError
from autoqra.ir.layer import Choice, LayerAnnotation, LayerNode

GRAPH_FORMAT_VERSION = 1


class LayerGraph:
    """Wraps an ``nx.DiGraph`` keyed by layer name.

    Node attributes: ``layer`` (`LayerNode`), ``ann`` (`LayerAnnotation`), ``index`` (position in
    the forward, used to break ties so every order is deterministic). An edge u → v means u's
    output reaches v's input without crossing another quantizable layer.
    """

    def __init__(self) -> None:
        self._g = nx.DiGraph()
        self.edges_exact: bool = True

    # ---- construction -------------------------------------------------------------------------
    def add_layer(self, layer: LayerNode, index: int | None = None) -> None:
        if layer.name in self._g:
            raise AutoQRAError(f"layer {layer.name!r} added twice to the layer graph")
        self._g.add_node(layer.name, layer=layer, ann=LayerAnnotation(), index=len(self._g) if index is None else index)

    def add_edge(self, src: str, dst: str) -> None:
        for name in (src, dst):
            if name not in self._g:
                raise AutoQRAError(f"edge names unknown layer {name!r}")
        if src != dst:
            self._g.add_edge(src, dst)

    # ---- queries ------------------------------------------------------------------------------
    @property
    def nx(self) -> nx.DiGraph:
        """The underlying networkx graph (read it; mutate through this class)."""
        return self._g

    def __len__(self) -> int:
        return self._g.number_of_nodes()

    def __contains__(self, name: object) -> bool:
        return name in self._g

    def __iter__(self) -> Iterator[str]:
        return iter(self.order())

    def order(self) -> list[str]:
        """Deterministic order: lexicographic topological sort by forward position.

        Falls back to forward position when shared modules make the dataflow cyclic.
        """
        index = nx.get_node_attributes(self._g, "index")
        if nx.is_directed_acyclic_graph(self._g):
            return list(nx.lexicographical_topological_sort(self._g, key=lambda n: (index[n], n)))
        return sorted(self._g.nodes, key=lambda n: (index[n], n))

    def layer(self, name: str) -> LayerNode:
        return self._g.nodes[name]["layer"]

    def layers(self) -> list[LayerNode]:
        return [self.layer(n) for n in self.order()]

    def annotation(self, name: str) -> LayerAnnotation:
        return self._g.nodes[name]["ann"]

    def edges(self) -> list[tuple[str, str]]:
        return sorted(self._g.edges)

    def successors(self, name: str) -> list[str]:
        return sorted(self._g.successors(name))

    def predecessors(self, name: str) -> list[str]:
        return sorted(self._g.predecessors(name))

    def groups(self) -> dict[str, list[str]]:
        """{group name: member layers in order}; every layer belongs to exactly one group."""
        out: dict[str, list[str]] = {}
        for name in self.order():
            group = self.annotation(name).group or name
            out.setdefault(group, []).append(name)
        return out

    def total_numel(self) -> int:
        return sum(layer.numel for layer in self.layers())

    # ---- typed writers (the only way passes change annotations) -------------------------------
    def set_group(self, name: str, group: str) -> None:
        self.annotation(name).group = group

    def set_block(self, name: str, block: int | None) -> None:
        self.annotation(name).block = block

    def set_cost(self, name: str, table: dict[Choice, int]) -> None:
        self.annotation(name).cost = dict(sorted(table.items()))

    def set_error(self, name: str, table: dict[Choice, float]) -> None:
        self.annotation(name).error = dict(sorted(table.items()))

    def set_choice(self, name: str, bits: int, rank: int) -> None:
        ann = self.annotation(name)
        if ann.cost and (bits, rank) not in ann.cost:
            raise AutoQRAError(f"choice {(bits, rank)} of {name!r} is not in its cost table {sorted(ann.cost)}")
        ann.bits, ann.rank = bits, rank

    def filter(self, keep: Iterable[str]) -> LayerGraph:
        """A new graph with only ``keep`` (annotations copied; edges induced)."""
        keep_set = set(keep)
        new = LayerGraph()
        new.edges_exact = self.edges_exact
        for name in self.order():
            if name in keep_set:
                new.add_layer(self.layer(name), index=self._g.nodes[name]["index"])
                new._g.nodes[name]["ann"] = LayerAnnotation.from_dict(self.annotation(name).to_dict())
        for u, v in self._g.edges:
            if u in keep_set and v in keep_set:
                new.add_edge(u, v)
        return new

    # ---- serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": GRAPH_FORMAT_VERSION,
            "edges_exact": self.edges_exact,
            "nodes": [
                {
                    "index": self._g.nodes[n]["index"],
                    "layer": self.layer(n).to_dict(),
                    "annotation": self.annotation(n).to_dict(),
                }
                for n in self.order()
            ],
            "edges": [list(e) for e in self.edges()],
        }

    def to_json(self, *, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerGraph:
        version = data.get("format_version")
        if version != GRAPH_FORMAT_VERSION:
            raise AutoQRAError(
                f"layer graph format version {version!r} is not supported (this autoqra reads "
                f"{GRAPH_FORMAT_VERSION}); rebuild the graph with this version"
            )
        graph = cls()
        graph.edges_exact = bool(data.get("edges_exact", True))
        for node in data["nodes"]:
            layer = LayerNode.from_dict(node["layer"])
            graph.add_layer(layer, index=int(node["index"]))
            graph._g.nodes[layer.name]["ann"] = LayerAnnotation.from_dict(node["annotation"])
        for src, dst in data["edges"]:
            graph.add_edge(src, dst)
        return graph

    @classmethod
    def from_json(cls, text: str) -> LayerGraph:
        return cls.from_dict(json.loads(text))

    def __repr__(self) -> str:
        return f"LayerGraph({len(self)} layers, {self._g.number_of_edges()} edges, {len(self.groups())} groups)"

"""`Program`: the model plus everything the passes learn about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from autoqra.ir.graph import LayerGraph


@dataclass
class Program:
    """What flows through the pass pipeline.

    Attributes:
        model: the user's module (changed in place only by MaterializePass).
        graph_module: the captured torch.fx graph, or None for the module-tree route.
        route: capture route taken (``export`` / ``fx`` / ``module_tree``).
        owner: fx node name → quantizable module name that computes it (graph routes).
        static_nodes: fx node names that depend only on parameters/constants (not activations).
        layer_names: the selected quantizable layers, in definition order.
        skipped: recognized layers not selected (embeddings, lm_head, excluded).
        graph: the `LayerGraph`, once BuildLayerGraphPass ran.
        attempts: [(route, outcome message)] for every route tried.
        state: free-form results of passes (calibration statistics, plan, timings ...).
    """

    model: nn.Module
    graph_module: fx.GraphModule | None
    route: str
    owner: dict[str, str] = field(default_factory=dict)
    static_nodes: set[str] = field(default_factory=set)
    layer_names: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    graph: LayerGraph | None = None
    attempts: list[tuple[str, str]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    discovered: Any = None  # autoqra.ir.discover.Discovery

    def require_graph(self) -> LayerGraph:
        if self.graph is None:
            from autoqra.errors import PassOrderError

            raise PassOrderError("the layer graph is not built yet: run BuildLayerGraphPass first")
        return self.graph

"""`analyze`: capture a model and run the cheap front half of the compiler (no weight changes).

capture → BuildLayerGraphPass → AssignGroupsPass → AnnotateCostPass. Used by `compile`, by the
``estimate`` CLI and by the demo. Works on ``meta``-device models: only shapes are read.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from autoqra.config import SearchSpace
from autoqra.ir.capture import CaptureConfig, capture
from autoqra.ir.cost import CostModel
from autoqra.ir.discover import layer_kind
from autoqra.ir.graph import LayerGraph
from autoqra.ir.layer import LayerKind
from autoqra.ir.program import Program
from autoqra.passes import AnnotateCostPass, AssignGroupsPass, BuildLayerGraphPass, PassManager


def analyze(
    model: nn.Module,
    example_inputs: tuple | dict | None = None,
    *,
    capture_config: CaptureConfig | None = None,
    cost_model: CostModel | None = None,
    space: SearchSpace | None = None,
) -> Program:
    """Capture ``model`` and annotate its layer graph with groups, blocks and costs."""
    program = capture(model, example_inputs, config=capture_config)
    PassManager([BuildLayerGraphPass(), AssignGroupsPass(), AnnotateCostPass(cost_model, space)]).run(program)
    return program


@dataclass(frozen=True)
class UniformCost:
    """Bytes of a uniform plan (every layer at the same bits and rank)."""

    bits: int
    rank: int
    nbytes: int
    bits_per_weight: float


def uniform_costs(
    graph: LayerGraph, cost_model: CostModel, bits: tuple[int, ...], rank: int = 0
) -> list[UniformCost]:
    """The bytes of uniform plans at each of ``bits`` with ``rank`` (clamped per layer)."""
    n = graph.total_numel()
    out = []
    for b in bits:
        total = 0
        for layer in graph.layers():
            r = min(rank, layer.in_features, layer.out_features)
            total += cost_model.layer_bytes(layer.in_features, layer.out_features, b, r)
        out.append(UniformCost(b, rank, total, 8 * total / n))
    return out


def min_feasible_bytes(graph: LayerGraph) -> int:
    """The smallest budget any plan over the annotated cost tables can fit."""
    return sum(min(graph.annotation(n).cost.values()) for n in graph.order())


def untouched_bytes(model: nn.Module, graph: LayerGraph, tied_embedding: str = "share") -> int:
    """Bytes of the parameters and buffers the rewrite leaves as they are (biases included). A weight
    tied to a module of another kind (the embedding of a tied ``lm_head``) stays with
    ``tied_embedding="keep"`` (that module keeps its float weight for the lookup, so it counts here, once,
    although its alias is quantized); with ``"share"`` (the default) the embedding reads the compiled
    layer's rows and holds nothing of its own. Call it on the model before the rewrite."""
    from autoqra.modules.tied_embedding import shareable

    modules = dict(model.named_modules(remove_duplicate=False))
    touched = set()
    for layer in graph.layers():
        touched.add(f"{layer.name}.weight")
        for alias in layer.tied:
            module = modules.get(alias)
            if module is None:
                continue
            if layer_kind(module) is layer.kind or (
                    tied_embedding == "share" and layer.kind is not LayerKind.EMBEDDING and shareable(module) is None):
                touched.add(f"{alias}.weight")
    names: dict[int, tuple[object, list[str]]] = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        names.setdefault(id(tensor), (tensor, []))[1].append(name)
    return sum(t.numel() * t.element_size() for t, ns in names.values() if any(n not in touched for n in ns))

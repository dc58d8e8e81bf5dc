"""Fuse the quantized layers that read the same input into one ``MatMulNBits`` (an onnx_ir pass).

q/k/v read the same normalized hidden state, and gate/up the same MLP input. Exported one node per
layer, each pays ``MatMulNBits``'s fixed cost (quantizing the activations to int8 at
``accuracy_level`` 4, dispatching to the thread pool) and its own side path (adapter + zero-fraction
product, ~4 small nodes). At batch 1 that fixed cost, not the weights' bytes, is most of a small
layer's time. This pass rewrites each such group into

    y = MatMulNBits([B_1; …; B_m])(x) + [x @ [A_1 | … | A_m] | Σ_group x] @ R,   then Split(y) → y_1 … y_m

where ``R`` stacks each layer's ``(scaling · B_i)^T`` in its own columns (zeros elsewhere) over the
fractions' rows ``[-(fraction_1 · scale_1)^T | … ]``. Every tensor is assembled *in the graph* from
the layers' own initializers (``Concat`` / ``Pad`` / ``Cast``, folded by onnxruntime when it loads
the file), so the file keeps each layer's codes, scales, zero points and adapters under their own
names — adapters stay swappable — and its size does not change. What it computes is the same sum
in another order (exact up to float rounding; the export's verification checks it).

Fused only when every member has the same ``K``, ``bits``, ``block_size`` and ``accuracy_level``, the
same zero-fraction presence, and the structure :mod:`autoqra.export.ops` emits; any other group is
left as it is.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["fuse_shared_inputs"]

logger = logging.getLogger(__name__)

_MS = "com.microsoft"



@dataclass
class _Member:
    node: Any  # the MatMulNBits node
    prefix: str  # the layer's initializer prefix (``<layer>.``)
    n: int
    output: Any  # the value the layer's consumers read before its bias


def _attrs(node: Any) -> tuple[int, int, int, int]:
    a = node.attributes
    return (a["K"].value, a["bits"].value, a["block_size"].value, a["accuracy_level"].value if "accuracy_level" in a
            else 0)


def _member(node: Any, initializers: dict[str, Any]) -> _Member | None:
    """The layer behind one ``MatMulNBits`` node, or None when it is not the form ops.py emits."""
    weight = node.inputs[1]
    if weight is None or weight.name is None or not weight.name.endswith(".qweight") or weight.name not in initializers:
        return None
    prefix = weight.name[: -len("qweight")]
    scales = node.inputs[2]
    source = scales.producer() if scales is not None else None
    if scales is None or (prefix + "scales") not in initializers or not (scales.name == prefix + "scales" or (
            source is not None and source.op_type in ("Cast", "CastLike") and source.inputs[0] is not None
            and source.inputs[0].name == prefix + "scales")):
        return None
    if len(node.inputs) < 4 or node.inputs[3] is None or node.inputs[3].name not in initializers:
        return None
    has_side = (prefix + "lora_A_t") in initializers or (prefix + "zero_fraction") in initializers
    y = node.outputs[0]
    if not has_side:
        return _Member(node, prefix, node.attributes["N"].value, y)
    uses = list(y.uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx]
    matmul = other.producer() if other is not None else None
    if matmul is None or matmul.op_type != "MatMul":
        return None
    return _Member(node, prefix, node.attributes["N"].value, add.outputs[0])


class _Builder:
    """Appends nodes (and small int64 constants) for one fused group."""

    def __init__(self, graph: Any, tag: str) -> None:
        self.graph, self.tag, self.nodes = graph, tag, []
        self._count = 0

    def const(self, values: list[int]) -> Any:
        import onnx_ir as ir

        self._count += 1
        value = ir.Value(name=f"{self.tag}.const{self._count}", const_value=ir.tensor(np.array(values, dtype=np.int64)))
        self.graph.register_initializer(value)
        return value

    def op(self, op_type: str, inputs: list[Any], domain: str = "", num_outputs: int = 1, **attributes: Any) -> Any:
        import onnx_ir as ir

        node = ir.Node(domain, op_type, inputs, ir.convenience.convert_attributes(attributes),
                       num_outputs=num_outputs, name=f"{self.tag}.{op_type}_{len(self.nodes)}")
        self.nodes.append(node)
        return node.outputs if num_outputs > 1 else node.outputs[0]


def _fuse(graph: Any, x: Any, members: list[_Member], initializers: dict[str, Any], index: int) -> None:
    import onnx_ir as ir

    k, bits, block, level = _attrs(members[0].node)
    dtype = x.dtype  # a Cast to a fixed type, not CastLike(·, x): the casts must read only initializers to fold
    n_blocks = -(-k // block)
    total = sum(m.n for m in members)
    b = _Builder(graph, f"autoqra_fused_{index}")
    first = members[0].node
    weight = b.op("Concat", [m.node.inputs[1] for m in members], axis=0)
    # each layer's fp16 scales cast here (the old casts sit beside the old nodes, later in the graph)
    member_scales = [b.op("Cast", [initializers[m.prefix + "scales"]], to=dtype) for m in members]
    scales = b.op("Concat", member_scales, axis=0)
    zeros = b.op("Concat", [m.node.inputs[3] for m in members], axis=0)
    y = b.op("MatMulNBits", [x, weight, scales, zeros], domain=_MS, K=k, N=total, bits=bits, block_size=block,
             accuracy_level=level)

    fractions = (members[0].prefix + "zero_fraction") in initializers
    left, right = [], []
    with_adapter = [m for m in members if (m.prefix + "lora_A_t") in initializers]
    if with_adapter:  # x @ [A_1^T | … ] for the layers with an adapter
        a_all = b.op("Concat", [initializers[m.prefix + "lora_A_t"] for m in with_adapter], axis=1)
        left.append(b.op("MatMul", [x, a_all]))
        before = 0
        offsets = {}
        for m in members:
            offsets[m.prefix] = before
            before += m.n
        for m in with_adapter:  # (scaling·B_i)^T [r_i, N_i] padded into its own columns
            pads = b.const([0, offsets[m.prefix], 0, total - offsets[m.prefix] - m.n])
            right.append(b.op("Pad", [initializers[m.prefix + "lora_B_t"], pads]))
    if fractions:
        rank = len(x.shape)
        xs = x
        if n_blocks * block != k:
            xs = b.op("Pad", [x, b.const([0] * (2 * rank - 1) + [n_blocks * block - k])], mode="constant")
        # the attributes ops.py's translation writes, so that common-subexpression elimination can share
        # these group sums with a layer on the same input that stays unfused
        grouped = b.op("Reshape", [xs, b.const([0] * (rank - 1) + [n_blocks, block])], allowzero=0)
        left.append(b.op("ReduceSum", [grouped, b.const([-1])], noop_with_empty_axes=0, keepdims=0))
        blocks = []
        for m, member_scale in zip(members, member_scales, strict=True):
            fraction = b.op("Cast", [initializers[m.prefix + "zero_fraction"]], to=dtype)
            scale = b.op("Reshape", [member_scale, b.const([m.n, n_blocks])])
            blocks.append(b.op("Neg", [b.op("Transpose", [b.op("Mul", [fraction, scale])], perm=[1, 0])]))
        right.append(b.op("Concat", blocks, axis=1))
    if left:
        h = left[0] if len(left) == 1 else b.op("Concat", left, axis=-1)
        r = right[0] if len(right) == 1 else b.op("Concat", right, axis=0)
        y = b.op("Add", [y, b.op("MatMul", [h, r])])
    parts = b.op("Split", [y, b.const([m.n for m in members])], axis=-1, num_outputs=len(members))
    graph.insert_before(first, b.nodes)
    for m, part in zip(members, parts, strict=True):
        name = m.output.name
        if m.output.is_graph_output():  # e.g. an lm_head's logits: the new value takes the output's name
            m.output.name = name + "_unfused"
            part.name = name
        else:
            part.name = name + "_fused"
        ir.convenience.replace_all_uses_with(m.output, part, replace_graph_outputs=True)


def fuse_shared_inputs(model: Any) -> int:
    """Rewrite, in place, each group of ``MatMulNBits`` layers that read one input (see the module
    docstring); returns the number of groups fused. Unused nodes are left for the caller's clean-up."""
    graph = model.graph
    initializers = dict(graph.initializers)
    groups: dict[tuple[int, tuple[int, int, int, int], bool], list[_Member]] = defaultdict(list)
    inputs: dict[int, Any] = {}
    for node in graph:
        if node.op_type != "MatMulNBits" or node.domain != _MS or node.inputs[0] is None:
            continue
        member = _member(node, initializers)
        if member is None:
            continue
        x = node.inputs[0]
        fraction = (member.prefix + "zero_fraction") in initializers
        if x.dtype is None or (fraction and x.shape is None):  # the casts need its dtype, the group sums its rank
            continue
        groups[(id(x), _attrs(node), fraction)].append(member)
        inputs[id(x)] = x
    fused = 0
    for (key, _, _), members in groups.items():
        if len(members) < 2:
            continue
        _fuse(graph, inputs[key], members, initializers, fused)
        fused += 1
    logger.debug("fused %d groups of MatMulNBits layers that share an input", fused)
    return fused

"""``autoqra::quant_linear``: a whole exported quantized layer (onnxruntime's ``com.microsoft::MatMulNBits``
+ side path + bias) as one PyTorch op, and its ONNX translation.

During export every packed 2/4/8-bit layer (and a 3-bit one, in a 4-bit container) calls
``quant_linear``; the exporter translates it into ``MatMulNBits`` with the same tensors (so the ONNX
file holds autoqra's own codes, scales and zero points — nothing is re-quantized from float) plus
the side path's few standard nodes. One op per layer instead of the ~15 aten ops of its decomposed
form keeps torch's tracing, decompositions and ONNX translation short (SmolLM2, uniform 4-bit r8, one
run each under cProfile on a 2-core VM: the export 202 → 136 s) and writes the same graph after
onnxruntime's load-time optimization (3,181 against 3,183 nodes, the same initializers).

The base product's semantics are ``MatMulNBits``'s (:func:`matmul_nbits`): ``Y = A @ W^T`` with ``W[n, k] = (q[n, k] - zp[n, g]) *
scales[n, g]``, ``g = k // block_size``; ``b`` is ``uint8 [N, n_blocks, block_size * bits / 8]``
(codes packed little-endian inside each byte: exactly autoqra's packed layout for 2/4/8 bits, see
:mod:`autoqra.quant.pack`); ``scales`` ``[N * n_blocks]`` in the activation dtype; ``zero_points``
``[N * n_blocks]`` in the activation dtype (fractional zero points) or uint8 (packed like the
codes, one row per output). Its PyTorch implementation (dequantize, then multiply) is, with the side
path, the reference the exported file is checked against.

ONNX has no schema for Microsoft's contrib ops, and onnxscript needs one to emit a node: the
schema below declares ``MatMulNBits`` as onnxruntime documents it (the inputs we use and the
attributes ``K``, ``N``, ``bits``, ``block_size``, ``accuracy_level``).
"""

from __future__ import annotations

from typing import Any

import torch

from autoqra.quant.pack import unpack

__all__ = ["contrib_op", "matmul_nbits", "onnx_translation_table", "quant_linear"]

MS_DOMAIN = "com.microsoft"


def matmul_nbits(a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, k: int, n: int,
                 bits: int, block_size: int) -> torch.Tensor:
    """Reference implementation of ``MatMulNBits`` in PyTorch (see the module docstring; the op's
    ``accuracy_level`` only changes onnxruntime's compute precision, not what it computes)."""
    n_blocks = b.shape[1]
    k_pad = n_blocks * block_size
    codes = unpack(b.reshape(-1), bits, n * k_pad).view(n, n_blocks, block_size).to(a.dtype)
    if zero_points.dtype == torch.uint8:
        per_row = zero_points.numel() // n
        zp = unpack(zero_points.reshape(-1), bits, n * per_row * 8 // bits).view(n, -1)[:, :n_blocks]
        zp = zp.to(a.dtype)
    else:
        zp = zero_points.view(n, n_blocks).to(a.dtype)
    w = ((codes - zp.unsqueeze(-1)) * scales.view(n, n_blocks, 1).to(a.dtype)).view(n, k_pad)[:, :k]
    return a @ w.T


def side_path(x: torch.Tensor, scales: torch.Tensor | None, zero_fraction: torch.Tensor | None,
              lora_a_t: torch.Tensor | None, lora_b_t: torch.Tensor | None, block_size: int) -> torch.Tensor | None:
    """The low-rank term ``[x @ A^T | Σ_group x] @ [B_t ; -(fraction · scale)^T]`` beside the base product:
    the adapter and the zero-point fraction's correction share one product (None when there is neither)."""
    left: list[torch.Tensor] = []
    right: list[torch.Tensor] = []
    if lora_a_t is not None and lora_b_t is not None:
        left.append(x @ lora_a_t.to(x.dtype))
        right.append(lora_b_t.to(x.dtype))
    if zero_fraction is not None and scales is not None:
        n, n_blocks = zero_fraction.shape
        pad = n_blocks * block_size - x.shape[-1]
        xs = torch.nn.functional.pad(x, (0, pad)) if pad else x
        left.append(xs.reshape(*x.shape[:-1], n_blocks, block_size).sum(-1))
        right.append(-(zero_fraction.to(x.dtype) * scales.view(n, n_blocks).to(x.dtype)).T)
    if not left:
        return None
    h = left[0] if len(left) == 1 else torch.cat(left, dim=-1)
    q = right[0] if len(right) == 1 else torch.cat(right, dim=0)
    return h @ q


@torch.library.custom_op("autoqra::quant_linear", mutates_args=())
def quant_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    zero_fraction: torch.Tensor | None,
    lora_a_t: torch.Tensor | None,
    lora_b_t: torch.Tensor | None,
    bias: torch.Tensor | None,
    k: int,
    n: int,
    bits: int,
    block_size: int,
    accuracy_level: int,
) -> torch.Tensor:
    """A whole exported quantized layer as one op: ``MatMulNBits(x) + side path + bias`` (see
    :func:`side_path`; ``scales`` fp16 as stored, cast to ``x``'s dtype). One node in the traced graph
    instead of ~15 keeps torch's export, its decompositions and the ONNX translation short; the
    translation emits the same ONNX nodes the decomposed form would."""
    y = matmul_nbits(x, qweight, scales.to(x.dtype), zero_points, k, n, bits, block_size)
    side = side_path(x, scales, zero_fraction, lora_a_t, lora_b_t, block_size)
    if side is not None:
        y = y + side
    return y if bias is None else y + bias.to(x.dtype)


@quant_linear.register_fake
def _(x, qweight, scales, zero_points, zero_fraction, lora_a_t, lora_b_t, bias, k, n, bits, block_size,  # type: ignore[no-untyped-def]
      accuracy_level):
    return x.new_empty(*x.shape[:-1], n)


def contrib_op(name: str, doc: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]],
               types: list[tuple[str, list[str], str]], attributes: dict[str, str]) -> Any:
    """An onnxscript ``Op`` for an onnxruntime contrib op (``com.microsoft``, version 1): ONNX has no schema
    for them, and onnxscript needs one to emit a node. ``inputs``/``outputs``: ``(name, type variable)``, a
    name ending in ``?`` is optional; ``attributes``: ``{name: "INT" | "FLOAT"}``."""
    import onnxscript
    from onnx.defs import OpSchema

    def param(name: str, type_var: str) -> Any:
        if name.endswith("?"):
            return OpSchema.FormalParameter(name[:-1], type_var, param_option=OpSchema.FormalParameterOption.Optional)
        return OpSchema.FormalParameter(name, type_var)

    schema = OpSchema(
        name, MS_DOMAIN, 1, doc=doc,
        inputs=[param(*i) for i in inputs], outputs=[param(*o) for o in outputs], type_constraints=types,
        attributes=[OpSchema.Attribute(a, getattr(OpSchema.AttrType, kind), "") for a, kind in attributes.items()],
    )
    return onnxscript.values.Op(onnxscript.values.Opset(MS_DOMAIN, 1), name, schema)


def _matmul_nbits_op() -> Any:
    """``MatMulNBits`` as onnxruntime documents it (the inputs and attributes used here)."""
    return contrib_op(
        "MatMulNBits", "onnxruntime contrib op: A @ dequantize(B)^T with blockwise n-bit weights",
        inputs=[("A", "T1"), ("B", "T2"), ("scales", "T1"), ("zero_points?", "T3")],
        outputs=[("Y", "T1")],
        types=[("T1", ["tensor(float)", "tensor(float16)"], "activations and scales"),
               ("T2", ["tensor(uint8)"], "packed codes"),
               ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], "zero points")],
        attributes=dict.fromkeys(("K", "N", "bits", "block_size", "accuracy_level"), "INT"),
    )


def onnx_translation_table() -> dict[Any, Any]:
    """``{torch op: onnxscript function}`` for ``torch.onnx.export(custom_translation_table=...)``."""
    matmul_nbits_op = _matmul_nbits_op()

    def quant_linear_onnx(x, qweight, scales, zero_points, zero_fraction, lora_a_t, lora_b_t, bias,  # type: ignore[no-untyped-def]
                          k: int, n: int, bits: int, block_size: int, accuracy_level: int):
        from onnxscript.onnx_opset import opset18 as op

        s = op.CastLike(scales, x)
        y = matmul_nbits_op(x, qweight, s, zero_points, K=k, N=n, bits=bits, block_size=block_size,
                            accuracy_level=accuracy_level)
        left, right = [], []
        if lora_a_t is not None and lora_b_t is not None:
            left.append(op.MatMul(x, lora_a_t))
            right.append(lora_b_t)
        if zero_fraction is not None:
            rank = len(x.shape)
            n_blocks = -(-k // block_size)
            xs = x
            if n_blocks * block_size != k:
                pads = [0] * (2 * rank)
                pads[-1] = n_blocks * block_size - k
                xs = op.Pad(x, op.Constant(value_ints=pads))
            grouped = op.Reshape(xs, op.Constant(value_ints=[0] * (rank - 1) + [n_blocks, block_size]))
            left.append(op.ReduceSum(grouped, op.Constant(value_ints=[-1]), keepdims=0))
            residual = op.Mul(op.CastLike(zero_fraction, x), op.Reshape(s, op.Constant(value_ints=[n, n_blocks])))
            right.append(op.Neg(op.Transpose(residual, perm=[1, 0])))
        if left:
            h = left[0] if len(left) == 1 else op.Concat(*left, axis=-1)
            q = right[0] if len(right) == 1 else op.Concat(*right, axis=0)
            y = op.Add(y, op.MatMul(h, q))
        return y if bias is None else op.Add(y, bias)

    return {torch.ops.autoqra.quant_linear.default: quant_linear_onnx}

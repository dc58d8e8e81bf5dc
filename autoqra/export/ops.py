"""``autoqra::matmul_nbits``: the PyTorch op that stands for onnxruntime's ``com.microsoft::MatMulNBits``.

During export every packed 2/4/8-bit base (and a 3-bit one, in a 4-bit container) calls this op;
the exporter translates it one-to-one into ``MatMulNBits`` with the same tensors, so the ONNX file
holds autoqra's own codes, scales and zero points — nothing is re-quantized from float.

The op's semantics are ``MatMulNBits``'s: ``Y = A @ W^T`` with ``W[n, k] = (q[n, k] - zp[n, g]) *
scales[n, g]``, ``g = k // block_size``; ``b`` is ``uint8 [N, n_blocks, block_size * bits / 8]``
(codes packed little-endian inside each byte: exactly autoqra's packed layout for 2/4/8 bits, see
:mod:`autoqra.quant.pack`); ``scales`` ``[N * n_blocks]`` in the activation dtype; ``zero_points``
``[N * n_blocks]`` in the activation dtype (fractional zero points) or uint8 (packed like the
codes, one row per output). Its PyTorch implementation (dequantize, then multiply) is the
reference the exported file is checked against.

ONNX has no schema for Microsoft's contrib ops, and onnxscript needs one to emit a node: the
schema below declares ``MatMulNBits`` as onnxruntime documents it (the inputs we use and the
attributes ``K``, ``N``, ``bits``, ``block_size``, ``accuracy_level``).
"""

from __future__ import annotations

from typing import Any

import torch

from autoqra.quant.pack import unpack

__all__ = ["matmul_nbits", "onnx_translation_table"]

MS_DOMAIN = "com.microsoft"


@torch.library.custom_op("autoqra::matmul_nbits", mutates_args=())
def matmul_nbits(
    a: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    k: int,
    n: int,
    bits: int,
    block_size: int,
    accuracy_level: int,
) -> torch.Tensor:
    """Reference implementation of ``MatMulNBits`` (see the module docstring)."""
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


@matmul_nbits.register_fake
def _(a, b, scales, zero_points, k, n, bits, block_size, accuracy_level):  # type: ignore[no-untyped-def]
    return a.new_empty(*a.shape[:-1], n)


def _schema() -> Any:
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    return OpSchema(
        "MatMulNBits",
        MS_DOMAIN,
        1,
        doc="onnxruntime contrib op: A @ dequantize(B)^T with blockwise n-bit weights",
        inputs=[
            param("A", "T1"),
            param("B", "T2"),
            param("scales", "T1"),
            param("zero_points", "T3", param_option=optional),
        ],
        outputs=[param("Y", "T1")],
        type_constraints=[
            ("T1", ["tensor(float)", "tensor(float16)"], "activations and scales"),
            ("T2", ["tensor(uint8)"], "packed codes"),
            ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], "zero points"),
        ],
        attributes=[
            OpSchema.Attribute(name, OpSchema.AttrType.INT, "")
            for name in ("K", "N", "bits", "block_size", "accuracy_level")
        ],
    )


def onnx_translation_table() -> dict[Any, Any]:
    """``{torch op: onnxscript function}`` for ``torch.onnx.export(custom_translation_table=...)``."""
    import onnxscript

    matmul_nbits_op = onnxscript.values.Op(onnxscript.values.Opset(MS_DOMAIN, 1), "MatMulNBits", _schema())

    def matmul_nbits_onnx(a, b, scales, zero_points, k: int, n: int, bits: int, block_size: int,  # type: ignore[no-untyped-def]
                          accuracy_level: int):
        return matmul_nbits_op(a, b, scales, zero_points, K=k, N=n, bits=bits, block_size=block_size,
                               accuracy_level=accuracy_level)

    return {torch.ops.autoqra.matmul_nbits.default: matmul_nbits_onnx}

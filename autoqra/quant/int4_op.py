"""The int4 kernel product as one opaque op, so that ``torch.compile`` keeps it whole.

Eager code calls torch's int4 kernels directly (``_weight_int4pack_mm_for_cpu`` on the CPU,
tinygemm's ``_weight_int4pack_mm`` on CUDA). Under ``torch.compile`` the layer calls
:func:`int4_mm` instead, a ``torch.library`` custom op that dispatches to the same kernels. Two
reasons:

* inductor's own lowering of the CPU kernel (torch 2.13) asserts that the scale/offset tensor is a
  stored buffer; the layer derives that tensor from ``scale`` / ``zero`` inside the graph (it is not
  held: budget == memory), so the lowering fails with ``LoweringException: AssertionError:
  Pointwise``. A custom op is a fallback kernel to inductor, whose inputs are always realized;
* one op for both devices keeps the compiled graph the same on the CPU and on a GPU, where
  ``mode="reduce-overhead"`` replays it as a CUDA graph (the batch-1 layer is launch-bound eager).

The op is not used in eager mode: a custom op costs a few microseconds of dispatch per call.
"""

from __future__ import annotations

import torch

from autoqra.quant import int4_cuda

__all__ = ["int4_mm", "product"]


def product(x: torch.Tensor, layout: torch.Tensor, group_size: int, scale_offset: torch.Tensor) -> torch.Tensor:
    """``x [M, K] (bf16) @ W^T`` from 4-bit codes held in torch's int4 kernel layout of the layout's
    device (CPU: ``uint8 [N, K / 2]``; CUDA: ``int32 [N / 8, K / (16 t), 32, t / 2]``) with bf16
    ``[groups, N, 2]`` (scale, offset) pairs; returns ``[M, N]`` in ``x``'s dtype. The eager call."""
    if layout.device.type == "cuda":
        return int4_cuda.kernel_mm(x, layout, group_size, scale_offset)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, layout, group_size, scale_offset)


@torch.library.custom_op("autoqra::int4_mm", mutates_args=())
def int4_mm(x: torch.Tensor, layout: torch.Tensor, group_size: int, scale_offset: torch.Tensor) -> torch.Tensor:
    """:func:`product` as one opaque op (what a layer calls while ``torch.compile`` traces it)."""
    return product(x, layout, group_size, scale_offset)


@int4_mm.register_fake
def _int4_mm_fake(x: torch.Tensor, layout: torch.Tensor, group_size: int,
                  scale_offset: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], scale_offset.shape[1])

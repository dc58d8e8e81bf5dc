"""torch's CPU int4 kernel layout (``_weight_int4pack_mm_for_cpu``), encoded and decoded here.

The kernel reads 4-bit codes ``c`` of a weight ``[N, K]`` from a ``uint8 [N, K / 2]`` tensor laid
out in blocks of 64 output rows: inside block ``b`` the byte at ``(k, n)`` (``n < 32``) holds row
``64 b + n`` in its low nibble and row ``64 b + 32 + n`` in its high nibble, both at column ``k``.
That is exactly as many bytes as autoqra's packed 4-bit codes, so a 4-bit layer can *hold* its
codes in this layout instead of the packed one (no second copy): the kernel runs on it directly,
and :func:`decode` turns any run of 64-row blocks back into codes (for the backward pass, saving,
export). The layout is fixed for ``N % 64 == 0``; other widths are not eligible.

:func:`layout_matches_torch` checks the encoding against torch's own converter once per process,
so a change of layout in a future torch disables the path instead of computing garbage.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["BLOCK_N", "decode", "encode", "kernel_available", "layout_matches_torch"]

#: output rows per layout block
BLOCK_N = 64


def kernel_available() -> bool:
    """torch has the CPU int4 matmul and its weight converter."""
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


def encode(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[N, K]`` (``N % 64 == 0``, ``K`` even) → the kernel layout ``uint8 [N, K / 2]``."""
    n, k = codes.shape
    if n % BLOCK_N or k % 2:
        raise ValueError(f"int4 layout needs N % {BLOCK_N} == 0 and an even K, got {tuple(codes.shape)}")
    blocks = codes.to(torch.uint8).reshape(n // BLOCK_N, 2, BLOCK_N // 2, k)
    lo, hi = blocks[:, 0].transpose(1, 2), blocks[:, 1].transpose(1, 2)  # [blocks, K, 32]
    return (lo | (hi << 4)).reshape(n, k // 2).contiguous()


def decode(layout: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows ``start:stop`` (multiples of 64) of the codes held in the kernel layout, ``uint8 [rows, K]``."""
    n, half_k = layout.shape
    stop = n if stop is None else stop
    if start % BLOCK_N or stop % BLOCK_N or not 0 <= start <= stop <= n:
        raise ValueError(f"decode rows must be whole {BLOCK_N}-row blocks inside [0, {n}], got {start}:{stop}")
    k = 2 * half_k
    blocks = layout[start:stop].reshape((stop - start) // BLOCK_N, k, BLOCK_N // 2)
    lo, hi = (blocks & 15).transpose(1, 2), (blocks >> 4).transpose(1, 2)  # [blocks, 32, K]
    return torch.cat([lo, hi], dim=1).reshape(stop - start, k)


@functools.cache
def layout_matches_torch() -> bool:
    """Whether :func:`encode` reproduces torch's converter (probed once on a 128 × 192 weight)."""
    if not kernel_available():
        return False
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (128, 192), generator=gen, dtype=torch.int32)
    try:
        reference = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    except RuntimeError:
        return False
    return reference.dtype == torch.uint8 and torch.equal(reference, encode(codes))

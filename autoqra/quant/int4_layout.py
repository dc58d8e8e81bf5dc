"""torch's CPU int4 kernel layout (``_weight_int4pack_mm_for_cpu``), encoded and decoded here.

The kernel reads 4-bit codes ``c`` of a weight ``[N, K]`` from a ``uint8 [N, K / 2]`` tensor laid
out in blocks of ``B`` output rows: inside block ``b`` the byte at ``(k, n)`` (``n < B / 2``) holds row
``B b + n`` in its low nibble and row ``B b + B / 2 + n`` in its high nibble, both at column ``k``.
``B`` depends on the CPU torch runs on: 64 under AVX-512, 32 under AVX2 (`block_n` probes torch's
converter once).
That is exactly as many bytes as autoqra's packed 4-bit codes, so a 4-bit layer can *hold* its
codes in this layout instead of the packed one (no second copy): the kernel runs on it directly,
and :func:`decode` turns any run of 64-row blocks back into codes (for the backward pass, saving,
export). The layout is fixed for ``N % B == 0``; other widths are not eligible.

:func:`layout_matches_torch` checks the encoding against torch's own converter once per process,
so a change of layout in a future torch disables the path instead of computing garbage.
"""

from __future__ import annotations

import torch

__all__ = ["block_n", "decode", "encode", "kernel_available", "layout_matches_torch"]

#: block sizes torch's CPU converter uses (AVX-512, AVX2), tried in this order
_BLOCKS = (64, 32)


def kernel_available() -> bool:
    """torch has the CPU int4 matmul and its weight converter."""
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


def _encode(codes: torch.Tensor, block: int) -> torch.Tensor:
    n, k = codes.shape
    if n % block or k % 2:
        raise ValueError(f"int4 layout needs N % {block} == 0 and an even K, got {tuple(codes.shape)}")
    blocks = codes.to(torch.uint8).reshape(n // block, 2, block // 2, k)
    lo, hi = blocks[:, 0].transpose(1, 2), blocks[:, 1].transpose(1, 2)  # [blocks, K, block / 2]
    return (lo | (hi << 4)).reshape(n, k // 2).contiguous()


#: the probe's answer, once known. A plain memo rather than ``functools.cache``: ``torch.compile`` traces
#: through a cache wrapper (it would run the probe inside the graph) but reads a filled global as a constant
_PROBED: dict[str, int | None] = {}


def _probed_block() -> int | None:
    """The block size whose encoding reproduces torch's converter on this CPU (probed once on a
    128 × 192 weight), or None when the converter is missing or matches no known layout."""
    if "block" not in _PROBED:
        _PROBED["block"] = _probe()
    return _PROBED["block"]


def _probe() -> int | None:
    if not kernel_available():
        return None
    codes = torch.randint(0, 16, (128, 192), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        reference = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    except RuntimeError:
        return None
    if reference.dtype != torch.uint8:
        return None
    return next((b for b in _BLOCKS if torch.equal(reference, _encode(codes, b))), None)


def block_n() -> int:
    """Output rows per layout block of torch's converter on this CPU (64 under AVX-512, 32 under
    AVX2); 64 when the converter is missing or matches neither (then `layout_matches_torch` is False)."""
    return _probed_block() or _BLOCKS[0]


def encode(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[N, K]`` (``N % block_n() == 0``, ``K`` even) → the kernel layout ``uint8 [N, K / 2]``."""
    return _encode(codes, block_n())


def decode(layout: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows ``start:stop`` (multiples of `block_n`) of the codes held in the kernel layout, ``uint8 [rows, K]``."""
    block = block_n()
    n, half_k = layout.shape
    stop = n if stop is None else stop
    if start % block or stop % block or not 0 <= start <= stop <= n:
        raise ValueError(f"decode rows must be whole {block}-row blocks inside [0, {n}], got {start}:{stop}")
    k = 2 * half_k
    blocks = layout[start:stop].reshape((stop - start) // block, k, block // 2)
    lo, hi = (blocks & 15).transpose(1, 2), (blocks >> 4).transpose(1, 2)  # [blocks, block / 2, K]
    return torch.cat([lo, hi], dim=1).reshape(stop - start, k)


def layout_matches_torch() -> bool:
    """Whether :func:`encode` reproduces torch's converter on this CPU."""
    return _probed_block() is not None

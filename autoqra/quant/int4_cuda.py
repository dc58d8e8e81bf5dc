"""torch's CUDA int4 kernel layout (tinygemm's ``_weight_int4pack_mm``), learned from torch's converter.

The converter ``_convert_weight_to_int4pack(uint8 [N, K / 2], t)`` (two codes a byte, the even
column in the high nibble) returns ``int32 [N / 8, K / (16 t), 32, t / 2]``: every tile of 8 output
rows × ``16 t`` input columns becomes ``16 t`` words of 8 nibbles, in the order the tensor cores read
them. That is exactly as many bytes as autoqra's packed 4-bit codes, so a 4-bit layer on a GPU *holds*
its codes in this layout instead of the packed one (no second copy).

The nibble order inside a tile is the same for every tile (the converter works tile by tile), so it
is learned once per ``t`` by converting the base-16 digits of the position index of one tile (three
conversions of an ``8 × 16 t`` tile), and checked with the kernel itself (an identity product must
return the codes). :func:`decode` is then nibble extraction, one gather and an axis permutation, all
tensor ops on the device (no loop over rows): the backward pass, saving and export read the codes
through it. A future torch that changes the layout fails the check, and the path is switched off
with a warning instead of computing garbage.
"""

from __future__ import annotations

import functools
import logging

import torch

__all__ = ["available", "decode", "encode", "inner_k_tiles", "kernel_available", "kernel_mm"]

logger = logging.getLogger(__name__)

#: output rows of one tile
TILE_N = 8
#: input columns of one k-tile; the converter groups ``t`` of them (t = 2, 4 or 8)
TILE_K = 16


def kernel_available() -> bool:
    """torch has the CUDA int4 matmul and its weight converter (it may still lack a CUDA build)."""
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm") and hasattr(ops, "_convert_weight_to_int4pack")


def inner_k_tiles(k: int) -> int | None:
    """The converter's ``innerKTiles`` for an input width ``k`` (the largest of 8, 4, 2 with
    ``k % (16 t) == 0``), or None when ``k`` is not a multiple of 32."""
    return next((t for t in (8, 4, 2) if k % (TILE_K * t) == 0), None)


def _byte_pairs(codes: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes → ``uint8 [N, K / 2]`` (even column in the high nibble), the converter's input."""
    c = codes.to(torch.uint8)
    return ((c[:, ::2] << 4) | c[:, 1::2]).contiguous()


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """``int32 [...]`` → ``uint8 [..., 8]``: nibble ``j`` of each word at bits ``4j .. 4j + 3`` (read
    through the words' little-endian bytes: a quarter of the traffic of shifting int32 words)."""
    words = words.contiguous()
    raw = words.view(torch.uint8).view(*words.shape, 4)
    return torch.stack([raw & 15, raw >> 4], dim=-1).view(*words.shape, 8)


def _convert(codes: torch.Tensor, t: int) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack(_byte_pairs(codes), t)


def _learning_device() -> str:
    """Where the tile order is learned: the current CUDA device (the CPU only where torch has no CUDA,
    which only a test's stand-in converter can serve)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def _tile_order(t: int, device: str) -> torch.Tensor:
    """``int64 [128 t]`` (on the CPU): for each nibble slot of a converted tile, the position
    ``row * 16 t + column`` of the code it holds. Learned on ``device`` by converting the three
    base-16 digits of every position."""
    rows, cols = TILE_N, TILE_K * t
    position = torch.arange(rows * cols, device=device).view(rows, cols)
    order = torch.zeros(rows * cols, dtype=torch.int64, device=device)
    for digit in range(3):  # 128 t <= 1024 < 16 ** 3
        plane = (position >> (4 * digit)) & 15
        order += _nibbles(_convert(plane, t)).reshape(-1).long() << (4 * digit)
    order = order.cpu()
    if not torch.equal(order.sort().values, torch.arange(rows * cols)):
        raise RuntimeError("torch's int4 converter does not place every code of a tile exactly once")
    return order


#: `_inverse_order`'s answers. A plain memo rather than ``functools.cache``: ``torch.compile`` traces through a
#: cache wrapper (it would learn the order inside the graph) but reads a filled global as a constant. Filled
#: before any compile: placing a layer in the layout checks it (`available`), which decodes once
_INVERSE_ORDERS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _inverse_order(t: int, device: torch.device) -> torch.Tensor:
    """For each tile position, the nibble slot that holds it (the inverse of `_tile_order`), on ``device``."""
    key = (t, torch.device(device))
    if key not in _INVERSE_ORDERS:
        _INVERSE_ORDERS[key] = torch.argsort(_tile_order(t, _learning_device())).to(device)
    return _INVERSE_ORDERS[key]


def encode(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[N, K]`` on a CUDA device (``N % 8 == 0``, ``K % 32 == 0``) → the kernel layout."""
    n, k = codes.shape
    t = inner_k_tiles(k)
    if n % TILE_N or t is None:
        raise ValueError(f"the CUDA int4 layout needs N % 8 == 0 and K % 32 == 0, got {tuple(codes.shape)}")
    return _convert(codes, t)


def decode(layout: torch.Tensor, k: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows ``start:stop`` (multiples of 8) of the codes held in the layout, ``uint8 [rows, K]``, on the
    layout's device (a layout moved to the CPU decodes there too)."""
    n = layout.shape[0] * TILE_N
    stop = n if stop is None else stop
    t = inner_k_tiles(k)
    if t is None or start % TILE_N or stop % TILE_N or not 0 <= start <= stop <= n:
        raise ValueError(f"decode needs K % 32 == 0 and rows in whole 8-row tiles of [0, {n}], got K={k}, "
                         f"{start}:{stop}")
    inverse = _inverse_order(t, layout.device)
    tiles = layout[start // TILE_N : stop // TILE_N]
    nib = _nibbles(tiles).reshape(tiles.shape[0], tiles.shape[1], TILE_N * TILE_K * t)
    codes = nib.index_select(-1, inverse).view(tiles.shape[0], tiles.shape[1], TILE_N, TILE_K * t)
    return codes.permute(0, 2, 1, 3).reshape(stop - start, k)


def kernel_mm(x: torch.Tensor, layout: torch.Tensor, group_size: int, scale_offset: torch.Tensor) -> torch.Tensor:
    """``x [M, K] (bf16) @ W^T`` from the layout with bf16 ``[groups, N, 2]`` (scale, offset) pairs;
    the kernel computes ``(c - 8) * scale + offset`` for each code ``c``."""
    return torch.ops.aten._weight_int4pack_mm(x, layout, group_size, scale_offset)


@functools.cache
def _check(t: int, device: str) -> str | None:
    """None when encode / decode / the kernel agree on ``device`` for ``t``, else the reason they do not."""
    try:
        gen = torch.Generator().manual_seed(t)
        codes = torch.randint(0, 16, (2 * TILE_N, 2 * TILE_K * t), generator=gen, dtype=torch.uint8).to(device)
        layout = encode(codes)
        if not torch.equal(decode(layout, codes.shape[1]), codes):
            return "decoding the converter's output does not return the codes"
        k = codes.shape[1]
        ones = torch.ones(k // 32, codes.shape[0], dtype=torch.bfloat16, device=device)
        scale_offset = torch.stack([ones, 8 * ones], dim=-1).contiguous()  # (c - 8) * 1 + 8 = c
        eye = torch.eye(k, dtype=torch.bfloat16, device=device)
        product = kernel_mm(eye, layout, 32, scale_offset)
        if not torch.equal(product.T.round().to(torch.uint8), codes):
            return "the kernel does not read the codes where the converter put them"
    except (RuntimeError, NotImplementedError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def available(device: torch.device, k: int) -> bool:
    """Whether 4-bit codes of input width ``k`` can live in the CUDA int4 layout on ``device``: the
    kernel exists, ``k % 32 == 0`` and the layout was checked against the kernel on this device
    (once per process; a failure is logged as a warning and the dequantizing path is used)."""
    t = inner_k_tiles(k)
    if device.type != "cuda" or t is None or not kernel_available() or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    reason = _check(t, f"cuda:{index}")
    if reason is not None:
        _warn_once(reason)
    return reason is None


@functools.cache
def _warn_once(reason: str) -> None:
    logger.warning("torch's CUDA int4 kernel is not used (%s); 4-bit layers dequantize on the GPU instead", reason)

"""Bit-packing of small unsigned integers into ``uint8`` storage.

Layout (little-endian inside each unit, values taken in flat row-major order):

* 2 / 4 / 8 bits: ``8 // bits`` values per byte; value ``j`` of a byte sits at bit ``j * bits``.
* 3 bits: 8 values in 3 bytes; the 8 values form a 24-bit little-endian word (value ``j`` at
  bit ``3 * j``) stored as its low, middle and high byte.

The tail is padded with zeros to a whole unit, so ``len(pack(q, bits)) ==
packed_nbytes(q.numel(), bits)`` (the one cost model, :mod:`autoqra.ir.cost`). Everything is
vectorized torch; the only Python loops run over the (at most 8) positions inside a unit.
"""

from __future__ import annotations

import torch

from autoqra.errors import ConfigError
from autoqra.ir.cost import PACKED_BITS, packed_nbytes

__all__ = ["pack", "unpack"]


def _check_bits(bits: int) -> None:
    if bits not in PACKED_BITS:
        raise ConfigError(f"packing supports bits {PACKED_BITS}, got {bits!r}")


def _values_per_unit(bits: int) -> int:
    return 8 if bits == 3 else 8 // bits


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``0 <= q < 2**bits`` (any shape, flattened row-major) into 1-D uint8."""
    _check_bits(bits)
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise ConfigError(f"pack expects an integer tensor, got {q.dtype}")
    flat = q.reshape(-1)
    n = flat.numel()
    if n and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ConfigError(f"pack: values must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    flat = flat.to(torch.uint8)
    if bits == 8:
        return flat.clone()
    per_unit = _values_per_unit(bits)
    pad = (-n) % per_unit
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    units = flat.view(-1, per_unit)
    if bits == 3:
        v = units.unbind(1)
        b0 = v[0] | (v[1] << 3) | ((v[2] & 3) << 6)
        b1 = (v[2] >> 2) | (v[3] << 1) | (v[4] << 4) | ((v[5] & 1) << 7)
        b2 = (v[5] >> 1) | (v[6] << 2) | (v[7] << 5)
        out = torch.stack([b0, b1, b2], dim=1).reshape(-1)
    else:
        out = units[:, 0].clone()
        for j in range(1, per_unit):
            out |= units[:, j] << (bits * j)
    if out.numel() != packed_nbytes(n, bits):  # internal invariant, not user input
        raise RuntimeError("pack produced a length that disagrees with packed_nbytes")
    return out


def unpack(packed: torch.Tensor, bits: int, n_values: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``n_values`` codes as a 1-D uint8 tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ConfigError(f"unpack expects a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    need = packed_nbytes(n_values, bits)
    if packed.numel() < need:
        raise ConfigError(f"unpack: {n_values} {bits}-bit values need {need} bytes, got {packed.numel()}")
    if bits == 8:
        return packed[:n_values]
    if bits == 3:
        b0, b1, b2 = packed[:need].view(-1, 3).unbind(1)
        parts = (
            b0 & 7,
            (b0 >> 3) & 7,
            (b0 >> 6) | ((b1 & 1) << 2),
            (b1 >> 1) & 7,
            (b1 >> 4) & 7,
            (b1 >> 7) | ((b2 & 3) << 1),
            (b2 >> 2) & 7,
            b2 >> 5,
        )
        codes = torch.stack(parts, dim=1)
    else:
        # one contiguous shift/mask per position, then one interleave (~2x faster on CPU than a
        # broadcast shift over a [bytes, positions] view)
        data, mask = packed[:need], (1 << bits) - 1
        codes = torch.stack([(data >> j) & mask if j else data & mask for j in range(0, 8, bits)], dim=1)
    return codes.reshape(-1)[:n_values]

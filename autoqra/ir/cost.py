"""The one cost model: bytes of every (bits, rank) choice of a layer.

Used by the search, the report, and the tests that compare it with the real bytes of a
materialized state dict. Formula for the ``packed`` format (group size ``g`` along the input
dimension, each row padded to a whole number of groups, the padding counted)::

    in_pad   = ceil(in / g) * g
    weight   = packed_nbytes(out * in_pad, bits)          # real bit-packing, 3-bit included
    metadata = out * ceil(in / g) * (scale_bytes + zero_bytes)
    adapter  = rank * (in + out) * adapter_bytes
    bits=16  : weight = out * in * dense_bytes, metadata = 0  (weight kept, stored in fp16)

``packed_nbytes`` packs 2/4/8-bit values 4/2/1 to a byte and 3-bit values 8 to 3 bytes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from autoqra.errors import ConfigError

#: bit-widths the packed format stores; 16 means "keep the weight in fp16".
PACKED_BITS: tuple[int, ...] = (2, 3, 4, 8)
DENSE_BITS = 16


def packed_nbytes(n_values: int, bits: int) -> int:
    """Bytes that ``n_values`` integers of ``bits`` bits occupy in packed uint8 storage."""
    if bits in (2, 4, 8):
        per_byte = 8 // bits
        return -(-n_values // per_byte)
    if bits == 3:
        return -(-n_values // 8) * 3
    raise ConfigError(f"packed storage supports bits {PACKED_BITS}, got {bits}")


@dataclass(frozen=True, kw_only=True)
class CostModel:
    """Byte accounting of the packed + LoRA format.

    Attributes:
        group_size: quantization group length along the input dimension.
        scale_bytes / zero_bytes: bytes of one group's scale and zero (fp16 → 2 each).
        adapter_bytes: bytes per LoRA parameter as held (4: float32 adapters, the training
            dtype and ``QuantLoRALinear``'s default; 2 with ``adapter_dtype=torch.bfloat16``).
        dense_bytes: bytes per weight kept at 16 bits (2: fp16).
    """

    group_size: int = 64
    scale_bytes: int = 2
    zero_bytes: int = 2
    adapter_bytes: int = 4
    dense_bytes: int = 2

    def __post_init__(self) -> None:
        for name in ("group_size", "scale_bytes", "zero_bytes", "adapter_bytes", "dense_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"CostModel.{name} must be a positive int, got {value!r}")
        if self.group_size % 8:
            raise ConfigError(
                f"CostModel.group_size must be a multiple of 8 (3-bit packs 8 values), got {self.group_size}; try 64"
            )

    def n_groups(self, in_features: int, out_features: int) -> int:
        return out_features * math.ceil(in_features / self.group_size)

    def padded_in(self, in_features: int) -> int:
        return math.ceil(in_features / self.group_size) * self.group_size

    def weight_bytes(self, in_features: int, out_features: int, bits: int) -> int:
        """Bytes of the stored weight (packed integers, or fp16 at 16 bits)."""
        if bits == DENSE_BITS:
            return in_features * out_features * self.dense_bytes
        return packed_nbytes(out_features * self.padded_in(in_features), bits)

    def metadata_bytes(self, in_features: int, out_features: int, bits: int) -> int:
        """Bytes of scales and zeros (none at 16 bits)."""
        if bits == DENSE_BITS:
            return 0
        return self.n_groups(in_features, out_features) * (self.scale_bytes + self.zero_bytes)

    def adapter_bytes_for(self, in_features: int, out_features: int, rank: int) -> int:
        return rank * (in_features + out_features) * self.adapter_bytes

    def layer_bytes(self, in_features: int, out_features: int, bits: int, rank: int) -> int:
        """Total bytes of one layer at (bits, rank): weight + metadata + adapter."""
        if bits not in PACKED_BITS and bits != DENSE_BITS:
            raise ConfigError(f"bits must be one of {PACKED_BITS + (DENSE_BITS,)}, got {bits}")
        if rank < 0:
            raise ConfigError(f"rank must be >= 0, got {rank}")
        return (
            self.weight_bytes(in_features, out_features, bits)
            + self.metadata_bytes(in_features, out_features, bits)
            + self.adapter_bytes_for(in_features, out_features, rank)
        )

    def table(
        self, in_features: int, out_features: int, bits: tuple[int, ...], ranks: tuple[int, ...]
    ) -> dict[tuple[int, int], int]:
        """{(bits, rank): bytes} for every feasible choice (ranks above min(in, out) are dropped)."""
        max_rank = min(in_features, out_features)
        return {
            (b, r): self.layer_bytes(in_features, out_features, b, r)
            for b in bits
            for r in ranks
            if r <= max_rank
        }

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> CostModel:
        return cls(**data)

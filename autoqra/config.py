"""Frozen, validated configuration shared by the passes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from autoqra.errors import ConfigError
from autoqra.ir.cost import DENSE_BITS, PACKED_BITS


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """The candidate bit-widths and LoRA ranks of every layer."""

    bits: tuple[int, ...] = (2, 3, 4, 8, 16)
    ranks: tuple[int, ...] = (0, 4, 8, 16, 32)

    def __post_init__(self) -> None:
        bits = tuple(sorted(set(int(b) for b in self.bits)))
        ranks = tuple(sorted(set(int(r) for r in self.ranks)))
        allowed = PACKED_BITS + (DENSE_BITS,)
        bad = [b for b in bits if b not in allowed]
        if not bits or bad:
            raise ConfigError(f"bits must be a non-empty subset of {allowed}, got {self.bits}; e.g. bits=(2, 3, 4, 8, 16)")
        if not ranks or any(r < 0 for r in ranks):
            raise ConfigError(f"ranks must be non-empty and >= 0, got {self.ranks}; e.g. ranks=(0, 4, 8, 16, 32)")
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "ranks", ranks)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchSpace:
        return cls(bits=tuple(data["bits"]), ranks=tuple(data["ranks"]))

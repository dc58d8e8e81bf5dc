"""`LayerNode` (what a quantizable weight is) and `LayerAnnotation` (what the passes decide)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class LayerKind(str, Enum):
    """The module types autoqra recognizes as quantizable weights."""

    LINEAR = "linear"
    HF_CONV1D = "hf_conv1d"  # transformers.pytorch_utils.Conv1D: weight stored [in, out]
    EMBEDDING = "embedding"


@dataclass(frozen=True, kw_only=True)
class LayerNode:
    """One quantizable weight.

    Attributes:
        name: module fully-qualified name; the graph key.
        kind: module type.
        in_features / out_features: the weight as a matrix y = x W^T (embeddings: in = dim, out = rows).
        dtype: parameter dtype as a string (``"float32"``).
        fx_node: name of the first graph node computing this layer, or None (module-tree route).
        tied: other module names sharing this weight (counted once, one choice).
        has_bias: the module has a bias (kept as is, not counted).
        calls: how many times the forward uses this module (>1 for shared modules).
    """

    name: str
    kind: LayerKind
    in_features: int
    out_features: int
    dtype: str = "float32"
    fx_node: str | None = None
    tied: tuple[str, ...] = ()
    has_bias: bool = False
    calls: int = 1

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind.value,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "dtype": self.dtype,
            "fx_node": self.fx_node,
            "tied": list(self.tied),
            "has_bias": self.has_bias,
            "calls": self.calls,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerNode:
        return cls(
            name=data["name"],
            kind=LayerKind(data["kind"]),
            in_features=int(data["in_features"]),
            out_features=int(data["out_features"]),
            dtype=data.get("dtype", "float32"),
            fx_node=data.get("fx_node"),
            tied=tuple(data.get("tied", ())),
            has_bias=bool(data.get("has_bias", False)),
            calls=int(data.get("calls", 1)),
        )


Choice = tuple[int, int]  # (bits, rank)


@dataclass
class LayerAnnotation:
    """What the passes write about a layer. Mutated only through `LayerGraph` accessors."""

    group: str | None = None
    block: int | None = None
    cost: dict[Choice, int] = field(default_factory=dict)
    error: dict[Choice, float] = field(default_factory=dict)
    bits: int | None = None
    rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "block": self.block,
            "cost": [[b, r, v] for (b, r), v in sorted(self.cost.items())],
            "error": [[b, r, v] for (b, r), v in sorted(self.error.items())],
            "bits": self.bits,
            "rank": self.rank,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerAnnotation:
        return cls(
            group=data.get("group"),
            block=data.get("block"),
            cost={(int(b), int(r)): int(v) for b, r, v in data.get("cost", [])},
            error={(int(b), int(r)): float(v) for b, r, v in data.get("error", [])},
            bits=data.get("bits"),
            rank=data.get("rank"),
        )

"""`Plan`: {layer: (bits, rank)} with its predicted bytes and error; sorted, byte-stable JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from autoqra.errors import ConfigError

PLAN_FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class Plan:
    """The compiler's decision.

    Attributes:
        layers: {layer name: (bits, rank)}.
        total_bytes: predicted bytes of the plan (cost model), ≤ ``budget_bytes``.
        budget_bytes: the resolved budget.
        predicted_error: the estimator's total error of the plan.
        layer_bytes / layer_error: per-layer figures from the cost and error tables.
        settings: group size, backend, estimator, solver, seed, alpha (how it was made).
    """

    layers: dict[str, tuple[int, int]]
    total_bytes: int
    budget_bytes: int
    predicted_error: float
    layer_bytes: dict[str, int] = field(default_factory=dict)
    layer_error: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def average_bits(self) -> dict[str, float]:
        """Mean bits and rank over layers (unweighted)."""
        n = max(1, len(self.layers))
        return {
            "bits": sum(b for b, _ in self.layers.values()) / n,
            "rank": sum(r for _, r in self.layers.values()) / n,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": PLAN_FORMAT_VERSION,
            "layers": {k: {"bits": b, "rank": r} for k, (b, r) in sorted(self.layers.items())},
            "total_bytes": self.total_bytes,
            "budget_bytes": self.budget_bytes,
            "predicted_error": self.predicted_error,
            "layer_bytes": dict(sorted(self.layer_bytes.items())),
            "layer_error": dict(sorted(self.layer_error.items())),
            "settings": self.settings,
        }

    def to_json(self, *, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        version = data.get("format_version")
        if not isinstance(version, int) or version > PLAN_FORMAT_VERSION:
            raise ConfigError(
                f"plan format version {version!r} is newer than this autoqra reads ({PLAN_FORMAT_VERSION}); "
                "upgrade autoqra"
            )
        return cls(
            layers={k: (int(v["bits"]), int(v["rank"])) for k, v in data["layers"].items()},
            total_bytes=int(data["total_bytes"]),
            budget_bytes=int(data["budget_bytes"]),
            predicted_error=float(data["predicted_error"]),
            layer_bytes={k: int(v) for k, v in data.get("layer_bytes", {}).items()},
            layer_error={k: float(v) for k, v in data.get("layer_error", {}).items()},
            settings=dict(data.get("settings", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

"""`Plan`: {layer: (bits, rank)} with its predicted bytes and error; sorted, byte-stable JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoqra.errors import ConfigError

PLAN_FORMAT_VERSION = 1
_REQUIRED = frozenset({"format_version", "layers", "total_bytes", "budget_bytes", "predicted_error"})
_KEYS = _REQUIRED | {"layer_bytes", "layer_error", "settings"}


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
        """A plan from `to_dict`'s form; unknown or missing keys and malformed layers raise `ConfigError`."""
        if not isinstance(data, dict):
            raise ConfigError(f"a plan is a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise ConfigError(f"unknown plan keys {unknown} (known: {sorted(_KEYS)}); the file was edited or written "
                              "by another program: write it with Plan.to_json / `autoqra compile --plan-only`")
        missing = sorted(_REQUIRED - set(data))
        if missing:
            raise ConfigError(f"the plan lacks {missing}; write it with Plan.to_json / `autoqra compile --plan-only`")
        version = data.get("format_version")
        if not isinstance(version, int) or version > PLAN_FORMAT_VERSION:
            raise ConfigError(
                f"plan format version {version!r} is newer than this autoqra reads ({PLAN_FORMAT_VERSION}); "
                "upgrade autoqra"
            )
        layers = data["layers"]
        bad = [k for k, v in layers.items() if not isinstance(v, dict) or set(v) != {"bits", "rank"}
               or any(isinstance(x, bool) or not isinstance(x, int) for x in v.values())] if isinstance(
            layers, dict) else ["(layers is not an object)"]
        if bad:
            raise ConfigError(f"plan layers must be {{name: {{'bits': int, 'rank': int}}}}; bad: {bad[:3]}")
        return cls(
            layers={k: (int(v["bits"]), int(v["rank"])) for k, v in layers.items()},
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

    @classmethod
    def read(cls, path: str | Path) -> Plan:
        """The plan in ``path`` (a ``plan.json``, or the folder holding one); `ConfigError` naming
        what to give when the file is missing or not a plan."""
        path = Path(path)
        if path.is_dir():
            path = path / "plan.json"
        if not path.is_file():
            raise ConfigError(f"no plan file at {path}: give the plan.json written by `autoqra compile --out DIR`")
        try:
            return cls.from_json(path.read_text())
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is not a readable autoqra plan ({type(exc).__name__}: {exc})") from exc

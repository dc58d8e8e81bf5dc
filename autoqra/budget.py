"""`Budget`: the memory a plan may use, parsed once at the API boundary.

Accepted forms: an int number of bytes; a string with a unit — ``"1.5GB"`` (decimal: kB, MB, GB,
TB), ``"800MiB"`` / ``"0.5 GiB"`` (binary: KiB, MiB, GiB, TiB), ``"123456B"``; ``"3.25bits"``
(average bits per quantizable weight, metadata and adapters included); or a `Budget`.

What it counts: every byte the rewrite changes — packed weights + scales/zeros + adapters (and
16-bit weights at 2 bytes each) of the selected layers. Untouched parameters (embeddings,
norms, biases, ``lm_head`` unless selected) are reported beside it, never inside it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from autoqra.errors import BudgetError

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_EXAMPLES = "e.g. 50000000, '1.5GB', '800MiB', '0.5 GiB' or '3.25bits'"


@dataclass(frozen=True, kw_only=True)
class Budget:
    """Either an absolute byte count (``nbytes``) or an average bit-width (``bits_per_weight``)."""

    nbytes: int | None = None
    bits_per_weight: float | None = None

    def __post_init__(self) -> None:
        if (self.nbytes is None) == (self.bits_per_weight is None):
            raise BudgetError(f"give exactly one of nbytes or bits_per_weight ({_EXAMPLES})")
        if self.nbytes is not None and (isinstance(self.nbytes, bool) or self.nbytes <= 0):
            raise BudgetError(f"a budget must be positive, got {self.nbytes} bytes ({_EXAMPLES})")
        if self.bits_per_weight is not None and not (
            math.isfinite(self.bits_per_weight) and self.bits_per_weight > 0
        ):
            raise BudgetError(f"a budget must be positive, got {self.bits_per_weight} bits ({_EXAMPLES})")

    @classmethod
    def parse(cls, value: int | float | str | Budget) -> Budget:
        """Parse any accepted form; raises `BudgetError` with an example of a valid budget."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, bool):
            raise BudgetError(f"cannot read a bool as a budget ({_EXAMPLES})")
        if isinstance(value, int):
            return cls(nbytes=value)
        if isinstance(value, float):
            if not value.is_integer():
                raise BudgetError(f"a byte count must be whole, got {value} ({_EXAMPLES})")
            return cls(nbytes=int(value))
        if not isinstance(value, str):
            raise BudgetError(f"cannot read {type(value).__name__} as a budget ({_EXAMPLES})")
        match = _RE.match(value)
        if not match:
            raise BudgetError(f"cannot parse budget {value!r} ({_EXAMPLES})")
        number, unit = float(match.group(1)), match.group(2).lower()
        if unit in ("bit", "bits"):
            return cls(bits_per_weight=number)
        if unit == "":
            unit = "b"
        if unit not in _UNITS:
            raise BudgetError(f"unknown unit {match.group(2)!r} in budget {value!r} ({_EXAMPLES})")
        nbytes = number * _UNITS[unit]
        if not math.isfinite(nbytes):
            raise BudgetError(f"budget {value!r} overflows: give a finite size ({_EXAMPLES})")
        if nbytes <= 0:
            raise BudgetError(f"a budget must be positive, got {value!r} ({_EXAMPLES})")
        return cls(nbytes=int(round(nbytes)))

    def resolve(self, n_weights: int) -> int:
        """Bytes allowed for ``n_weights`` quantizable weights."""
        if self.nbytes is not None:
            return self.nbytes
        return int(math.floor(self.bits_per_weight * n_weights / 8))

    def to_dict(self) -> dict[str, float | int | None]:
        return {"nbytes": self.nbytes, "bits_per_weight": self.bits_per_weight}

    def __str__(self) -> str:
        if self.nbytes is not None:
            return f"{self.nbytes} bytes ({self.nbytes / 2**20:.2f} MiB)"
        return f"{self.bits_per_weight:g} bits per weight"

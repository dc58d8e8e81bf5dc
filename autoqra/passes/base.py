"""Pass contract and `PassManager`.

A pass declares the program fields it ``reads`` and ``writes`` (and ``optional_reads``: fields it
uses when an earlier pass wrote them); the manager checks, when it is built, that every field read
is available initially or written by an earlier pass, times every pass, and wraps a failure with
the pass name and the passes that ran before it. While a pass runs, ``program.state`` is guarded:
reading or writing a state entry that belongs to a field the pass did not declare raises
`PassOrderError` (the declaration is the contract, and the tests run every pipeline).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from autoqra.errors import AutoQRAError, PassFailedError, PassOrderError
from autoqra.ir.program import Program
from autoqra.memory import trim_heap

logger = logging.getLogger(__name__)

#: fields a freshly captured `Program` provides.
INITIAL_FIELDS: frozenset[str] = frozenset({"model", "fx"})

#: which declared field each ``program.state`` entry belongs to (entries not listed are free)
STATE_FIELDS: dict[str, str] = {
    "layer_inputs": "graph",
    "cost_model": "cost", "space": "cost",
    "stats": "stats", "calib_tokens": "stats", "calibration": "stats",
    "plasticity": "plasticity", "error_settings": "error", "error_probe": "error",
    "problem": "bits", "assignment": "bits",
    "selection": "selection", "built_layers": "built_layers",
}


class GuardedState(dict):
    """``program.state`` while one pass runs: entries of undeclared fields cannot be read or written."""

    def __init__(self, data: dict[str, Any], owner: str, readable: frozenset[str], writable: frozenset[str]) -> None:
        super().__init__(data)
        self._owner, self._readable, self._writable = owner, readable, writable

    def _check(self, key: str, allowed: frozenset[str], verb: str) -> None:
        owner_field = STATE_FIELDS.get(key)
        if owner_field is not None and owner_field not in allowed:
            raise PassOrderError(
                f"{self._owner} {verb} program.state[{key!r}] (field {owner_field!r}) without declaring it; "
                f"add {owner_field!r} to its {'reads' if verb == 'reads' else 'writes'}"
            )

    def __getitem__(self, key: str) -> Any:
        self._check(key, self._readable, "reads")
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self._check(key, self._readable, "reads")
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self._check(key, self._readable, "reads")
        return super().__contains__(key)

    def __setitem__(self, key: str, value: Any) -> None:
        self._check(key, self._writable, "writes")
        super().__setitem__(key, value)

    def pop(self, key: str, *default: Any) -> Any:
        self._check(key, self._writable, "writes")
        return super().pop(key, *default)

    def setdefault(self, key: str, default: Any = None) -> Any:
        self._check(key, self._writable, "writes")
        return super().setdefault(key, default)


@dataclass
class PassResult:
    """What a pass did: whether it changed the program, and facts for the report."""

    changed: bool = True
    info: dict[str, Any] = field(default_factory=dict)


class PassBase(ABC):
    """One step of the pipeline. Subclasses set ``reads`` / ``writes`` and implement `call`."""

    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    optional_reads: ClassVar[tuple[str, ...]] = ()

    @property
    def name(self) -> str:
        return type(self).__name__

    @abstractmethod
    def call(self, program: Program) -> PassResult:
        """Run on ``program`` (mutating its graph annotations / state)."""

    def __call__(self, program: Program) -> PassResult:
        return self.call(program)


@dataclass
class PassTiming:
    name: str
    seconds: float
    info: dict[str, Any]


class PassManager:
    """Runs passes in order after checking that reads follow writes."""

    def __init__(self, passes: list[PassBase], *, initial: frozenset[str] = INITIAL_FIELDS) -> None:
        available = set(initial)
        for index, p in enumerate(passes):
            missing = [f for f in p.reads if f not in available]
            if missing:
                before = [q.name for q in passes[:index]] or ["(none)"]
                raise PassOrderError(
                    f"{p.name} reads {missing}, which no earlier pass writes (passes before it: "
                    f"{', '.join(before)}); add the pass that writes them before {p.name}"
                )
            available.update(p.writes)
        self.passes = list(passes)
        self.timings: list[PassTiming] = []

    def run(self, program: Program) -> Program:
        for index, p in enumerate(self.passes):
            start = time.perf_counter()
            readable = frozenset(p.reads) | frozenset(p.optional_reads) | frozenset(p.writes)
            program.state = GuardedState(program.state, p.name, readable, frozenset(p.writes))
            try:
                result = p(program)
            except AutoQRAError as exc:
                if isinstance(exc, PassFailedError):
                    raise
                # keep the typed error the user can catch, with the pass named in front
                exc.args = (f"{p.name}: {exc}",) + exc.args[1:]
                raise
            except Exception as exc:
                before = ", ".join(q.name for q in self.passes[:index])
                after = f" (passes run before it: {before})" if before else ""
                raise PassFailedError(f"{p.name} failed{after}: {type(exc).__name__}: {exc}") from exc
            finally:
                program.state = dict(program.state)
                trim_heap()  # what the pass freed goes back to the system, not kept as free heap
            seconds = time.perf_counter() - start
            self.timings.append(PassTiming(p.name, seconds, dict(result.info)))
            logger.info("%s: %.3f s %s", p.name, seconds, result.info or "")
        program.state.setdefault("timings", []).extend(
            {"pass": t.name, "seconds": round(t.seconds, 4), "info": t.info} for t in self.timings
        )
        return program

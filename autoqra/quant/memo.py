"""`quant_memo`: reuse the quantization of an unchanged weight within a compile (or across several).

The sensitivity pass quantizes every layer's weight at every bit-width of the menu; the measured
selection then builds each candidate's layers, and the first step of every LoftQ init (and every
rank-0 layer) quantizes the *same* weight with the *same* importance again. Inside ``with
quant_memo():`` those calls are answered from memory: the key is the backend (with its settings),
the spec, and the raw bytes of the weight and of the importance (content, not identity: a deep
copy of the model hits as well), so a hit returns exactly what the backend would have computed.

With ``quant_memo(inits=True)`` it also keeps whole LoftQ inits ``(Q, A, B)``
(`autoqra.quant.loftq.loftq_init`), keyed by the weight, its statistics ``d`` / ``g``, the rank and
the iterations: a later compile that builds the same layer at the same (bits, rank) copies it
instead of re-running the alternating quantization and SVDs. Within one compile every
(layer, bits, rank) is built once anyway, so `autoqra.compile`'s own memo leaves this off (no
memory spent on it); ``autoqra demo`` turns it on around its compiles (the selection's uniform
candidates are the uniform rows it compiles next).

The memo is bounded (``max_bytes`` of quantized tensors, least recently used dropped first) and
lives only while the ``with`` block runs; `autoqra.compile` opens one unless one is open already
(``autoqra demo`` opens one around all its compiles, so the uniform compiles reuse the default
compile's quantizations). Outside a memo nothing is stored; weights on an accelerator are never
memoized (hashing them would copy them to the host). Hits and misses are logged at DEBUG when the
memo closes and reported by `QuantMemo.stats`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import replace

import torch

from autoqra.cache import update_with_tensor
from autoqra.quant.base import QuantBackend, QuantizedWeight, QuantSpec

__all__ = ["QuantMemo", "quant_memo", "active_memo", "quantize_memo", "DEFAULT_MAX_BYTES"]

logger = logging.getLogger(__name__)

#: default bound on the quantized tensors kept (SmolLM2-135M at 2/3/4/8 bits needs ~250 MB)
DEFAULT_MAX_BYTES = 512 * 1024 * 1024

_ACTIVE: list[QuantMemo] = []


def _digest(t: torch.Tensor | None) -> str:
    h = hashlib.sha1()
    update_with_tensor(h, t)
    return h.hexdigest()


#: what the memo holds: a quantized weight, or a LoftQ init ``(Q, A, B)``
Entry = QuantizedWeight | tuple[QuantizedWeight, torch.Tensor, torch.Tensor]


def _nbytes(entry: Entry) -> int:
    if isinstance(entry, tuple):
        qw, *factors = entry
        return _nbytes(qw) + sum(t.numel() * t.element_size() for t in factors)
    extra = 0 if entry.codebook is None else entry.codebook.numel() * entry.codebook.element_size()
    return sum(t.numel() * t.element_size() for t in (entry.packed, entry.scale, entry.zero)) + extra


def _clone(entry: Entry) -> Entry:
    if isinstance(entry, tuple):
        qw, *factors = entry
        return (_clone(qw), *(t.clone() for t in factors))  # type: ignore[return-value]
    return replace(entry, packed=entry.packed.clone(), scale=entry.scale.clone(), zero=entry.zero.clone(),
                   codebook=None if entry.codebook is None else entry.codebook.clone())


class QuantMemo:
    """A bounded least-recently-used map from (backend, spec, weight, importance) to the quantized
    weight, and from (backend, spec, rank, iterations, weight, d, g) to a LoftQ init."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, *, inits: bool = False) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        #: also keep LoftQ inits (see the module docstring)
        self.inits = inits
        self._items: OrderedDict[tuple[str, ...], Entry] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(backend: QuantBackend, spec: QuantSpec, weight: torch.Tensor,
            importance: torch.Tensor | None) -> tuple[str, ...]:
        return (repr(backend), str(spec.bits), str(spec.group_size), _digest(weight), _digest(importance))

    @staticmethod
    def init_key(backend: QuantBackend, spec: QuantSpec, rank: int, iters: int, weight: torch.Tensor,
                 d: torch.Tensor | None, g: torch.Tensor | None) -> tuple[str, ...]:
        return ("loftq", repr(backend), str(spec.bits), str(spec.group_size), str(rank), str(iters),
                _digest(weight), _digest(d), _digest(g))

    def get(self, key: tuple[str, ...]) -> Entry | None:
        qw = self._items.get(key)
        if qw is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return _clone(qw)  # callers own their tensors (a module may re-lay them out)

    def put(self, key: tuple[str, ...], entry: Entry, *, copy: bool = True) -> None:
        """Keep ``entry`` (a copy; ``copy=False`` when the caller hands over tensors nothing else holds)."""
        size = _nbytes(entry)
        if size > self.max_bytes or key in self._items:
            return
        self._items[key] = _clone(entry) if copy else entry
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= _nbytes(old)

    def keys(self) -> set[tuple[str, ...]]:
        """The keys held now."""
        return set(self._items)

    def take_new(self, known: set[tuple[str, ...]]) -> list[tuple[tuple[str, ...], Entry]]:
        """Remove and return the entries whose keys are not in ``known``, oldest first (a forked worker
        hands what it computed to the parent's memo: `autoqra.parallel`)."""
        new = [(k, e) for k, e in self._items.items() if k not in known]
        for k, e in new:
            del self._items[k]
            self._bytes -= _nbytes(e)
        return new

    def clear(self) -> None:
        """Drop every entry (the hit and miss counts stay)."""
        self._items.clear()
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes of quantized tensors held now."""
        return self._bytes

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self._items), "bytes": self._bytes}


def active_memo() -> QuantMemo | None:
    """The innermost open memo, or None."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def quant_memo(max_bytes: int = DEFAULT_MAX_BYTES, *, reuse: bool = True, inits: bool = False) -> Iterator[QuantMemo]:
    """Open a memo for the ``with`` block (``reuse``: join an open one instead of nesting a new one;
    ``inits``: keep LoftQ inits too)."""
    if reuse and _ACTIVE:
        yield _ACTIVE[-1]
        return
    memo = QuantMemo(max_bytes, inits=inits)
    _ACTIVE.append(memo)
    try:
        yield memo
    finally:
        _ACTIVE.remove(memo)
        logger.debug("quantization memo closed: %s", memo.stats())


def quantize_memo(backend: QuantBackend, weight: torch.Tensor, spec: QuantSpec, *,
                  importance: torch.Tensor | None = None, name: str | None = None) -> QuantizedWeight:
    """``backend.quantize(weight, spec, importance=importance)``, answered from the open memo when
    the same weight was quantized the same way before (no memo open: plain call)."""
    memo = active_memo()
    if memo is None or weight.device.type != "cpu":  # hashing a device tensor would copy it to the host
        return backend.quantize(weight, spec, importance=importance, name=name)
    key = memo.key(backend, spec, weight, importance)
    hit = memo.get(key)
    if hit is not None:
        return hit  # type: ignore[return-value]
    qw = backend.quantize(weight, spec, importance=importance, name=name)
    memo.put(key, qw)
    return qw

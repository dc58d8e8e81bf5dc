"""EstimateSensitivityPass: error(bits, rank) per layer from a registered estimator."""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from autoqra.distributed import all_gather_dict, rank_and_world, shard
from autoqra.errors import ConfigError
from autoqra.ir.cost import DENSE_BITS
from autoqra.ir.layer import LayerKind, LayerNode
from autoqra.ir.program import Program
from autoqra.memory import trim_heap
from autoqra.parallel import effective_workers, fork_map
from autoqra.passes.base import PassBase, PassResult
from autoqra.progress import tqdm_disable
from autoqra.quant.base import QuantBackend, QuantSpec, get_backend
from autoqra.quant.gptq import damped_cholesky, gptq_quantize
from autoqra.quant.loftq import input_importance
from autoqra.quant.memo import active_memo, quantize_memo
from autoqra.search.estimators import ErrorCache, get_estimator

logger = logging.getLogger(__name__)

#: the tables of fewer weights than this (in all) are computed in this process, without workers
PARALLEL_MIN_WEIGHTS = 1 << 22


def weight_matrix(module: nn.Module, layer: LayerNode) -> torch.Tensor:
    """The layer's weight as an [out, in] matrix (HF Conv1D stores [in, out])."""
    w = module.weight.detach()
    return w.t() if layer.kind is LayerKind.HF_CONV1D else w


@dataclass(frozen=True)
class ErrorSettings:
    """How the error tables were computed (``program.state['error_settings']``): what a later pass
    needs to round a weight exactly as they did (`rounded_weight`)."""

    estimator: str
    backend: QuantBackend
    group_size: int
    rounding: str


def rounded_weight(settings: ErrorSettings, weight: torch.Tensor, stats: object | None,
                   bits: int) -> tuple[torch.Tensor, float]:
    """(the dequantized rounding of ``weight`` [out, in] at ``bits``, its rank-0 table error): the rounding,
    importance and weighting of the error tables (`EstimateSensitivityPass`), so they agree entry by entry."""
    estimator, backend = get_estimator(settings.estimator), get_backend(settings.backend)
    w = weight.detach().float()
    d, g = estimator.weights(stats)
    use_hessian = settings.rounding == "gptq" and estimator.use_d and stats is not None
    hessian = getattr(stats, "hessian", None) if use_hessian else None
    d, g, hessian = (None if t is None else t.to(w.device) for t in (d, g, hessian))
    spec = QuantSpec(bits=bits, group_size=settings.group_size)
    if hessian is not None:
        deq = backend.dequantize(gptq_quantize(w, spec, hessian, backend=backend))
    else:
        importance = None if d is None else input_importance(d.float(), w.shape[1])
        deq = backend.dequantize(quantize_memo(backend, w, spec, importance=importance))
    right = damped_cholesky(hessian) if hessian is not None else None
    error = estimator.table(w, (bits,), (0,), lambda *_: deq, d, g, right)[(bits, 0)]
    return deq, error


@dataclass
class _Item:
    """A layer whose table is not in the cache: what computing it needs."""

    name: str
    cost: tuple[tuple[int, int], ...]
    weight: torch.Tensor
    d: torch.Tensor | None
    g: torch.Tensor | None
    hessian: torch.Tensor | None
    key: str
    stored: dict[tuple[int, int], float]


class EstimateSensitivityPass(PassBase):
    """Writes the error table of every layer (same keys as its cost table). The layers missing from the
    cache are computed over `autoqra.parallel.fork_map`'s worker processes (CPU weights; ``workers``)."""

    reads = ("graph", "cost", "stats")
    writes = ("error",)

    def __init__(self, estimator: str, *, backend: str = "packed", group_size: int = 64,
                 cache_dir: Path | None = None, progress: bool = True, rounding: str = "rtn",
                 workers: int | None = None) -> None:
        self.rounding = rounding
        #: processes that compute the tables (`autoqra.parallel.fork_map`; None: its default)
        self.workers = workers
        self.estimator = get_estimator(estimator)
        self.backend = get_backend(backend)
        self.group_size = group_size
        self.cache = ErrorCache(cache_dir)
        self.progress = progress

    def call(self, program: Program) -> PassResult:
        graph = program.require_graph()
        space = program.state.get("space")
        if space is not None:
            unsupported = [b for b in space.bits if b != DENSE_BITS and b not in self.backend.supported_bits]
            if unsupported:
                ok = tuple(b for b in space.bits if b not in unsupported)
                raise ConfigError(
                    f"backend {self.backend.name!r} supports bits {self.backend.supported_bits}, not {unsupported}; "
                    f"search bits={ok or self.backend.supported_bits} with this backend, or use backend='packed'"
                )
        stats = program.state.get("stats", {})
        modules = dict(program.model.named_modules(remove_duplicate=False))
        hits = 0
        spec_cache: dict[int, QuantSpec] = {}

        def quantize(w: torch.Tensor, bits: int, importance: torch.Tensor | None,
                     hessian: torch.Tensor | None) -> torch.Tensor:
            spec = spec_cache.setdefault(bits, QuantSpec(bits=bits, group_size=self.group_size))
            if hessian is not None:
                return self.backend.dequantize(gptq_quantize(w, spec, hessian, backend=self.backend))
            return self.backend.dequantize(quantize_memo(self.backend, w, spec, importance=importance))

        tables: dict[str, dict[tuple[int, int], float]] = {}
        todo: list[_Item] = []
        mine = shard(graph.order())  # every layer in one process; a share of them under torch.distributed
        for name in mine:
            layer = graph.layer(name)
            cost = graph.annotation(name).cost
            weight = weight_matrix(modules[name], layer)
            d, g = self.estimator.weights(stats.get(name))
            st = stats.get(name)
            hessian = st.hessian if (self.rounding == "gptq" and self.estimator.use_d and st is not None) else None
            # the statistics live on the CPU; the error is computed where the weight is (a GPU when the model is)
            d, g, hessian = (None if t is None else t.to(weight.device) for t in (d, g, hessian))
            # one entry per (weight, statistics, settings), whatever the menu: each (bits, rank) error is
            # computed independently, so a compile over a narrower or another menu reuses the entries it finds
            # (the demo's uniform compiles read the default compile's table) and adds what it computes
            key = self.cache.key(
                {"estimator": self.estimator.name, "backend": repr(self.backend), "group_size": self.group_size,
                 "rounding": self.rounding, "version": 4},
                [weight, d, g, hessian],
            )
            stored = self.cache.get(key) or {}
            if set(cost) <= set(stored):
                tables[name] = {k: stored[k] for k in cost}
                hits += 1
            else:
                todo.append(_Item(name, tuple(cost), weight, d, g, hessian, key, stored))

        parent = os.getpid()
        memo = active_memo()

        def compute(i: int) -> tuple[dict[tuple[int, int], float], list[Any], tuple[int, int]]:
            item = todo[i]
            in_worker = os.getpid() != parent
            known = memo.keys() if (memo is not None and in_worker) else None
            counts = (memo.hits, memo.misses) if memo is not None else (0, 0)
            bits = tuple(sorted({b for b, _ in item.cost}))
            ranks = tuple(sorted({r for _, r in item.cost}))
            right = damped_cholesky(item.hessian) if item.hessian is not None else None
            table = self.estimator.table(
                item.weight, tuple(b for b in bits if b != DENSE_BITS) + ((DENSE_BITS,) if DENSE_BITS in bits else ()),
                ranks, functools.partial(quantize, hessian=item.hessian), item.d, item.g, right)
            # a worker's roundings go back to the parent's memo (the selection's builds start from them)
            new = memo.take_new(known) if (memo is not None and known is not None) else []
            delta = (memo.hits - counts[0], memo.misses - counts[1]) if (memo is not None and in_worker) else (0, 0)
            if not in_worker:  # (a worker's heap goes when the pass ends; trimming it would only re-fault it)
                trim_heap()  # glibc keeps each layer's transients as free heap beside the memo's entries
            return table, new, delta

        # worker processes for CPU weights worth it (forking a pool costs ~0.1 s; tiny models stay serial)
        worth = sum(item.weight.numel() for item in todo) >= PARALLEL_MIN_WEIGHTS
        on_cpu = all(item.weight.device.type == "cpu" for item in todo)
        workers = effective_workers(self.workers, len(todo)) if (on_cpu and worth) else 1
        results = fork_map(compute, len(todo), workers)
        for item, (table, new, (memo_hits, memo_misses)) in zip(
                todo, tqdm(results, total=len(todo), desc=f"sensitivity ({self.estimator.name})", unit="layer",
                           disable=tqdm_disable(self.progress)), strict=True):
            if memo is not None:
                for entry_key, entry in new:
                    memo.put(entry_key, entry, copy=False)  # unpickled here: nothing else holds it
                memo.hits += memo_hits
                memo.misses += memo_misses
            self.cache.put(item.key, {**item.stored, **table})
            tables[item.name] = {k: table[k] for k in item.cost}
        tables = all_gather_dict(tables)
        for name in graph.order():
            graph.set_error(name, tables[name])
        program.state["error_settings"] = ErrorSettings(self.estimator.name, self.backend, self.group_size,
                                                        self.rounding)
        _, world = rank_and_world()
        return PassResult(info={"estimator": self.estimator.name, "cache_hits": hits, "layers": len(graph),
                                "processes": world, "workers": workers if todo else 0})

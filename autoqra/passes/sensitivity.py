"""EstimateSensitivityPass: error(bits, rank) per layer from a registered estimator."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from autoqra.distributed import all_gather_dict, rank_and_world, shard
from autoqra.errors import ConfigError
from autoqra.ir.cost import DENSE_BITS
from autoqra.ir.layer import LayerKind, LayerNode
from autoqra.ir.program import Program
from autoqra.memory import trim_heap
from autoqra.passes.base import PassBase, PassResult
from autoqra.progress import tqdm_disable
from autoqra.quant.base import QuantSpec, get_backend
from autoqra.quant.gptq import damped_cholesky, gptq_quantize
from autoqra.quant.memo import quantize_memo
from autoqra.search.estimators import ErrorCache, get_estimator

logger = logging.getLogger(__name__)


def weight_matrix(module: nn.Module, layer: LayerNode) -> torch.Tensor:
    """The layer's weight as an [out, in] matrix (HF Conv1D stores [in, out])."""
    w = module.weight.detach()
    return w.t() if layer.kind is LayerKind.HF_CONV1D else w


class EstimateSensitivityPass(PassBase):
    """Writes the error table of every layer (same keys as its cost table)."""

    reads = ("graph", "cost", "stats")
    writes = ("error",)

    def __init__(self, estimator: str, *, backend: str = "packed", group_size: int = 64,
                 cache_dir: Path | None = None, progress: bool = True, rounding: str = "rtn") -> None:
        self.rounding = rounding
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

        hessian: torch.Tensor | None = None

        def quantize(w: torch.Tensor, bits: int, importance: torch.Tensor | None) -> torch.Tensor:
            spec = spec_cache.setdefault(bits, QuantSpec(bits=bits, group_size=self.group_size))
            if hessian is not None:
                return self.backend.dequantize(gptq_quantize(w, spec, hessian, backend=self.backend))
            return self.backend.dequantize(quantize_memo(self.backend, w, spec, importance=importance))

        tables: dict[str, dict[tuple[int, int], float]] = {}
        mine = shard(graph.order())  # every layer in one process; a share of them under torch.distributed
        for name in tqdm(mine, desc=f"sensitivity ({self.estimator.name})", unit="layer",
                         disable=tqdm_disable(self.progress)):
            layer = graph.layer(name)
            cost = graph.annotation(name).cost
            bits = tuple(sorted({b for b, _ in cost}))
            ranks = tuple(sorted({r for _, r in cost}))
            weight = weight_matrix(modules[name], layer)
            d, g = self.estimator.weights(stats.get(name))
            st = stats.get(name)
            hessian = st.hessian if (self.rounding == "gptq" and self.estimator.use_d and st is not None) else None
            # the statistics live on the CPU; the error is computed where the weight is (a GPU when the model is)
            d, g, hessian = (None if t is None else t.to(weight.device) for t in (d, g, hessian))
            right = damped_cholesky(hessian) if hessian is not None else None
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
                table = stored
                hits += 1
            else:
                table = self.estimator.table(weight, tuple(b for b in bits if b != DENSE_BITS) + (
                    (DENSE_BITS,) if DENSE_BITS in bits else ()), ranks, quantize, d, g, right)
                self.cache.put(key, {**stored, **table})
            tables[name] = {k: table[k] for k in cost}
            trim_heap()  # glibc keeps each layer's transients as free heap beside the memo's entries
        tables = all_gather_dict(tables)
        for name in graph.order():
            graph.set_error(name, tables[name])
        _, world = rank_and_world()
        return PassResult(info={"estimator": self.estimator.name, "cache_hits": hits, "layers": len(graph),
                                "processes": world})

"""ProbeBlocksPass: the per-layer error tables calibrated, block by block, against measured loss.

The error tables (`EstimateSensitivityPass`) predict each layer's cost alone and are summed as if
errors did not interact. Measured on SmolLM2 (held-back calibration tokens, each decoder block's
layers rounded to 2 bits with the rest of the model untouched), the loss increase per unit of
predicted error varied ~10× between blocks: the two blocks the proxy predicted worst lost the least
for their prediction, and errors inside a block compound. A plan that buys 8 bits for a few
over-predicted layers and pays with 2-bit layers elsewhere looks good to the proxy and measures badly.

So, before the search, every repeated block ``b`` (``LayerAnnotation.block``) is probed at each bit-width
``p`` of `ProbeConfig.bits` in the search space: its quantizable layers are replaced by their rounded
weights (the same rounding, importance and group size as the tables; rank 0), the held-back loss is
measured, the original weights are put back, and the block's ratio

    ratio(b, p) = (loss(b at p) − loss(fp)) / Σ_{layers of b} error(p, rank 0)

is compared with the median ratio over the blocks at the highest probed bit-width. Every table entry
``error(bits, r)`` of the block's layers is multiplied by ``clip(ratio(b, p) / median, 1/clip, clip)``,
where ``p`` is the highest probed bit-width ≤ ``bits`` (the lowest when none is). Normalizing by one
median keeps the tables' units and keeps a global 2-vs-3-bit difference (2-bit rounding compounding
more than 3-bit) in the factors. Layers outside the repeated blocks keep factor 1.

Measured (ad-hoc, 2026-12-06, SmolLM2 + Lee at the bytes of uniform 3-bit r8, the 12 random plans of
``benchmarks/proxy_fidelity.py`` re-scored with the calibrated tables against the perplexities that
benchmark measured): Spearman of the step-0 objective with perplexity as compiled 0.77 → 0.93, with
perplexity after 20 adapter steps 0.43 → 0.67 (0.76 for ``error − λ·plasticity`` at λ = 1).
Cost: one forward over the held-back tokens per block and probed bit-width (60 on SmolLM2).
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map
from tqdm.auto import tqdm

from autoqra.cache import JsonCache
from autoqra.errors import ConfigError
from autoqra.evaluate import window_nll
from autoqra.ir.cost import DENSE_BITS
from autoqra.ir.program import Program
from autoqra.passes.base import PassBase, PassResult
from autoqra.passes.sensitivity import ErrorSettings, rounded_weight, weight_matrix
from autoqra.progress import tqdm_disable

__all__ = ["HOLDOUT_TOKENS", "ProbeBlocksPass", "ProbeConfig", "holdout_batches", "holdout_loss"]

logger = logging.getLogger(__name__)

#: held-back windows scored in one forward, at most this many tokens (activations only: no gradients)
HOLDOUT_TOKENS = 4096
#: the fp forward's block outputs kept for replay (`ProbeBlocksPass.prefix_cache`) up to this many bytes
PREFIX_CACHE_BYTES = 1 << 30
_BLOCK_RE = re.compile(r"(?:^|\.)\d+(?=\.|$)")


def _block_path(layer: str) -> str:
    """``model.layers.7.mlp.up_proj`` → ``model.layers.7`` (the block module: up to the first index)."""
    match = _BLOCK_RE.search(layer)
    return layer[: match.end()] if match else ""


def _clone(value: object) -> object:
    """``value`` with every tensor in it (tuples, lists, dicts: torch's pytree) cloned: a replayed output that
    a later block changed in place is not changed for the next replay."""
    return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, value)


def _tensors(value: object) -> list[torch.Tensor]:
    return [v for v in tree_leaves(value) if isinstance(v, torch.Tensor)]


def holdout_batches(holdout: list[torch.Tensor]) -> list[torch.Tensor]:
    """The held-back windows, concatenated into batches of at most `HOLDOUT_TOKENS` tokens where their
    lengths agree: one forward dequantizes every packed weight once, whatever the batch (measured on
    SmolLM2 at uniform 3-bit r8: two 512-token windows 2.6 s apart, 2.2 s together, same loss)."""
    out: list[torch.Tensor] = []
    for batch in holdout:
        batch = batch.reshape(-1, batch.shape[-1]) if batch.dim() > 1 else batch.reshape(1, -1)
        last = out[-1] if out else None
        if last is not None and last.shape[1] == batch.shape[1] and last.numel() + batch.numel() <= HOLDOUT_TOKENS:
            out[-1] = torch.cat([last, batch])
        else:
            out.append(batch)
    return out


def holdout_loss(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean next-token NLL of ``model`` over ``batches`` (eval mode, no gradients; the mode is restored)."""
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for batch in batches:
            n, c = window_nll(model, batch.to(device))
            nll, count = nll + n, count + c
    finally:
        model.train(was_training)
    return nll / max(count, 1)


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """Which bit-widths each block is probed at, and how far a factor may move a block's errors.

    Attributes:
        bits: probed bit-widths (those in the search space are used; ``()``: no probe).
        clip: a block's factor stays within ``[1/clip, clip]``.
    """

    bits: tuple[int, ...] = (2, 3)
    clip: float = 8.0

    def __post_init__(self) -> None:
        if not isinstance(self.bits, tuple) or any(
                isinstance(b, bool) or not isinstance(b, int) or not 1 <= b < DENSE_BITS for b in self.bits):
            raise ConfigError(f"ProbeConfig.bits must be a tuple of quantized bit-widths (< 16), got {self.bits!r}")
        if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) or not (
                math.isfinite(self.clip) and self.clip >= 1):
            raise ConfigError(f"ProbeConfig.clip must be a finite number >= 1, got {self.clip!r}")


class ProbeBlocksPass(PassBase):
    """Rescales ``error`` block by block by measured loss (see the module docstring); writes the probe's
    measurements to ``program.state['error_probe']``. The model is unchanged when it ends."""

    reads = ("graph", "error", "stats")
    writes = ("error",)

    def __init__(self, config: ProbeConfig, *, holdout: list[torch.Tensor], progress: bool | None = None,
                 cache_dir: Path | None = None, prefix_cache: bool = True) -> None:
        self.config = config
        #: replay the fp forward's outputs of the blocks before the probed one instead of recomputing them
        #: (the same numbers: those blocks' inputs and weights are unchanged); off: every forward runs whole
        self.prefix_cache = prefix_cache
        self.holdout = holdout
        self.batches = holdout_batches(holdout)
        self.progress = progress
        #: the measurements, keyed by the model's tensors, the held-back tokens and the rounding (a second
        #: compile of the same model and data skips the forwards)
        self._cache = JsonCache(cache_dir, prefix="probe-")

    def _key(self, program: Program, settings: ErrorSettings, bits: tuple[int, ...],
             blocks: dict[int, list[str]]) -> str:
        state = program.model.state_dict(keep_vars=True)
        parts = {"kind": "probe", "bits": list(bits), "blocks": {str(b): n for b, n in blocks.items()},
                 "settings": {"estimator": settings.estimator, "backend": repr(settings.backend),
                              "group_size": settings.group_size, "rounding": settings.rounding},
                 "names": list(state)}
        return self._cache.key(parts, [*state.values(), None, *self.holdout])

    def call(self, program: Program) -> PassResult:
        graph = program.require_graph()
        settings: ErrorSettings | None = program.state.get("error_settings")
        blocks: dict[int, list[str]] = {}
        for name in graph.order():
            block = graph.annotation(name).block
            if block is not None:
                blocks.setdefault(block, []).append(name)
        space_bits = {b for name in graph.order() for b, _ in graph.annotation(name).error}
        bits = tuple(sorted(b for b in set(self.config.bits) & space_bits if b != DENSE_BITS))
        single = all(len(graph.annotation(name).error) <= 1 for name in graph.order())
        skip = ("one choice per layer: nothing to choose" if single else
                "no probed bit-width in the search space" if not bits else
                "fewer than two repeated blocks" if len(blocks) < 2 else
                "no held-back data" if not self.batches else
                "no error settings (the sensitivity pass did not run)" if settings is None else "")
        if skip:
            program.state["error_probe"] = {"skipped": skip}
            return PassResult(info={"skipped": skip})
        clock = time.perf_counter()
        key = self._key(program, settings, bits, blocks)
        cached = self._cache.get_json(key)
        if cached is not None:
            base = float(cached["base_loss"])
            measured = {int(b): {int(p): float(v) for p, v in d.items()} for b, d in cached["measured"].items()}
            predicted = {int(b): {int(p): float(v) for p, v in d.items()} for b, d in cached["predicted"].items()}
        else:
            base, measured, predicted = self._measure(program, settings, bits, blocks)
            self._cache.put_json(key, {"base_loss": base,
                                       "measured": {str(b): {str(p): v for p, v in d.items()}
                                                    for b, d in measured.items()},
                                       "predicted": {str(b): {str(p): v for p, v in d.items()}
                                                     for b, d in predicted.items()}})
        factors = self._factors(measured, predicted, bits)
        if factors is None:
            logger.warning("probe: no block lost measurably at %d bits; the error tables are left as predicted",
                           bits[-1])
            info: dict[str, Any] = {"skipped": f"no measurable loss increase at {bits[-1]} bits"}
        else:
            for block, names in blocks.items():
                for name in names:
                    table = graph.annotation(name).error
                    graph.set_error(name, {k: v * self._factor(factors[block], k[0], bits) for k, v in table.items()})
            info = {}
        info.update({
            "bits": list(bits), "blocks": len(blocks), "base_loss": base, "cached": cached is not None,
            "seconds": round(time.perf_counter() - clock, 3), "tokens": int(sum(b.numel() for b in self.batches)),
            "config": asdict(self.config),
            "measured": {str(b): {str(p): v for p, v in d.items()} for b, d in measured.items()},
            "predicted": {str(b): {str(p): v for p, v in d.items()} for b, d in predicted.items()},
            "factors": None if factors is None else {str(b): {str(p): v for p, v in d.items()}
                                                     for b, d in factors.items()},
        })
        program.state["error_probe"] = info
        if factors is not None:
            spread = [f for d in factors.values() for f in d.values()]
            logger.info("probe: %d blocks × %s bits in %.1f s; block factors %.2f–%.2f", len(blocks), bits,
                        info["seconds"], min(spread), max(spread))
        return PassResult(info={k: info[k] for k in ("bits", "blocks", "seconds", "cached")})

    def _measure(self, program: Program, settings: ErrorSettings, bits: tuple[int, ...],
                 blocks: dict[int, list[str]],
                 ) -> tuple[float, dict[int, dict[int, float]], dict[int, dict[int, float]]]:
        """(fp held-back loss, per block and bit-width: its loss increase, its predicted error)."""
        graph = program.require_graph()
        modules = dict(program.model.named_modules(remove_duplicate=False))
        stats = program.state.get("stats", {})
        model = program.model
        paths = {b: _block_path(names[0]) for b, names in blocks.items()}
        outputs = {b: [] for b in blocks} if self.prefix_cache and all(p in modules for p in paths.values()) else {}
        handles = [modules[paths[b]].register_forward_hook(lambda _m, _a, out, b=b: outputs[b].append(_clone(out)))
                   for b in outputs]
        try:
            base = holdout_loss(model, self.batches)
        finally:
            for handle in handles:
                handle.remove()
        cached = sum(t.numel() * t.element_size() for o in outputs.values() for t in _tensors(o))
        if cached > PREFIX_CACHE_BYTES or any(len(o) != len(self.batches) for o in outputs.values()):
            outputs = {}  # too large to keep (or a block ran more than once a batch): every forward runs whole
        measured: dict[int, dict[int, float]] = {}
        predicted: dict[int, dict[int, float]] = {}
        bar = tqdm(total=len(blocks) * len(bits), desc="probe blocks", unit="forward",
                   disable=tqdm_disable(self.progress))
        for block, names in blocks.items():
            # the blocks before this one see what they saw in the fp forward: their outputs are replayed
            earlier = [b for b in outputs if b < block]
            for p in bits:
                saved: dict[str, torch.Tensor] = {}
                pred = 0.0
                try:
                    with torch.no_grad():
                        for name in names:
                            module = modules[name]
                            layer = graph.layer(name)
                            weight = weight_matrix(module, layer)
                            deq, err = rounded_weight(settings, weight, stats.get(name), p)
                            pred += err
                            saved[name] = module.weight.data
                            new = deq.t() if deq.shape != module.weight.shape else deq
                            module.weight.data = new.to(dtype=module.weight.dtype).contiguous()
                    for b in earlier:
                        replay = iter(outputs[b])
                        modules[paths[b]].forward = lambda *_args, _replay=replay, **_kwargs: _clone(next(_replay))
                    loss = holdout_loss(model, self.batches)
                finally:
                    for b in earlier:
                        vars(modules[paths[b]]).pop("forward", None)
                    with torch.no_grad():
                        for name, data in saved.items():
                            modules[name].weight.data = data
                measured.setdefault(block, {})[p] = loss - base
                predicted.setdefault(block, {})[p] = pred
                bar.update(1)
        bar.close()
        return base, measured, predicted

    def _factors(self, measured: dict[int, dict[int, float]], predicted: dict[int, dict[int, float]],
                 bits: tuple[int, ...]) -> dict[int, dict[int, float]] | None:
        """Per block and probed bit-width: its ratio over the median ratio at the highest bit-width, clipped."""
        def ratio(block: int, p: int) -> float | None:
            pred = predicted[block][p]
            return measured[block][p] / pred if pred > 0 else None

        top = [r for b in measured if (r := ratio(b, bits[-1])) is not None]
        reference = float(np.median(top)) if top else 0.0
        if not reference > 0:
            return None
        lo, hi = 1.0 / self.config.clip, self.config.clip
        return {b: {p: 1.0 if (r := ratio(b, p)) is None else float(np.clip(r / reference, lo, hi)) for p in bits}
                for b in measured}

    @staticmethod
    def _factor(block_factors: dict[int, float], bits: int, probed: tuple[int, ...]) -> float:
        """The factor of the highest probed bit-width ≤ ``bits`` (the lowest when none is); 1 for dense."""
        if bits == DENSE_BITS:
            return 1.0
        below = [p for p in probed if p <= bits]
        return block_factors[max(below) if below else min(probed)]

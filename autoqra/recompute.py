"""Blockwise activation recomputation for a hooked forward and backward (calibration).

A calibration batch runs the whole model forward and backward to read every layer's output
gradient. Kept whole, the autograd graph of one 512-token SmolLM2 window holds ~500 MiB of saved
activations — as much as the model's fp32 weights. Here each repeated block (the children of the
model's outermost `nn.ModuleList` that hold a calibrated layer: a decoder layer) runs under
`torch.utils.checkpoint` (non-reentrant): its saved tensors are dropped after its forward and
recomputed during the backward, one block at a time, so the graph holds the blocks' inputs and
one block's activations.

The backward uses the first forward's graph (the recomputation only regenerates its saved tensors),
so gradient hooks registered during the first forward fire as usual; module hooks fire again during
the recomputation, and :attr:`Recompute.active` tells them to stay quiet then. Non-reentrant
checkpointing checks that the recomputation saves the same tensors (shapes, dtypes) as the first
forward and raises `torch.utils.checkpoint.CheckpointError` otherwise; a hook that makes a
tensor require grad must therefore do so in both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["Recompute", "find_blocks"]

#: keyword arguments through which Hugging Face blocks receive a KV cache (dropped under recomputation)
_CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "layer_past", "cache")


def find_blocks(model: nn.Module, targets: Iterable[nn.Module]) -> list[nn.Module]:
    """The children of `nn.ModuleList` containers that hold at least one of ``targets`` (modules), the
    outermost only (a list of experts inside a decoder layer is part of that layer), in model order."""
    wanted = {id(m) for m in targets}
    blocks: list[nn.Module] = []
    chosen: set[int] = set()
    for _name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or id(module) in chosen:
            continue
        for child in module.children():
            inner = list(child.modules())
            if any(id(m) in chosen for m in inner):
                continue
            if any(id(m) in wanted for m in inner):
                blocks.append(child)
                chosen.update(id(m) for m in inner)
    return blocks


class Recompute:
    """Runs ``blocks`` under non-reentrant activation checkpointing while entered (with grad enabled).

    ``active`` is True while a block's forward is being recomputed during the backward.
    """

    def __init__(self, blocks: Iterable[nn.Module], *, after_block: Callable[[], object] | None = None) -> None:
        self.blocks = list(blocks)
        self.active = False
        self.after_block = after_block

    @contextlib.contextmanager
    def _recomputing(self) -> Iterator[None]:
        previous, self.active = self.active, True
        try:
            yield
        finally:
            self.active = previous
            if self.after_block is not None:
                self.after_block()

    def _contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), self._recomputing()

    def _wrap(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return inner(*args, **kwargs)
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
            for key in _CACHE_ARGUMENTS:  # a KV cache would be appended to again by the recomputation
                if kwargs.get(key) is not None:
                    kwargs[key] = None
            out = checkpoint(inner, *args, use_reentrant=False, context_fn=self._contexts, **kwargs)
            if self.after_block is not None:
                self.after_block()
            return out

        return forward

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        """Within the block, every block's ``forward`` is checkpointed (an instance attribute shadows
        the class's ``forward``; put back on exit)."""
        saved: list[tuple[nn.Module, bool, Any]] = []
        try:
            for block in self.blocks:
                had_own = "forward" in block.__dict__
                saved.append((block, had_own, block.__dict__.get("forward")))
                block.forward = self._wrap(block.forward)  # type: ignore[method-assign]
            yield
        finally:
            for block, had_own, previous in reversed(saved):
                if had_own:
                    block.forward = previous  # type: ignore[method-assign]
                else:
                    del block.forward

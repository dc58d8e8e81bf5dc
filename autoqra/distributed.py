"""torch.distributed helpers: shard work by layer or by batch across ranks, and gather it.

Everything is a no-op in a single process (or when torch.distributed is not initialized), so the
same code runs under ``python``, ``torchrun --nproc_per_node N`` and ``accelerate launch``.

* Sensitivity estimation is sharded **by layer**: rank k computes the error tables of layers
  k, k+N, k+2N, … and the tables are all-gathered, so profiling scales with processes.
* Calibration is sharded **by batch**: every rank runs its share of the calibration batches over
  the whole model (a forward needs every layer anyway) and the per-channel sums are all-reduced,
  giving the same statistics as one process over all batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items`` (round robin: k, k+N, …)."""
    rank, world = rank_and_world()
    return list(items[rank::world])


def all_gather_dict(local: dict[str, Any]) -> dict[str, Any]:
    """Union of every rank's dict (keys are disjoint by construction)."""
    if not is_distributed():
        return local
    parts: list[dict[str, Any] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict[str, Any] = {}
    for part in parts:
        merged.update(part or {})
    return merged


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (float64 on CPU for gloo) and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_int(value: int) -> int:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())

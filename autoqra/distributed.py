"""torch.distributed helpers: shard work by layer or by batch across ranks, and gather it.

Everything is a no-op in a single process (or when torch.distributed is not initialized), so the
same code runs under ``python``, ``torchrun --nproc_per_node N`` and ``accelerate launch``.

* Sensitivity estimation is sharded **by layer**: rank k computes the error tables of layers
  k, k+N, k+2N, … and the tables are all-gathered, so profiling scales with processes.
* Calibration is sharded **by batch**: every rank runs its share of the calibration batches over
  the whole model (a forward needs every layer anyway) and the per-channel sums are all-reduced,
  giving the same statistics as one process over all batches.

**Devices.** Every collective runs on the device its backend reduces on (`collective_device`: the
current CUDA device for NCCL, the CPU for gloo): `all_reduce_sum` moves a tensor there and back,
`all_reduce_int` builds its tensor there, and `check_collective` refuses a tensor on another device
with `CollectiveDeviceError` before torch.distributed sees it (NCCL cannot reduce CPU tensors). The
statistics themselves stay on the model's device until calibration ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from autoqra.errors import CollectiveDeviceError

T = TypeVar("T")

#: backends whose collectives take CUDA tensors only
_CUDA_BACKENDS = ("nccl",)


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


def collective_device(group: Any = None) -> torch.device:
    """The device the process group's backend reduces on: the current CUDA device for NCCL, else the CPU."""
    backend = str(dist.get_backend(group)).lower()
    if any(name in backend for name in _CUDA_BACKENDS):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_collective(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """``tensor``, if the group's backend can reduce it where it is; else `CollectiveDeviceError`."""
    want = collective_device(group)
    if tensor.device.type != want.type:
        raise CollectiveDeviceError(
            f"a {tensor.device.type} tensor was handed to a {dist.get_backend(group)} collective, which reduces "
            f"{want.type} tensors only: move it with autoqra.distributed.all_reduce_sum (it moves to "
            "collective_device() and back), or use the gloo backend for a CPU model"
        )
    return tensor


def all_reduce_sum(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it; the reduction runs on `collective_device`
    (a copy there and back when the tensor lives elsewhere, e.g. CPU statistics under NCCL)."""
    if not is_distributed():
        return tensor
    device = collective_device(group)
    work = tensor if tensor.device == device else tensor.to(device)
    dist.all_reduce(check_collective(work, group), op=dist.ReduceOp.SUM, group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_reduce_int(value: int) -> int:
    """``value`` summed over ranks (a float64 tensor on `collective_device`)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(check_collective(t), op=dist.ReduceOp.SUM)
    return int(t.item())

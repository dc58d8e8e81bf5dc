"""The peak bytes of live tensor storages during some work, on any device.

`torch.cuda.max_memory_allocated` exists on CUDA only, and a process's peak RSS also counts the heap's
fragmentation and everything outside torch. `StoragePeak` counts tensors instead: while it is entered,
every storage an aten op creates (forward, backward, optimizer step) is added to its device's live bytes
when it appears and taken off when Python frees it, and the highest live total is kept. It is a
`TorchDispatchMode`, so it sees what the dispatcher runs, on CPU and on CUDA alike (the autograd engine
carries the mode into the backward), which makes a fine-tuning step's memory measurable on a machine
without a GPU and comparable between models on the same device.

What it does not count: storages that existed before entering (add the model's own,
`autoqra.footprint.held_bytes`, see `peak_with`), memory a kernel allocates for itself without
returning a tensor (workspaces), and the caching allocator's rounding and fragmentation. On CUDA it
reads below ``max_memory_allocated`` by those; the GPU check prints both.

Example::

    with StoragePeak() as peak:
        loss = model(ids).logits.float().logsumexp(-1).mean()
        loss.backward()
    step_bytes = peak.peak_bytes("cpu")  # the highest live total of what the step created
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["StoragePeak"]


def _key(device: torch.device | str) -> str:
    """``str`` of the device as tensors on it print it (``cuda`` → ``cuda:<current>``)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


class StoragePeak(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created while entered, per device (``str(device)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: defaultdict[str, int] = defaultdict(int)
        self.peak: defaultdict[str, int] = defaultdict(int)
        self._finalizers: dict[int, weakref.finalize] = {}

    def peak_bytes(self, device: torch.device | str) -> int:
        """The highest live total on ``device`` since entering (or the last `reset_peak`); ``"cuda"`` without an
        index means the current CUDA device, as in torch."""
        return self.peak[_key(device)]

    def peak_with(self, device: torch.device | str, before: int) -> int:
        """``before`` (bytes already on ``device`` when entering, e.g. the model's) plus the peak."""
        return before + self.peak_bytes(device)

    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now."""
        for key, value in self.live.items():
            self.peak[key] = value

    def _freed(self, key: int, device: str, nbytes: int) -> None:
        self._finalizers.pop(key, None)
        self.live[device] -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {(str(t.device), t.untyped_storage().data_ptr()) for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and not t.is_meta}
        for value in tree_flatten(out)[0]:
            if not isinstance(value, torch.Tensor) or value.is_meta:
                continue
            storage = value.untyped_storage()
            key = id(storage)
            if key in self._finalizers or (str(value.device), storage.data_ptr()) in inputs:
                continue  # a view, an in-place or out= op: no new storage
            device, nbytes = str(value.device), storage.nbytes()
            self._finalizers[key] = weakref.finalize(storage, self._freed, key, device, nbytes)
            self.live[device] += nbytes
            if self.live[device] > self.peak[device]:
                self.peak[device] = self.live[device]
        return out

    def __exit__(self, *exc: Any) -> Any:
        for finalizer in list(self._finalizers.values()):
            finalizer.detach()  # storages that outlive the block are not tracked any more
        self._finalizers.clear()
        return super().__exit__(*exc)

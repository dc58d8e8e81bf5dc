"""What a model really holds: bytes of the distinct tensor storages reachable from its modules.

This is the independent check of the one cost model (:mod:`autoqra.ir.cost`): it never uses the
cost formula, it walks every module's parameters, buffers and any tensor it keeps in an
attribute (a kernel layout cached beside the weights, a tuple of such tensors, ...), and adds up
each distinct storage once (shared / tied tensors count once, views count their whole storage).
Gradients and optimizer state are training state, not the model, and are not counted.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator

import torch
from torch import nn

__all__ = ["held_bytes", "held_tensors", "layers_held_bytes"]


def _tensors_in(value: object, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 3 and isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors_in(item, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item, depth + 1)


def held_tensors(modules: Iterable[nn.Module], skip: Collection[str] = ()) -> Iterator[torch.Tensor]:
    """Every tensor the modules hold (parameters, buffers, tensor-valued attributes), not recursing
    into submodules (pass ``model.modules()`` for a whole model); ``skip``: names left out."""
    for module in modules:
        for name, value in vars(module).items():
            if name in ("_parameters", "_buffers"):
                yield from (t for k, t in value.items() if t is not None and k not in skip)
            elif name != "_modules" and name not in skip:
                yield from _tensors_in(value)


def held_bytes(modules: nn.Module | Iterable[nn.Module], skip: Collection[str] = ()) -> int:
    """Bytes of the distinct storages held by ``modules`` (a module means it and all its submodules)."""
    if isinstance(modules, nn.Module):
        modules = list(modules.modules())
    seen: dict[tuple[torch.device, int], int] = {}
    for tensor in held_tensors(modules, skip):
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr())
        if storage.data_ptr() == 0:  # an empty storage: nothing held
            continue
        seen[key] = max(seen.get(key, 0), storage.nbytes())
    return sum(seen.values())


def layers_held_bytes(model: nn.Module) -> int:
    """Bytes held by the model's compiled layers (``QuantLoRALinear``: codes, scales, zeros or the
    16-bit weight, adapters, any kernel copy), biases excluded as the cost model excludes them (they
    are untouched parameters): the figure that must equal the plan's bytes."""
    from autoqra.modules.quant_lora_linear import QuantLoRALinear

    return held_bytes([m for m in model.modules() if isinstance(m, QuantLoRALinear)], skip=("bias",))

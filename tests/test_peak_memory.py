"""`StoragePeak` (live / peak bytes of tensor storages) and what a bf16 layer's adapter keeps for the backward."""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from layer_checks import check_bf16_adapter_keeps_the_input
from tiny_models import tiny_llama

import autoqra
from autoqra.footprint import held_bytes
from autoqra.loss import causal_lm_loss
from autoqra.modules.quant_lora_linear import QuantLoRALinear
from autoqra.peak_memory import StoragePeak

MIB = 2**20


def _alloc_free() -> None:
    a = torch.empty(MIB // 4)
    del a


def _alloc_two_then_free_one() -> torch.Tensor:
    a = torch.empty(MIB // 4)
    b = a * 2
    del a
    return b


def _views_and_in_place() -> torch.Tensor:
    a = torch.zeros(MIB // 4)
    a.view(2, -1).add_(1)
    torch.mul(a, 2, out=a)
    return a[:10]


def _existing_tensor_updated_in_place(p: torch.Tensor) -> None:
    p.mul_(2)
    p.add_(1)


@pytest.mark.parametrize("work, peak, live", [
    (_alloc_free, MIB, 0),
    (_alloc_two_then_free_one, 2 * MIB, MIB),      # the returned tensor is still alive inside the block
    (_views_and_in_place, MIB, MIB),               # views, in-place and out= ops create no storage
    (lambda: _existing_tensor_updated_in_place(torch.ones(10)), 40, 0),  # only the factory's 40 bytes
])
def test_storage_peak_counts_storages_once(work: Callable[[], object], peak: int, live: int) -> None:
    with StoragePeak() as tracker:
        kept = work()
        gc.collect()
        assert tracker.live["cpu"] == live
    assert tracker.peak_bytes("cpu") == peak
    del kept


def test_storage_peak_names_devices_as_their_tensors_do() -> None:
    with StoragePeak() as tracker:
        kept = torch.empty(256, device="cpu")
    assert tracker.peak_bytes("cpu") == tracker.peak_bytes(torch.device("cpu")) == 1024
    del kept


def test_storage_peak_ignores_storages_from_before_and_resets() -> None:
    p = torch.ones(MIB // 4)
    with StoragePeak() as tracker:
        p.add_(1)
        _alloc_free()
        tracker.reset_peak()
        small = torch.empty(16)
    assert tracker.peak_bytes("cpu") == 64
    assert tracker.peak_with("cpu", before=held_bytes([torch.nn.Linear(4, 4)])) == 64 + 4 * 20
    del small


def test_bf16_input_adapter_matches_plain_ops_and_keeps_no_fp32_copy_of_the_input() -> None:
    check_bf16_adapter_keeps_the_input("cpu")


def test_bf16_model_step_needs_less_than_the_fp32_copies_would() -> None:
    """One training step of a compiled bf16 tiny Llama, tensor peak with the adapter product as shipped
    against the same step with the input cast to fp32 in plain ops (the copies this file's fix removed)."""
    model = tiny_llama().to(torch.bfloat16)
    autoqra.compile(model, "16bits", bits=(4,), ranks=(8,), cache_dir=None, progress=False)
    ids = torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(0))

    def step_peak(work: torch.nn.Module) -> int:
        for n, p in work.named_parameters():
            p.requires_grad_(n.endswith(("lora_A", "lora_B")))
        with StoragePeak() as tracker:
            loss, _ = causal_lm_loss(work, {"input_ids": ids}, use_cache_flag=True, chunk_tokens=None)
            loss.backward()
        return tracker.peak_bytes("cpu")

    shipped = step_peak(model)
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if isinstance(m, QuantLoRALinear):
            m.forward = _plain_adapter_forward(m)  # type: ignore[method-assign]
    assert step_peak(plain) > shipped * 1.1


def _plain_adapter_forward(m: QuantLoRALinear) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        y = m._base_forward(x)
        return m._add_bias(y + (F.linear(F.linear(x.float(), m.lora_A), m.lora_B) * m.scaling).to(y.dtype))
    return forward


def test_autocast_adapter_runs_in_fp32_and_saves_no_copy_of_the_input() -> None:
    """Under bf16 autocast the base product runs in bf16, the adapter in its own fp32 on the input as given:
    nothing of the input's size is saved in bf16 (autocast's cast would save one per layer)."""
    torch.manual_seed(0)
    layer = QuantLoRALinear.from_linear(torch.nn.Linear(64, 96), bits=4, rank=8, group_size=32, loftq_iters=0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(10, 64, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = layer(x)
    assert y.dtype == torch.bfloat16
    assert [t for t in saved if t.dtype == torch.bfloat16 and t.numel() == x.numel()] == []
    delta = F.linear(F.linear(x, layer.lora_A), layer.lora_B) * layer.scaling
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = layer._base_forward(x)
    assert torch.equal(y, layer._add_bias(base + delta.to(torch.bfloat16)))

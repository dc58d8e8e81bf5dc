"""Budget == memory, measured through tensor storages (never through the cost formula)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama
from torch import nn

import autoqra
from autoqra.footprint import held_bytes, layers_held_bytes
from autoqra.io import load, save
from autoqra.ir.cost import CostModel
from autoqra.modules.quant_lora_linear import QuantLoRALinear
from autoqra.quant import int4_layout

CALIB = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def _forward_backward(m: nn.Module, in_features: int) -> None:
    x = torch.randn(3, 5, in_features, requires_grad=True)
    m(x).sum().backward()


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def test_encode_matches_torch_and_decode_inverts_it() -> None:
    assert int4_layout.layout_matches_torch()
    for n, k in [(64, 64), (192, 576), (128, 320)]:
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
        layout = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        assert torch.equal(int4_layout.encode(codes), layout)
        assert torch.equal(int4_layout.decode(layout).int(), codes)
        if n >= 128:
            assert torch.equal(int4_layout.decode(layout, 64, 128).int(), codes[64:128])
    with pytest.raises(ValueError):
        int4_layout.encode(torch.zeros(48, 64, dtype=torch.int32))


# (in, out, bits, rank, group, adapter dtype)
CASES = [
    (200, 128, 4, 8, 64, torch.float32),  # int4 kernel layout held instead of the packed codes
    (576, 576, 4, 0, 64, torch.float32),
    (256, 192, 4, 4, 128, torch.bfloat16),
    (200, 80, 4, 8, 64, torch.float32),  # out not a multiple of the layout block (64 / 32): packed, chunked
    (200, 128, 3, 8, 64, torch.float32),
    (200, 128, 2, 16, 32, torch.float32),
    (200, 128, 8, 4, 64, torch.bfloat16),
    (200, 128, 16, 8, 64, torch.float32),
]


@pytest.mark.parametrize(("in_f", "out_f", "bits", "rank", "group", "dtype"), CASES)
def test_layer_holds_exactly_its_cost(in_f, out_f, bits, rank, group, dtype) -> None:
    m = QuantLoRALinear.from_linear(nn.Linear(in_f, out_f), bits, rank, group_size=group, adapter_dtype=dtype)
    cost = CostModel(group_size=group, adapter_bytes=dtype.itemsize).layer_bytes(in_f, out_f, bits, rank)
    bias = _storage_bytes(m.bias)
    assert held_bytes(m) - bias == cost  # before any forward
    _forward_backward(m, in_f)
    _forward_backward(m, in_f)
    assert held_bytes(m) - bias == cost  # after forwards and backwards: nothing cached beside
    assert held_bytes([m], skip=("bias",)) == cost


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kernel_cache_is_opt_in_and_counted(bits: int) -> None:
    m = QuantLoRALinear.from_linear(nn.Linear(256, 128), bits, 8, kernel_cache=True)
    cost = CostModel().layer_bytes(256, 128, bits, 8)
    assert held_bytes([m], skip=("bias",)) == cost
    _forward_backward(m, 256)
    held = held_bytes([m], skip=("bias",))
    # bf16 scale/offset pairs (128 × 4 groups × 2 × 2), and below 4 bits a 4-bit copy of the codes (128 × 256 / 2)
    assert held == cost + 128 * 4 * 2 * 2 + (128 * 256 // 2 if bits < 4 else 0)


def test_int4_layout_round_trips_state_dict_save_and_device_moves(tmp_path) -> None:
    src = QuantLoRALinear.from_linear(nn.Linear(200, 128), 4, 8)
    assert src.layout == "int4_cpu"
    state = src.state_dict()
    assert state["qweight"].shape == (128 * 256 // 2,)  # the saved form is always the packed one
    dst = QuantLoRALinear(200, 128, 4, 8)
    dst.load_state_dict(state)
    assert dst.layout == "int4_cpu" and torch.equal(dst.qweight, src.qweight)
    x = torch.randn(4, 200)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))
        meta = QuantLoRALinear(200, 128, 4, 8).to("meta")
    assert meta.layout == "packed"  # only CPU holds the kernel layout
    src.fast_path = False
    assert src.layout == "packed" and torch.equal(src.qweight, state["qweight"])


def test_compiled_model_holds_its_plan_bytes(tmp_path) -> None:
    model = tiny_llama()
    result = autoqra.compile(model, "8bits", calib=CALIB, ranks=(0, 4, 8), cache_dir=None, progress=False,
                             objective="deploy", select=False)
    plan = result.plan
    assert {b for b, _ in plan.layers.values()} & {4}, "the plan should exercise the int4 layout"
    assert layers_held_bytes(model) == plan.total_bytes
    ids = torch.randint(3, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert layers_held_bytes(model) == plan.total_bytes
    assert result.report["held_bytes"] == plan.total_bytes
    save(model, tmp_path)
    loaded = load(tmp_path, tiny_llama())
    assert layers_held_bytes(loaded) == plan.total_bytes

"""The quantization memo: a hit is exactly the backend's result, bounded, and invisible to the plan."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_llama

import autoqra
from autoqra.passes.select import SelectConfig
from autoqra.quant.base import QuantSpec, get_backend
from autoqra.quant.memo import QuantMemo, active_memo, quant_memo, quantize_memo

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))


def _same(a, b) -> bool:  # noqa: ANN001
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("packed", "scale", "zero"))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_a_hit_is_the_backend_result_on_a_copy(bits: int) -> None:
    backend = get_backend("packed")
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(bits))
    imp = torch.rand(128, generator=torch.Generator().manual_seed(1)) + 0.1
    spec = QuantSpec(bits=bits)
    plain = backend.quantize(w, spec, importance=imp)
    assert active_memo() is None
    with quant_memo() as memo:
        first = quantize_memo(backend, w, spec, importance=imp)
        again = quantize_memo(backend, w.clone(), spec, importance=imp.clone())  # content, not identity
        quantize_memo(backend, w, spec, importance=imp.flip(0))  # another importance: a miss
        assert memo.stats()["hits"] == 1 and memo.stats()["misses"] == 2
    assert active_memo() is None
    assert _same(first, plain) and _same(again, plain)
    assert again.packed.data_ptr() != first.packed.data_ptr()  # callers own their tensors


def test_bounded_least_recently_used() -> None:
    backend = get_backend("packed")
    spec = QuantSpec(bits=4)
    ws = [torch.randn(32, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    one = QuantMemo().key(backend, spec, ws[0], None)
    size = 32 * 64 // 2 + 2 * 2 * 32  # packed 4-bit codes + fp16 scale and zero
    with quant_memo(2 * size, reuse=False) as memo:
        for w in ws:
            quantize_memo(backend, w, spec)
        assert memo.stats()["entries"] == 2 and memo.nbytes == 2 * size
        assert memo.get(one) is None  # the oldest went first
        quantize_memo(backend, ws[2], spec)
        assert memo.stats()["hits"] == 1
    with pytest.raises(ValueError, match="max_bytes"):
        QuantMemo(-1)


def test_compile_reuses_roundings_and_the_result_is_unchanged() -> None:
    model = tiny_llama()
    kwargs = dict(calib=CALIB, cache_dir=None, progress=False, select=SelectConfig(score_steps=2, max_finetuned=2))
    plain_model = copy.deepcopy(model)
    with quant_memo(0):  # an open memo that keeps nothing: the compile joins it and every rounding is computed
        plain = autoqra.compile(plain_model, "5bits", **kwargs)
    assert plain.report["quant_memo"]["hits"] == 0
    memo_result = autoqra.compile(model, "5bits", **kwargs)
    assert memo_result.report["quant_memo"]["hits"] > 0
    assert memo_result.plan.to_dict() == plain.plan.to_dict()
    state, plain_state = model.state_dict(), plain_model.state_dict()
    assert state.keys() == plain_state.keys()
    assert all(torch.equal(state[k], plain_state[k]) for k in state)


def test_the_sensitivity_pass_and_the_builds_round_identically() -> None:
    """Every build's first rounding (LoftQ's, or a rank-0 layer's) is answered by the sensitivity pass's:
    they compute the quantizer's importance by one definition (`input_importance`)."""
    model = tiny_llama()
    n_layers = sum(isinstance(m, torch.nn.Linear) for m in model.modules()) - 1  # lm_head is not quantized
    with quant_memo() as memo:
        autoqra.compile(model, "5bits", calib=CALIB, cache_dir=None, progress=False, select=False,
                        bits=(2, 4), ranks=(0, 8))
    # the sensitivity pass: one miss per (layer, bits); the materialized plan: one hit per layer
    assert memo.stats()["misses"] == 2 * n_layers
    assert memo.stats()["hits"] == n_layers


@pytest.mark.parametrize(("bits", "rank"), [(3, 8), (4, 0), (2, 4)])
def test_loftq_inits_are_kept_only_when_asked_and_equal_a_fresh_build(bits: int, rank: int) -> None:
    from autoqra.quant.loftq import loftq_init

    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(bits))
    d = torch.rand(128, generator=torch.Generator().manual_seed(1)) + 0.1
    g = torch.rand(48, generator=torch.Generator().manual_seed(2)) + 0.1
    fresh = loftq_init(w, bits, rank, d=d, g=g)
    with quant_memo(reuse=False) as memo:  # a compile's own memo: roundings only
        loftq_init(w, bits, rank, d=d, g=g)
        loftq_init(w, bits, rank, d=d, g=g)
        assert not any(k[0] == "loftq" for k in memo._items)
    with quant_memo(reuse=False, inits=True) as memo:
        first = loftq_init(w, bits, rank, d=d, g=g)
        hits = memo.stats()["hits"]
        again = loftq_init(w.clone(), bits, rank, d=d.clone(), g=g.clone())
        assert memo.stats()["hits"] == hits + 1  # the whole init from memory
        other = loftq_init(w, bits, rank, d=d, g=g.flip(0))  # other statistics: built anew
        assert memo.stats()["hits"] == hits + 2  # a miss for the init; its first rounding (g-free) hits
    for got in (first, again):
        assert _same(got[0], fresh[0]) and torch.equal(got[1], fresh[1]) and torch.equal(got[2], fresh[2])
    assert again[0].packed.data_ptr() != first[0].packed.data_ptr()  # callers own their tensors
    assert rank == 0 or not torch.equal(other[2], fresh[2])


@pytest.mark.parametrize("outer", [False, True], ids=["compile's own memo", "an outer memo"])
def test_compile_empties_its_own_memo_before_the_short_fine_tunes(outer: bool, monkeypatch) -> None:  # noqa: ANN001
    """The roundings serve the candidates' builds; during the short fine-tunes compile's own memo holds
    nothing (memory for the fine-tune), while a memo the caller opened keeps its entries."""
    from autoqra.passes.select import SelectPlanPass

    held: list[int] = []
    original = SelectPlanPass._finetune_loss

    def spy(self, program, modules, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        held.append(active_memo().nbytes)
        return original(self, program, modules, *args, **kwargs)

    monkeypatch.setattr(SelectPlanPass, "_finetune_loss", spy)
    torch.manual_seed(0)
    model = tiny_llama()
    kwargs = dict(calib=CALIB, cache_dir=None, progress=False, ranks=(0, 4, 8),
                  select=SelectConfig(score_steps=1, lambdas=(1.0,)))
    if outer:
        with quant_memo() as memo:
            result = autoqra.compile(model, "5bits", **kwargs)
            assert memo.nbytes > 0
    else:
        result = autoqra.compile(model, "5bits", **kwargs)
    assert held, "no candidate was fine-tuned"
    assert all(n > 0 for n in held) if outer else all(n == 0 for n in held)
    assert result.report["quant_memo"]["hits"] > 0  # the builds still reused the sensitivity pass's roundings

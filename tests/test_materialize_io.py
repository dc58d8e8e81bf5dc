"""MaterializePass (rewrite), ValidatePlanPass (check first), save/load round trips."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import MLP, logits_of, tiny_gpt2, tiny_llama

import autoqra
from autoqra.io import SaveFormatError, load, save
from autoqra.ir.cost import CostModel
from autoqra.modules.quant_lora_linear import QuantLoRALinear
from autoqra.passes import PassManager
from autoqra.passes.validate import PlanValidationError, ValidatePlanPass

IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(1))
FAST = dict(cache_dir=None, progress=False)


def _logits(model, ids=IDS):
    return logits_of(model, ids)


@pytest.fixture(scope="module")
def compiled():
    model = tiny_llama()
    result = autoqra.compile(model, "8bits", calib=CALIB, ranks=(4, 8), **FAST)
    return result


def test_every_layer_swapped_and_only_adapters_train(compiled):
    model, plan = compiled.model, compiled.plan
    swapped = {n: m for n, m in model.named_modules() if isinstance(m, QuantLoRALinear)}
    assert set(swapped) == set(plan.layers)
    for name, module in swapped.items():
        assert (module.bits, module.rank) == plan.layers[name]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad)
    model.zero_grad()


def test_real_bytes_equal_cost_model(compiled):
    cm = CostModel()
    for name, module in compiled.model.named_modules():
        if isinstance(module, QuantLoRALinear):
            assert module.state_nbytes() == compiled.plan.layer_bytes[name]
            assert module.state_nbytes() == cm.layer_bytes(module.in_features, module.out_features, module.bits, module.rank)
    total = sum(m.state_nbytes() for m in compiled.model.modules() if isinstance(m, QuantLoRALinear))
    assert total == compiled.plan.total_bytes <= compiled.plan.budget_bytes


def test_compiled_model_stays_close_to_original(compiled):
    ref = _logits(tiny_llama())
    out = _logits(compiled.model)
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 0.2


def test_save_load_exact_round_trip(compiled, tmp_path):
    save(compiled.model, tmp_path)
    meta = json.loads((tmp_path / "autoqra_plan.json").read_text())
    assert meta["plan"]["layers"] == compiled.plan.to_dict()["layers"]
    restored = load(tmp_path, tiny_llama())
    assert torch.equal(_logits(restored), _logits(compiled.model))
    assert restored.autoqra_plan == compiled.plan
    # also onto a freshly-initialized model from the config alone
    fresh = load(tmp_path, tiny_llama().config)
    assert torch.equal(_logits(fresh), _logits(compiled.model))


def test_load_errors_leave_base_untouched(compiled, tmp_path):
    save(compiled.model, tmp_path)
    base = tiny_llama()
    before = _logits(base)
    meta = json.loads((tmp_path / "autoqra_plan.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "autoqra_plan.json").write_text(json.dumps(meta))
    with pytest.raises(SaveFormatError, match="upgrade autoqra"):
        load(tmp_path, base)
    meta["format_version"] = 1  # a format-1 folder had no manifest: the tensor file itself is checked
    (tmp_path / "autoqra_plan.json").write_text(json.dumps(meta))
    (tmp_path / "manifest.json").unlink()
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SaveFormatError, match="cannot be read"):
        load(tmp_path, base)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(SaveFormatError, match="missing"):
        load(tmp_path, base)
    assert not any(isinstance(m, QuantLoRALinear) for m in base.modules())
    assert torch.equal(_logits(base), before)


@pytest.mark.parametrize("damage", ["tamper", "truncate", "no-manifest", "bad-manifest"])
def test_manifest_catches_damaged_and_interrupted_saves(compiled, tmp_path, damage):
    (tmp_path / "notes.txt").write_text("mine")
    save(compiled.model, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"  # other files in the folder are left alone
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.")]  # no temp left
    tensors = tmp_path / "model.safetensors"
    if damage == "tamper":
        data = bytearray(tensors.read_bytes())
        data[-1] ^= 0xFF
        tensors.write_bytes(bytes(data))
    elif damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:-10])
    elif damage == "no-manifest":  # what an interrupted save leaves
        (tmp_path / "manifest.json").unlink()
    else:
        (tmp_path / "manifest.json").write_text("{not json")
    base = tiny_llama()
    with pytest.raises(SaveFormatError, match="manifest|re-save"):
        load(tmp_path, base)
    assert not any(isinstance(m, QuantLoRALinear) for m in base.modules())


def test_load_onto_wrong_architecture(compiled, tmp_path):
    save(compiled.model, tmp_path)
    with pytest.raises(SaveFormatError, match="does not exist|does not match"):
        load(tmp_path, tiny_llama(layers=1))


def test_save_uncompiled_model_errors(tmp_path):
    with pytest.raises(autoqra.AutoQRAError, match="compile"):
        save(tiny_llama(), tmp_path)


def test_gpt2_conv1d_materializes_and_round_trips(tmp_path):
    model = tiny_gpt2()
    ref = _logits(tiny_gpt2())
    autoqra.compile(model, "4.5bits", calib=CALIB, **FAST)
    assert isinstance(model.transformer.h[0].attn.c_attn, QuantLoRALinear)
    out = _logits(model)
    assert float((out - ref).norm() / ref.norm()) < 0.2
    save(model, tmp_path)
    assert torch.equal(_logits(load(tmp_path, tiny_gpt2())), out)


def test_tied_lm_head_materialized_once(tmp_path):
    model = tiny_llama(tie=True)
    autoqra.compile(model, "6bits", include=("lm_head",), tied_embedding="keep", **FAST)
    assert isinstance(model.lm_head, QuantLoRALinear)
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)  # kept: its own float matrix
    shared = tiny_llama(tie=True)
    autoqra.compile(shared, "6bits", include=("lm_head",), **FAST)  # the default reads the lm_head's codes
    assert shared.model.embed_tokens.source is shared.lm_head


def test_backend_without_the_searched_bits_is_refused_up_front():
    model = MLP()
    with pytest.raises(autoqra.errors.ConfigError, match=r"supports bits \(4, 8\), not \[2, 3\]"):
        autoqra.compile(model, "4bits", example_inputs=(torch.randn(2, 32),), backend="bnb", bits=(2, 3, 4), **FAST)
    assert not any(isinstance(m, QuantLoRALinear) for m in model.modules())


def test_validation_collects_all_failures_before_touching_modules():
    model = MLP()
    program = autoqra.analyze(model, (torch.randn(2, 32),))
    graph = program.graph
    graph.set_choice("fc1", 3, 0)
    graph.set_choice("fc2", 2, 4)
    graph.set_choice("fc3", 4, 0)
    manager = PassManager([ValidatePlanPass(backend="bnb", budget_bytes=10)],
                          initial=frozenset({"model", "fx", "graph", "bits", "rank"}))
    with pytest.raises(PlanValidationError) as info:
        manager.run(program)
    text = str(info.value)
    assert "3 problem(s)" in text and "fc3" not in text  # fc3 at 4 bits is supported by bnb
    assert "fc1: backend 'bnb' supports bits (4, 8), not 3" in text
    assert "fc2: backend 'bnb' supports bits (4, 8), not 2" in text
    assert "over the budget of 10" in text
    assert not any(isinstance(m, QuantLoRALinear) for m in model.modules())


def test_plan_only_changes_nothing():
    model = tiny_llama()
    before = _logits(model)
    autoqra.compile(model, "3bits", materialize=False, **FAST)
    assert torch.equal(_logits(model), before)

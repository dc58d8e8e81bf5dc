"""Hugging Face Trainer on a compiled model, and the peft adapter round trip."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama

import autoqra
from autoqra.errors import NotCompiledError, PeftExportError
from autoqra.io import load, save
from autoqra.modules.quant_lora_linear import QuantLoRALinear
from autoqra.peft_interop import save_peft_adapter, to_peft_config
from autoqra.plan import Plan

CALIB = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
FAST = dict(calib=CALIB, ranks=(4, 8), cache_dir=None, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomize_adapters(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantLoRALinear) and m.rank:
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.1)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_hf_trainer_trains_a_compiled_model_unchanged(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    autoqra.compile(model, "8bits", **FAST)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B"))
    }
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = torch.randperm(125, generator=torch.Generator().manual_seed(2))[:40].add(3).repeat(16)[: 16 * 32].view(16, 32)
    dataset = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-2, logging_steps=1,
                             gradient_checkpointing=True)  # the Trainer turns it on itself
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if n.endswith(("lora_A", "lora_B"))}
    save(model, tmp_path / "saved")
    restored = load(tmp_path / "saved", tiny_llama())
    assert torch.equal(_logits(restored.eval()), _logits(model.eval()))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_peft_adapter_round_trip_on_the_fp32_base(tmp_path, make):
    from peft import PeftModel

    model = make()
    autoqra.compile(model, "8bits", alpha=16.0, ranks=(4, 8), cache_dir=None, progress=False)  # data-free
    _randomize_adapters(model)
    ours = {n: m for n, m in model.named_modules() if isinstance(m, QuantLoRALinear) and m.rank}
    config = to_peft_config(model)
    assert set(config.target_modules) == set(ours)
    assert config.rank_pattern == {n: m.rank for n, m in ours.items()}
    assert config.alpha_pattern == {n: m.scaling * m.rank for n, m in ours.items()}
    save_peft_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] == sorted(ours)

    peft_model = PeftModel.from_pretrained(make(), tmp_path)
    peft_layers = dict(peft_model.base_model.model.named_modules())
    reference = make()  # the fp32 base with our deltas merged in
    conv1d = make is tiny_gpt2  # weights stored [in, out]
    for name, layer in ours.items():
        delta = layer.delta_weight().detach()
        theirs = peft_layers[name].get_delta_weight("default").detach()
        torch.testing.assert_close(theirs.T if conv1d else theirs, delta, rtol=1e-6, atol=1e-7)
        with torch.no_grad():
            reference.get_submodule(name).weight += delta.T if conv1d else delta
    torch.testing.assert_close(_logits(peft_model), _logits(reference), rtol=0, atol=1e-5)
    assert not torch.allclose(_logits(make()), _logits(reference), atol=1e-3)  # the deltas do matter


def test_to_peft_config_from_a_plan_skips_rank_0_layers():
    plan = Plan(layers={"a.fc": (4, 0), "b.fc": (4, 8), "b.out": (16, 4)}, total_bytes=1, budget_bytes=1,
                predicted_error=0.0, settings={"alpha": None})
    config = to_peft_config(plan)
    assert set(config.target_modules) == {"b.fc", "b.out"}
    assert config.rank_pattern == {"b.fc": 8, "b.out": 4}
    assert config.alpha_pattern == {"b.fc": 8.0, "b.out": 4.0}  # scaling 1 = autoqra's default
    assert to_peft_config(plan, alpha=32.0).alpha_pattern == {"b.fc": 32.0, "b.out": 32.0}


def test_nested_names_get_exact_keys():
    # "fc" is a dot-suffix of "block.fc": a plain key / list target would select both
    plan = Plan(layers={"fc": (4, 8), "block.fc": (4, 4), "head": (4, 0), "x.head": (4, 0)}, total_bytes=1,
                budget_bytes=1, predicted_error=0.0)
    config = to_peft_config(plan)
    assert config.rank_pattern == {"^fc": 8, "block.fc": 4}
    plan2 = Plan(layers={"head": (4, 8), "x.head": (4, 0)}, total_bytes=1, budget_bytes=1, predicted_error=0.0)
    config2 = to_peft_config(plan2)
    assert isinstance(config2.target_modules, str)  # an exact regex: "head" must not select "x.head"
    assert config2.rank_pattern == {"^head": 8}


def test_peft_export_errors():
    with pytest.raises(NotCompiledError, match=r"autoqra\.compile"):
        to_peft_config(tiny_llama())
    plan = Plan(layers={"a": (4, 0)}, total_bytes=1, budget_bytes=1, predicted_error=0.0)
    with pytest.raises(PeftExportError, match="every rank is 0"):
        to_peft_config(plan)


def test_fp32_target_exports_only_what_fine_tuning_learned(tmp_path):
    """On the fp32 base, the exported adapter is B A − B₀ A₀: zero before training, and after training
    PeftModel(fp32 base) is closer to the fine-tuned compiled model than the fp32 base alone."""
    from peft import PeftModel

    from autoqra.train import finetune

    stream = torch.randint(3, 128, (29,), generator=torch.Generator().manual_seed(4)).repeat(60)
    model = tiny_llama()
    autoqra.compile(model, "8bits", calib=stream[:512].view(8, 64), ranks=(4, 8), cache_dir=None, progress=False,
                    select=False)
    save_peft_adapter(model, tmp_path / "untrained", target="fp32")
    untrained = PeftModel.from_pretrained(tiny_llama(), tmp_path / "untrained")
    torch.testing.assert_close(_logits(untrained), _logits(tiny_llama()), rtol=0, atol=1e-6)

    finetune(model, stream, steps=30, lr=5e-3, batch_size=4, seq_len=32, progress=False)
    save(model, tmp_path / "saved")  # the initial factors travel with the saved model
    restored = load(tmp_path / "saved", tiny_llama())
    save_peft_adapter(restored, tmp_path / "fp32", target="fp32")
    config = json.loads((tmp_path / "fp32" / "adapter_config.json").read_text())
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, QuantLoRALinear) and m.rank}
    assert config["rank_pattern"] == {n: 2 * r for n, r in ranks.items()}
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "fp32")
    tuned = _logits(model.eval())
    base = _logits(tiny_llama())
    ported = _logits(peft_model)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert rel(ported, tuned) < 0.5 * rel(base, tuned)
    # the old export (trained factors as they are) on the fp32 base double-counts the init
    save_peft_adapter(model, tmp_path / "quantized")
    naive = _logits(PeftModel.from_pretrained(tiny_llama(), tmp_path / "quantized"))
    assert rel(ported, tuned) < rel(naive, tuned)
    with pytest.raises(autoqra.AutoQRAError, match="target"):
        save_peft_adapter(model, tmp_path / "x", target="int4")

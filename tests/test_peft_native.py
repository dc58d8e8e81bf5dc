"""The peft-native prototype (`autoqra.peft_native`): a compiled model as a ``peft.PeftModel``."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_llama
from torch import nn

import autoqra
from autoqra.errors import ConfigError, NotCompiledError, PeftExportError
from autoqra.modules.quant_lora_linear import QuantLoRALinear
from autoqra.peft_interop import save_peft_adapter
from autoqra.peft_native import (
    PackedLoraLinear,
    load_adapter,
    load_peft_model,
    merge_to_dense,
    save_base,
    strip_adapters,
    to_autoqra,
    to_peft_model,
)

IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
ROWS = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(1))

#: layer i of the tiny Llama gets bits[i % len(bits)] and ranks[i % len(ranks)]
LAYOUTS = {
    "2bit": dict(bits=(2,), ranks=(2, 4, 8)),
    "3bit": dict(bits=(3,), ranks=(8, 2, 4)),
    "4bit": dict(bits=(4,), ranks=(4, 8, 2)),
    "8bit": dict(bits=(8,), ranks=(2, 8)),
    "16bit": dict(bits=(16,), ranks=(8, 4)),
    "mixed+rank0+alpha": dict(bits=(2, 3, 4, 8, 16), ranks=(4, 0, 8, 2), alpha=16.0),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _compiled(bits=(4,), ranks=(4, 8), alpha=None, seed=3):
    """A tiny Llama whose decoder linears are QuantLoRALinear at the given per-layer bits / ranks
    (LoftQ init, one iteration), adapters then randomized so every delta matters."""
    model = tiny_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers")]
    for i, name in enumerate(names):
        layer = QuantLoRALinear.from_linear(model.get_submodule(name), bits[i % len(bits)], ranks[i % len(ranks)],
                                            alpha=alpha, loftq_iters=1, name=name)
        model.set_submodule(name, layer)
    _randomize(model, seed)
    return model.requires_grad_(False).apply(_adapters_trainable)


def _adapters_trainable(module):
    if isinstance(module, QuantLoRALinear) and module.rank:
        module.lora_A.requires_grad_(True)
        module.lora_B.requires_grad_(True)


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantLoRALinear) and m.rank:
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.2)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)


def _logits(model, ids=IDS, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _ranks(model):
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, QuantLoRALinear)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_peft_model_forward_equals_the_compiled_model(layout):
    model = _compiled(**LAYOUTS[layout])
    ranks, reference = _ranks(model), _logits(model)
    scalings = {n: m.scaling for n, m in model.named_modules() if isinstance(m, QuantLoRALinear) and m.rank}
    peft_model = to_peft_model(model)
    wrapped = {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, PackedLoraLinear)}
    assert {n: m.r["default"] for n, m in wrapped.items()} == {n: r for n, r in ranks.items() if r}
    assert {n: m.scaling["default"] for n, m in wrapped.items()} == pytest.approx(scalings)
    assert all(m.get_base_layer().rank == 0 for m in wrapped.values())
    assert all(m.lora_A["default"].weight.dtype == torch.float32 for m in wrapped.values())  # not the fp16 base's
    unwrapped = [n for n, r in ranks.items() if not r]  # rank 0 in the plan: not targeted, still packed
    assert all(isinstance(peft_model.base_model.model.get_submodule(n), QuantLoRALinear) for n in unwrapped)
    assert torch.equal(_logits(peft_model), reference)  # same ops in the same order: bit for bit
    with peft_model.disable_adapter():
        assert not torch.allclose(_logits(peft_model), reference, atol=1e-3)


def test_gradients_reach_only_peft_lora_params_and_match_autoqra():
    model = _compiled(bits=(2, 4, 8), ranks=(4, 8))
    twin = copy.deepcopy(model)
    peft_model = to_peft_model(model)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    peft_model(input_ids=ROWS, labels=ROWS).loss.backward()
    twin(input_ids=ROWS, labels=ROWS).loss.backward()
    assert all(p.grad is None for n, p in peft_model.named_parameters() if n not in trainable)
    for name, layer in peft_model.base_model.model.named_modules():
        if isinstance(layer, PackedLoraLinear):
            ours = twin.get_submodule(name)
            torch.testing.assert_close(layer.lora_A["default"].weight.grad, ours.lora_A.grad, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(layer.lora_B["default"].weight.grad, ours.lora_B.grad, rtol=1e-5, atol=1e-7)
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = peft_model(input_ids=ROWS, labels=ROWS).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_save_pretrained_and_from_pretrained_over_autoqra_load(tmp_path):
    from peft import PeftModel

    model = tiny_llama()
    autoqra.compile(model, "8bits", ranks=(4, 8), cache_dir=None, progress=False)  # data-free: quick
    _randomize(model, 5)
    reference, compiled = _logits(model), copy.deepcopy(model)
    save_peft_adapter(compiled, tmp_path / "exported")  # autoqra's own peft export of the same adapters
    peft_model = to_peft_model(model)
    save_base(peft_model, tmp_path / "base")
    peft_model.save_pretrained(tmp_path / "adapter")
    assert torch.equal(_logits(peft_model), reference)  # save_base put the wrappers back

    base = autoqra.load(tmp_path / "base", tiny_llama())
    assert all(r == 0 for r in _ranks(base).values())
    with pytest.raises(ValueError, match="not supported"):  # peft does not save the custom-module registration
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    loaded = load_peft_model(base, tmp_path / "adapter")
    assert torch.equal(_logits(loaded), reference)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode unless is_trainable=True
    # the file autoqra's save_peft_adapter writes is the same format: it loads on the packed base too
    other = load_peft_model(autoqra.load(tmp_path / "base", tiny_llama()), tmp_path / "exported")
    assert torch.equal(_logits(other), reference)
    with pytest.raises(ConfigError, match="still have autoqra adapters"):
        load_peft_model(compiled, tmp_path / "adapter")
    with pytest.raises(ConfigError, match="autoqra.load"):  # a folder where the base model belongs
        load_peft_model(str(tmp_path / "base"), tmp_path / "adapter")


def test_two_adapters_of_different_ranks_on_one_base(tmp_path):
    model_a = _compiled(bits=(3, 4), ranks=(4, 2))
    model_b = copy.deepcopy(model_a)  # the same packed base, a second fine-tune with doubled ranks
    g = torch.Generator().manual_seed(11)
    for m in model_b.modules():
        if isinstance(m, QuantLoRALinear) and m.rank:
            m.rank *= 2
            m.lora_A = nn.Parameter(torch.randn(m.rank, m.in_features, generator=g) * 0.2)
            m.lora_B = nn.Parameter(torch.randn(m.out_features, m.rank, generator=g) * 0.2)
    ref_a, ref_b = _logits(model_a), _logits(model_b)
    save_peft_adapter(model_b, tmp_path / "b")
    peft_model = load_adapter(to_peft_model(model_a), tmp_path / "b", "b")
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert (layer.r["default"], layer.r["b"]) == (4, 8)
    assert torch.equal(_logits(peft_model), ref_a)
    peft_model.set_adapter("b")
    assert torch.equal(_logits(peft_model), ref_b)
    mixed = _logits(peft_model, adapter_names=["default", "b"])  # peft's mixed-adapter batch
    torch.testing.assert_close(mixed[0], ref_a[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], ref_b[1], rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="already has an adapter"):
        load_adapter(peft_model, tmp_path / "b", "b")


def _reference_without_kernel(model):
    """The compiled model's logits on the fp32 dequantize path (the int4 kernel computes in bf16)."""
    for m in model.modules():
        if isinstance(m, QuantLoRALinear):
            m.fast_path = False
    logits = _logits(model)
    for m in model.modules():
        if isinstance(m, QuantLoRALinear):
            m.fast_path = True
    return logits


@pytest.mark.parametrize("layout", ["4bit", "mixed+rank0+alpha"])
def test_merge_and_unload_gives_a_dense_model(layout):
    model = _compiled(**LAYOUTS[layout])
    ranks, packed, reference = _ranks(model), _logits(model), _reference_without_kernel(model)
    peft_model = to_peft_model(model)
    peft_model.merge_adapter()
    assert all(isinstance(m.get_base_layer(), nn.Linear) for m in peft_model.modules() if isinstance(m, PackedLoraLinear))
    torch.testing.assert_close(_logits(peft_model), reference, rtol=0, atol=2e-5)
    peft_model.unmerge_adapter()
    assert torch.equal(_logits(peft_model), packed)  # the packed base comes back exactly
    dense = peft_model.merge_and_unload()
    kinds = {n: type(dense.get_submodule(n)) for n in ranks}
    assert kinds == {n: nn.Linear if r else QuantLoRALinear for n, r in ranks.items()}
    assert all(dense.get_submodule(n).weight.dtype == torch.float32 for n, r in ranks.items() if r)
    plain = merge_to_dense(to_peft_model(_compiled(**LAYOUTS[layout])))
    assert not any(isinstance(m, (QuantLoRALinear, PackedLoraLinear)) for m in plain.modules())
    torch.testing.assert_close(_logits(plain), reference, rtol=0, atol=2e-5)


def test_hf_trainer_runs_two_steps_on_the_peft_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    peft_model = to_peft_model(_compiled(bits=(2, 4), ranks=(4, 8)))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    buffers = {n: b.clone() for n, b in peft_model.named_buffers()}
    dataset = [{"input_ids": r, "labels": r} for r in ROWS]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-2, logging_steps=1,
                             gradient_checkpointing=True)
    trainer = Trainer(model=peft_model, args=args, train_dataset=dataset)
    trainer.train()
    assert len([h for h in trainer.state.log_history if "loss" in h]) == 2
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed == {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(torch.equal(b, buffers[n]) for n, b in peft_model.named_buffers())  # packed base untouched


def test_trl_sft_trainer_runs_on_the_peft_model(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")

    peft_model = to_peft_model(_compiled(bits=(4,), ranks=(4,)))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>")),
                                        pad_token="<pad>", eos_token="</s>")  # built in code: no download
    data = datasets.Dataset.from_dict({"input_ids": [r.tolist() for r in ROWS]})
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                         report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-2, logging_steps=1,
                         dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False)
    trainer = trl.SFTTrainer(model=peft_model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in peft_model.named_parameters() if n in before)


def test_the_way_back_to_autoqra_layers(tmp_path):
    from autoqra.io import load, save
    from autoqra.train import adapter_parameters

    model = _compiled(**LAYOUTS["mixed+rank0+alpha"])
    ranks = _ranks(model)
    peft_model = to_peft_model(model)
    with torch.no_grad():  # as if trained under peft
        for m in peft_model.modules():
            if isinstance(m, PackedLoraLinear):
                m.lora_B["default"].weight.mul_(1.5)
    expected = _logits(peft_model)
    back = to_autoqra(peft_model)
    assert _ranks(back) == ranks and not any(isinstance(m, PackedLoraLinear) for m in back.modules())
    assert torch.equal(_logits(back), expected)
    assert len(adapter_parameters(back)) == 2 * sum(1 for r in ranks.values() if r)  # autoqra's training sees them
    save(back, tmp_path / "saved")
    torch.testing.assert_close(_logits(load(tmp_path / "saved", tiny_llama())), expected, rtol=0, atol=1e-6)


def test_errors():
    with pytest.raises(NotCompiledError):
        strip_adapters(tiny_llama())
    with pytest.raises(PeftExportError, match="every rank is 0"):
        to_peft_model(_compiled(ranks=(0,)))
    model = _compiled(bits=(16,), ranks=(4,))
    model.model.layers[0].mlp.up_proj.merge()
    with pytest.raises(PeftExportError, match="merged into the base"):
        to_peft_model(model)
    peft_model = to_peft_model(_compiled(ranks=(4,)))
    with pytest.raises(PeftExportError, match="no layer has an adapter named"):
        to_autoqra(peft_model, "nope")
    peft_model.merge_adapter()
    with pytest.raises(PeftExportError, match="unmerge_adapter"):
        to_autoqra(peft_model)
    layer = _compiled(ranks=(4,)).model.layers[0].mlp.up_proj
    with pytest.raises(ConfigError, match="strip_adapters"):
        from peft import LoraConfig

        PackedLoraLinear(layer, "default", LoraConfig(r=4))

"""bf16 / fp16 models: compile, fine-tune, save/load, peft export; untouched dtypes kept."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_gemma3, tiny_gpt2, tiny_llama

import autoqra
from autoqra.footprint import layers_held_bytes
from autoqra.io import load, save
from autoqra.modules.quant_lora_linear import QuantLoRALinear
from autoqra.peft_interop import save_peft_adapter
from autoqra.train import finetune

CALIB = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
TOKENS = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_gemma3], ids=["llama", "gpt2", "gemma3"])
def test_half_precision_model_end_to_end(tmp_path, dtype, make) -> None:
    model = make().to(dtype)
    untouched = {n: p.dtype for n, p in model.named_parameters()}
    result = autoqra.compile(model, "10bits", calib=CALIB, ranks=(4, 8), cache_dir=tmp_path / "cache",
                             progress=False)
    # every parameter that is not an adapter keeps the model's dtype (biases of compiled layers too)
    for name, p in model.named_parameters():
        if not name.endswith(("lora_A", "lora_B")):
            assert p.dtype == untouched.get(name, dtype), name
    assert {p.dtype for p in model.parameters() if p.requires_grad} <= {torch.float32}
    assert layers_held_bytes(model) == result.plan.total_bytes
    ids = torch.randint(3, 128, (2, 16))
    assert torch.isfinite(model(input_ids=ids).logits).all()
    fit = finetune(model, TOKENS, steps=2, batch_size=2, seq_len=32, progress=False)
    assert all(torch.isfinite(torch.tensor(fit.losses)))
    save(model, tmp_path / "saved")
    loaded = load(tmp_path / "saved", make().to(dtype))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert {n: p.dtype for n, p in loaded.named_parameters()} == {n: p.dtype for n, p in model.named_parameters()}
    assert any(isinstance(m, QuantLoRALinear) for m in loaded.modules())
    save_peft_adapter(model, tmp_path / "peft")
    assert (tmp_path / "peft" / "adapter_config.json").exists()

"""One compiled model per decoder family: compile with calibration data (measured selection), fine-tune,
save/load with equal logits, peft export for the fp32 base; the ONNX export with the KV cache (slow)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import autoqra

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
GQA = dict(num_key_value_heads=2)

#: family → (config class, model class, config overrides); Llama, Qwen2, Mistral, Gemma 3, GPT-2 and OPT
#: are covered by the other test files (tests/tiny_models.py)
FAMILIES = {
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, GQA),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, GQA),  # fused qkv_proj and gate_up_proj
    "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, GQA),
    "smollm3": (T.SmolLM3Config, T.SmolLM3ForCausalLM, {**GQA, "no_rope_layers": [1, 0]}),
    "granite": (T.GraniteConfig, T.GraniteForCausalLM, GQA),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, {**GQA, "head_dim": 16, "sliding_window": 8}),
    "phi": (T.PhiConfig, T.PhiForCausalLM, {}),  # biases, partial rotary, parallel attention/MLP
    "stablelm": (T.StableLmConfig, T.StableLmForCausalLM, GQA),
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, {}),
    # a config key the architecture ignores (GPT-NeoX has no grouped-query attention): the export must
    # follow the model, not the config
    "gpt_neox_stray_kv_key": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, GQA),
    "falcon": (T.FalconConfig, T.FalconForCausalLM, {"intermediate_size": None, "max_position_embeddings": None,
                                                     "pad_token_id": None}),
}
CALIB = torch.randint(3, 128, (6, 32), generator=torch.Generator().manual_seed(0))


def _make(family: str) -> torch.nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    kwargs = {k: v for k, v in {**COMMON, **extra}.items() if v is not None}
    torch.manual_seed(0)
    return model_cls(config_cls(**kwargs)).eval()


def _compiled(family: str) -> torch.nn.Module:
    result = autoqra.compile(_make(family), "8bits", calib=CALIB, ranks=(4, 8), cache_dir=None, progress=False)
    assert len(result.report["selection"]["candidates"]) >= 2  # measured selection ran
    autoqra.finetune(result.model, CALIB, steps=2, seq_len=32, progress=False)
    return result.model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_compiles_finetunes_saves_and_loads(tmp_path, family) -> None:
    model = _compiled(family)
    ids = CALIB[:1]
    autoqra.save(model, tmp_path / "saved")
    loaded = autoqra.load(tmp_path / "saved", _make(family))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert torch.isfinite(expected).all()
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    autoqra.save_peft_adapter(model, tmp_path / "peft", target="fp32")
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_exports_to_onnx_with_the_cache(tmp_path, family) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    result = autoqra.export_onnx(_compiled(family), tmp_path / "onnx", accuracy_level=0)
    assert result.parity.max_rel < 1e-4 and result.parity.tokens_matched == 16
    assert result.attention == "grouped"  # every family takes the grouped form (Gemma 2's soft-cap included)


def test_the_cache_geometry_comes_from_the_model_not_the_config() -> None:
    from autoqra.export.decoder import decoder_shape, probe_cache

    model = _make("gpt_neox_stray_kv_key")
    assert decoder_shape(model).kv_heads == 2  # what the config says
    shape = probe_cache(model, decoder_shape(model))
    assert (shape.kv_heads, shape.head_dim) == (4, 16)  # what the model computes
    gemma = probe_cache(_make("gemma2"), decoder_shape(_make("gemma2")))
    assert (gemma.kv_heads, gemma.head_dim) == (2, 16)

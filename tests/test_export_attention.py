"""Grouped-query attention for the ONNX export (autoqra/export/attention.py): same numbers as the model's
own attention, fewer nodes, the model's implementation restored, the odd cases on the model's own path; and
onnxruntime's GroupQueryAttention (autoqra/export/gqa.py): the op's reference, one node a layer, the shared buffer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from autoqra.export import export_onnx  # noqa: E402
from autoqra.export.attention import GROUPED, grouped_attention, grouped_query_attention  # noqa: E402
from autoqra.export.decoder import decoder_shape  # noqa: E402
from autoqra.export.verify import _feeds, session  # noqa: E402


class _Module(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _causal_mask(s: int, t: int, batch: int) -> torch.Tensor:
    allowed = torch.ones(s, t, dtype=torch.bool).tril(diagonal=t - s)
    mask = torch.zeros(s, t).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return mask.expand(batch, 1, s, t).clone()


@pytest.mark.parametrize("heads, kv, s, t", [(4, 4, 5, 5), (4, 2, 1, 9), (6, 2, 3, 7), (9, 3, 1, 1)])
def test_grouped_query_attention_equals_sdpa(heads, kv, s, t) -> None:
    gen = torch.Generator().manual_seed(heads * 100 + s)
    q = torch.randn(2, heads, s, 8, generator=gen)
    k, v = torch.randn(2, kv, t, 8, generator=gen), torch.randn(2, kv, t, 8, generator=gen)
    mask = _causal_mask(s, t + 3, 2)  # masks may be longer than the keys (sliced as eager does)
    module = _Module(heads // kv)
    got, weights = grouped_query_attention(module, q, k, v, mask, scaling=0.3)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask[..., :t], scaling=0.3)
    assert weights is None and got.shape == (2, s, heads, 8)
    assert torch.allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("heads, kv, s, t", [(4, 2, 3, 7), (4, 4, 1, 5)])
def test_grouped_query_attention_applies_a_soft_cap_as_gemma2s_eager(heads, kv, s, t) -> None:
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    gen = torch.Generator().manual_seed(heads + s)
    q = torch.randn(2, heads, s, 8, generator=gen) * 4  # large logits: the cap matters
    k, v = torch.randn(2, kv, t, 8, generator=gen) * 4, torch.randn(2, kv, t, 8, generator=gen)
    mask, module = _causal_mask(s, t, 2), _Module(heads // kv)
    got, _ = grouped_query_attention(module, q, k, v, mask, scaling=0.3, softcap=5.0)
    ref, _ = eager_attention_forward(module, q, k, v, mask, scaling=0.3, softcap=5.0)
    uncapped, _ = grouped_query_attention(module, q, k, v, mask, scaling=0.3)
    assert torch.allclose(got, ref, atol=1e-5) and not torch.allclose(got, uncapped, atol=1e-3)


@pytest.mark.parametrize("kwargs", [{"sinks": torch.zeros(4)}, {"position_bias": torch.zeros(1)}, {"dropout": 0.1}],
                         ids=["sinks", "position bias", "dropout"])
def test_calls_it_does_not_cover_run_the_models_own_attention(monkeypatch, kwargs) -> None:
    import autoqra.export.attention as attention

    seen = []
    monkeypatch.setattr(attention, "_own_attention",
                        lambda module: lambda *a, **kw: seen.append(kw) or (torch.zeros(1), None))
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 2, 8)
    grouped_query_attention(_Module(2), q, k, k, _causal_mask(2, 2, 1), **kwargs)
    assert len(seen) == 1
    grouped_query_attention(_Module(2), q, k, k, None)  # no mask: causality unknown here
    assert len(seen) == 2


def test_model_attention_is_switched_inside_the_block_and_restored(tmp_path) -> None:
    model = tiny_llama()
    original = model.config._attn_implementation
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        with grouped_attention(model) as switched:
            assert switched and model.config._attn_implementation == GROUPED
            got = model(ids).logits
    assert model.config._attn_implementation == original
    assert torch.allclose(got, ref, atol=1e-5)
    with pytest.raises(RuntimeError, match="boom"), grouped_attention(model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == original
    assert not any(hasattr(m, "_autoqra_attention") for m in model.modules())
    with grouped_attention(model, enabled=False) as switched:
        assert not switched and model.config._attn_implementation == original
    with grouped_attention(torch.nn.Linear(2, 2)) as switched:  # not a Hugging Face model
        assert not switched


def test_grouped_export_has_no_repeated_cache_and_the_same_logits(tmp_path) -> None:
    model = tiny_llama()
    grouped = export_onnx(model, tmp_path / "grouped", with_past=False, accuracy_level=0)
    own = export_onnx(model, tmp_path / "own", with_past=False, accuracy_level=0, attention="model")
    assert (grouped.attention, own.attention) == ("grouped", "model")
    ops = {name: [n.op_type for n in onnx.load(str(r.model_file)).graph.node]
           for name, r in (("grouped", grouped), ("own", own))}
    layers = model.config.num_hidden_layers  # repeat_kv's two Expands a layer are gone (the mask keeps its own)
    assert ops["grouped"].count("Expand") == ops["own"].count("Expand") - 2 * layers
    assert "IsNaN" not in ops["grouped"]
    assert len(ops["grouped"]) < len(ops["own"])
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    got, ref = (session(r.model_file).run(["logits"], _feeds(ids, None, np.dtype("float32")))[0]
                for r in (grouped, own))
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5



@pytest.mark.parametrize("b, s, p", [(1, 4, 0), (2, 3, 0), (1, 3, 5), (2, 1, 6)])
def test_group_query_attention_op_equals_the_reference(b, s, p) -> None:
    from autoqra.export.gqa import group_query_attention, reference_attention

    heads, kv, d = 6, 2, 8
    gen = torch.Generator().manual_seed(10 * b + s + p)
    q, k, v = (torch.randn(b, s, n * d, generator=gen) for n in (heads, kv, kv))
    past_k, past_v = torch.randn(b, kv, p, d, generator=gen), torch.randn(b, kv, p, d, generator=gen)
    bias = _causal_mask(s, p + s, b)
    if b > 1:
        bias[1, ..., :1] = torch.finfo(torch.float32).min  # the second row left-padded
    out, present_k, present_v = group_query_attention(q, k, v, past_k, past_v, bias, heads, kv, 0.25)
    assert torch.equal(present_k, torch.cat([past_k, k.view(b, s, kv, d).transpose(1, 2)], 2))
    assert torch.equal(present_v, torch.cat([past_v, v.view(b, s, kv, d).transpose(1, 2)], 2))
    ref = reference_attention(q.view(b, s, heads, d).transpose(1, 2), present_k, present_v, bias, 0.25)
    assert torch.allclose(out, ref.transpose(1, 2).reshape(b, s, heads * d), atol=1e-6)


def test_onnxruntime_attention_outside_a_split_cache_takes_the_grouped_form() -> None:
    from autoqra.export.gqa import onnxruntime_attention

    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 2, 8)
    mask = _causal_mask(2, 2, 1)
    got, _ = onnxruntime_attention(_Module(2), q, k, k, mask, scaling=0.3)
    ref, _ = grouped_query_attention(_Module(2), q, k, k, mask, scaling=0.3)
    assert torch.equal(got, ref)


def test_onnxruntime_attention_export_is_one_op_a_layer_and_shares_the_cache_buffer(tmp_path) -> None:
    import json

    model = tiny_llama()
    fused = export_onnx(model, tmp_path / "ort", accuracy_level=0, attention="onnxruntime")
    plain = export_onnx(model, tmp_path / "grouped", accuracy_level=0, verify_genai=False)
    assert (fused.attention, plain.attention) == ("onnxruntime", "grouped")
    ops = [n.op_type for n in onnx.load(str(fused.model_file)).graph.node]
    assert ops.count("GroupQueryAttention") == model.config.num_hidden_layers
    assert fused.parity.max_rel < 1e-5 and fused.parity.tokens_matched == 16
    if fused.parity.genai_tokens_match is not None:  # onnxruntime-genai decoded through the shared buffer
        assert fused.parity.genai_tokens_match
    shared = {r: json.loads((tmp_path / r / "genai_config.json").read_text())["search"]["past_present_share_buffer"]
              for r in ("ort", "grouped")}
    assert shared == {"ort": True, "grouped": False}
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    got, ref = (session(r.model_file).run(["logits"], _feeds(ids, decoder_shape(model), np.dtype("float32")))[0]
                for r in (fused, plain))
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5
    logits = export_onnx(model, tmp_path / "no_past", with_past=False, accuracy_level=0, attention="onnxruntime")
    assert logits.attention == "grouped"  # no cache to split: the grouped form


@pytest.mark.parametrize("attention", ["grouped", "onnxruntime"])
def test_gemma2_soft_cap_exports_in_both_forms(tmp_path, attention) -> None:
    """Gemma 2's logit soft-cap: the grouped form applies it, GroupQueryAttention takes it as its ``softcap``
    attribute (onnxruntime caps before adding the bias, as the model does); a small cap and large logits so
    that a missing or misplaced cap would move the logits far beyond the tolerance."""
    import transformers as T

    torch.manual_seed(0)
    config = T.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                            max_position_embeddings=128, attn_logit_softcapping=1.0)
    model = T.Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    result = export_onnx(model, tmp_path / "onnx", accuracy_level=0, attention=attention)
    assert result.attention == attention
    assert result.parity.max_rel < 1e-5 and result.parity.tokens_matched == 16
    nodes = onnx.load(str(result.model_file)).graph.node
    caps = [a.f for n in nodes if n.op_type == "GroupQueryAttention" for a in n.attribute if a.name == "softcap"]
    assert caps == ([1.0, 1.0] if attention == "onnxruntime" else [])
    final = 1 if config.final_logit_softcapping else 0  # Gemma 2 also caps its output logits
    assert sum(n.op_type == "Tanh" for n in nodes) == final + (2 if attention == "grouped" else 0)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the cap matters here: without it the logits move by far more than the tolerance
        capped = model(ids).logits
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        assert (capped - model(ids).logits).abs().max() / capped.abs().max() > 0.1

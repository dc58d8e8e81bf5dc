"""A tied input embedding reads its rows from the compiled lm_head (`TiedQuantEmbedding`): the tied
matrix is held once, in the plan's format; exact lookups at every bit-width and layout; save / load,
apply_plan, peft's merge_to_dense and the measured selection keep it."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import logits_of, tiny_gemma3, tiny_llama

import autoqra
from autoqra.errors import ConfigError, UnsupportedLayerError
from autoqra.footprint import held_bytes
from autoqra.io import load, save
from autoqra.modules.quant_lora_linear import QuantLoRALinear
from autoqra.modules.tied_embedding import TiedQuantEmbedding, shareable

IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(1))
FAST = dict(cache_dir=None, progress=False)


def _logits(model, ids=IDS):
    return logits_of(model, ids)


@pytest.mark.parametrize("bits, fast_path", [(2, True), (3, True), (4, True), (4, False), (8, True), (16, True)])
def test_rows_equal_the_dequantized_weight_in_every_layout(bits, fast_path):
    torch.manual_seed(0)
    layer = QuantLoRALinear.from_linear(torch.nn.Linear(96, 128, bias=False), bits, 4)
    layer.fast_path = fast_path
    ids = torch.tensor([[0, 5, 127, 64], [63, 31, 32, 5]])
    assert layer.layout == ("int4_cpu" if bits == 4 and fast_path and layer._resident_layout() == "int4_cpu"
                            else layer.layout)
    rows = layer.rows(ids)
    assert rows.shape == (8, 96)
    assert torch.equal(rows, layer.dequantized_weight()[ids.reshape(-1)])


def test_rows_of_a_merged_16_bit_layer_are_the_base():
    torch.manual_seed(0)
    layer = QuantLoRALinear.from_linear(torch.nn.Linear(32, 48, bias=False), 16, 4)
    with torch.no_grad():
        layer.lora_B.normal_()
    ids = torch.tensor([1, 7, 47])
    before = layer.rows(ids)
    layer.merge()
    assert torch.allclose(layer.rows(ids), before, atol=1e-3)


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_shared_embedding_reads_the_lm_head_rows_and_frees_the_float_matrix(bits):
    keep = tiny_llama(tie=True)
    share = copy.deepcopy(keep)
    budget = "40bits"
    opts = dict(include=("lm_head",), bits=(bits,), ranks=(4,), **FAST)
    autoqra.compile(keep, budget, tied_embedding="keep", **opts)
    result = autoqra.compile(share, budget, **opts)  # "share" is the default
    emb, head = share.model.embed_tokens, share.lm_head
    assert isinstance(emb, TiedQuantEmbedding) and emb.source is head and head.bits == bits
    assert isinstance(keep.model.embed_tokens, torch.nn.Embedding)
    assert result.report["shared_embeddings"] == {"model.embed_tokens": "lm_head"}
    assert result.plan.settings["tied_embedding"] == "share"
    # the lookup is the lm_head's base rows, exactly
    ids = torch.tensor([[3, 9, 127]])
    assert torch.equal(emb(ids), head.dequantized_weight()[ids[0]].unsqueeze(0))
    # measured through the tensor storages: the float [vocab, hidden] matrix is gone
    vocab_matrix = 128 * 64 * 4
    assert held_bytes(keep.modules()) - held_bytes(share.modules()) == vocab_matrix
    assert "embed_tokens" not in " ".join(share.state_dict())
    # one matrix: training the adapters leaves the embedding as it was, and the model still runs
    out = _logits(share)
    assert torch.isfinite(out).all() and out.shape == (2, 16, 128)


def test_shared_embedding_survives_save_load_apply_and_device_moves(tmp_path):
    model = tiny_llama(tie=True)
    result = autoqra.compile(model, "12bits", include=("lm_head",), bits=(4, 8), ranks=(4,), **FAST)
    with torch.no_grad():  # adapters as after fine-tuning
        model.lm_head.lora_B.add_(0.05)
    out = _logits(model)
    save(model, tmp_path / "saved")
    loaded = load(tmp_path / "saved", tiny_llama(tie=True))
    assert isinstance(loaded.model.embed_tokens, TiedQuantEmbedding)
    assert loaded.model.embed_tokens.source is loaded.lm_head
    assert torch.equal(_logits(loaded), out)
    applied = tiny_llama(tie=True)
    report = autoqra.apply_plan(applied, result.plan, progress=False).report
    assert report["shared_embeddings"] == {"model.embed_tokens": "lm_head"}
    copied = copy.deepcopy(model)
    assert copied.model.embed_tokens.source is copied.lm_head
    assert torch.equal(_logits(copied), out)


def test_keep_and_old_plans_keep_the_float_embedding():
    model = tiny_llama(tie=True)
    result = autoqra.compile(model, "12bits", include=("lm_head",), bits=(4,), ranks=(0,), tied_embedding="keep",
                             **FAST)
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)
    old = result.plan.to_dict()
    del old["settings"]["tied_embedding"]  # a plan saved before the setting existed
    applied = tiny_llama(tie=True)
    autoqra.apply_plan(applied, autoqra.Plan.from_dict(old), progress=False)
    assert isinstance(applied.model.embed_tokens, torch.nn.Embedding)


def test_wrong_mode_is_refused_before_any_work():
    model = tiny_llama(tie=True)
    with pytest.raises(ConfigError, match=r"tied_embedding must be one of \('share', 'keep'\)"):
        autoqra.compile(model, "12bits", include=("lm_head",), tied_embedding="shared", **FAST)
    assert not any(isinstance(m, QuantLoRALinear) for m in model.modules())


def test_gemma_scaled_embedding_keeps_its_scale():
    model = tiny_gemma3()
    emb = model.model.embed_tokens
    ids = torch.tensor([[4, 8, 15]])
    autoqra.compile(model, "12bits", include=("lm_head",), bits=(8,), ranks=(0,), **FAST)
    shared = model.model.embed_tokens
    assert isinstance(shared, TiedQuantEmbedding)
    expected = model.lm_head.dequantized_weight()[ids[0]] * emb.embed_scale
    assert torch.allclose(shared(ids)[0], expected)


def test_unshareable_embedding_is_kept_with_a_warning(caplog):
    model = tiny_llama(tie=True)
    model.model.embed_tokens.max_norm = 1.0
    assert "max_norm" in shareable(model.model.embed_tokens)
    with caplog.at_level("WARNING"):
        autoqra.compile(model, "12bits", include=("lm_head",), bits=(4,), ranks=(0,), **FAST)
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)
    assert "keeps its float weight" in caplog.text
    with pytest.raises(UnsupportedLayerError, match="tied_embedding='keep'"):
        TiedQuantEmbedding(model.lm_head, model.model.embed_tokens, source_name="lm_head")


def test_merge_to_dense_gives_the_embedding_its_own_float_matrix():
    pytest.importorskip("peft")
    from autoqra.peft_native import merge_to_dense, to_peft_model

    model = tiny_llama(tie=True)
    autoqra.compile(model, "12bits", include=("lm_head",), bits=(4,), ranks=(4,), **FAST)
    rows = model.model.embed_tokens(IDS)
    out = _logits(model)
    dense = merge_to_dense(to_peft_model(model))
    assert type(dense.model.embed_tokens) is torch.nn.Embedding
    assert torch.equal(dense.model.embed_tokens(IDS), rows)
    ref = _logits(dense)  # the int4 kernel (bf16 activations) against the dense fp32 product
    assert float((ref - out).norm() / ref.norm()) < 1e-2


def test_the_measured_selection_scores_plans_with_the_sharing_in_place():
    model = tiny_llama(tie=True)
    result = autoqra.compile(model, "12bits", calib=CALIB, include=("lm_head",), bits=(4, 8), ranks=(0, 4), **FAST)
    assert result.report["selection"] is not None
    assert isinstance(model.model.embed_tokens, TiedQuantEmbedding)
    assert result.report["held_bytes"] == result.plan.total_bytes


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fine_tuning_trains_the_lm_head_adapter_and_leaves_the_shared_rows(checkpointing):
    from autoqra.train import finetune

    model = tiny_llama(tie=True)
    autoqra.compile(model, "12bits", include=("lm_head",), bits=(4,), ranks=(4,), **FAST)
    rows = model.model.embed_tokens(IDS).clone()
    b_before = model.lm_head.lora_B.detach().clone()
    tokens = torch.randperm(125, generator=torch.Generator().manual_seed(2))[:40].add(3).repeat(40)
    result = finetune(model, tokens, steps=4, seq_len=32, batch_size=4, lr=1e-2, progress=False,
                      gradient_checkpointing=checkpointing)
    assert len(result.losses) == 4 and all(math.isfinite(v) for v in result.losses)
    assert not torch.equal(model.lm_head.lora_B, b_before)  # the lm_head's adapter learned
    assert torch.equal(model.model.embed_tokens(IDS), rows)  # the shared base rows did not move


def test_bf16_model_lookups_follow_the_models_dtype_and_export_exactly(tmp_path):
    model = tiny_llama(tie=True).to(torch.bfloat16)
    autoqra.compile(model, "12bits", include=("lm_head",), bits=(4,), ranks=(4,), **FAST)
    emb = model.model.embed_tokens
    assert emb(IDS).dtype == torch.bfloat16 and _logits(model).dtype == torch.bfloat16
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from autoqra.export import export_onnx

    # exported in float32 (the bf16 tensors widened for the export): the lookups widen with them
    result = export_onnx(model, tmp_path / "onnx", accuracy_level=0, verify_genai=False, progress=False)
    assert result.parity.max_rel < 1e-4
    assert emb(IDS).dtype == torch.bfloat16  # and narrow back afterwards
    model.float()
    assert emb(IDS).dtype == torch.float32

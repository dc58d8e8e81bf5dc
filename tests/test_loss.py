"""The chunked causal-LM loss (`autoqra.loss`) equals the full-logits loss, in value and gradients,
on several architectures, with padding and ignored labels, plain and under DDP-style wrapping; it
refuses models that rescale logits after the output module."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama, tiny_opt
from torch import nn

import autoqra
from autoqra.errors import ConfigError
from autoqra.loss import auto_chunk_tokens, causal_lm_loss
from autoqra.train import adapter_parameters, finetune

CALIB = torch.randint(3, 100, (4, 32), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(3, 100, (3, 24), generator=torch.Generator().manual_seed(5))


def _compiled(make, **kwargs):
    torch.manual_seed(0)
    model = make(**kwargs)
    autoqra.compile(model, "8bits", calib=CALIB, ranks=(4, 8), cache_dir=None, progress=False)
    for p in adapter_parameters(model):  # non-zero B so every adapter gets a gradient through the loss
        with torch.no_grad():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


def _loss_and_grads(model, batch, chunk):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # same dropout masks on both sides (GPT-2 and OPT have dropout)
    loss, count = causal_lm_loss(model, batch, use_cache_flag=True, chunk_tokens=chunk)
    loss.backward()
    return float(loss.detach()), count, [p.grad.clone() for p in adapter_parameters(model)]


MASK = torch.ones_like(IDS).index_fill_(1, torch.tensor([20, 21, 22, 23]), 0)
LABELS = IDS.clone().index_fill_(1, torch.tensor([0, 1, 2]), -100)


@pytest.mark.parametrize("make,kwargs", [(tiny_llama, {}), (tiny_llama, {"tie": True}), (tiny_gpt2, {}),
                                         (tiny_opt, {})], ids=["llama", "llama-tied", "gpt2", "opt"])
@pytest.mark.parametrize("batch", [{"input_ids": IDS}, {"input_ids": IDS, "attention_mask": MASK},
                                   {"input_ids": IDS, "labels": LABELS}], ids=["plain", "padding", "labels"])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_loss_equals_full_logits(make, kwargs, batch, chunk):
    model = _compiled(make, **kwargs)
    model.train()
    full, count, grads = _loss_and_grads(model, batch, None)
    chunked, count_c, grads_c = _loss_and_grads(model, batch, chunk)
    assert count == count_c > 0
    assert chunked == pytest.approx(full, rel=1e-5)
    assert len(grads) == len(grads_c) > 0
    for g, gc in zip(grads, grads_c, strict=True):
        torch.testing.assert_close(gc, g, rtol=1e-4, atol=1e-6)
    # the output module is restored: the model gives real logits again
    logits = model(input_ids=IDS).logits
    assert logits.shape[-1] == model.config.vocab_size


def test_chunked_loss_with_an_adapter_on_the_output_module():
    torch.manual_seed(0)
    model = tiny_llama()
    autoqra.compile(model, "8bits", calib=CALIB, ranks=(4, 8), cache_dir=None, progress=False,
                    include=("lm_head",), patterns={"lm_head": {"rank": 8, "bits": 4}})
    head = model.get_output_embeddings()
    assert type(head).__name__ == "QuantLoRALinear" and head.rank == 8
    with torch.no_grad():
        head.lora_B.normal_(0, 0.01)
    batch = {"input_ids": IDS}
    full, _, grads = _loss_and_grads(model, batch, None)
    chunked, _, grads_c = _loss_and_grads(model, batch, 5)
    assert chunked == pytest.approx(full, rel=1e-5)
    for g, gc in zip(grads, grads_c, strict=True):
        torch.testing.assert_close(gc, g, rtol=1e-4, atol=1e-6)


def test_ddp_wrapper_forward_goes_through_the_wrapper(tmp_path):
    import torch.distributed as dist

    model = _compiled(tiny_llama)
    reference = copy.deepcopy(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        loss, _ = causal_lm_loss(ddp, {"input_ids": IDS}, use_cache_flag=True, chunk_tokens=9)
        loss.backward()
    finally:
        dist.destroy_process_group()
    ref, _, grads = _loss_and_grads(reference, {"input_ids": IDS}, None)
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    for p, g in zip(adapter_parameters(model), grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_rescaled_logits_are_refused_and_auto_uses_full_logits(caplog):
    model = _compiled(tiny_llama)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ConfigError, match="final_logit_softcapping.*loss_chunk_tokens=None"):
        causal_lm_loss(model, {"input_ids": IDS}, use_cache_flag=True, chunk_tokens=8)
    with caplog.at_level(logging.INFO, logger="autoqra.loss"):
        assert auto_chunk_tokens(model) is None
    assert "full logits" in caplog.text


def test_auto_chunk_size_follows_the_vocabulary():
    model = tiny_llama()
    vocab = model.config.vocab_size
    assert auto_chunk_tokens(model) == max(16, int(32 * 2**20 / (4 * vocab)))
    assert auto_chunk_tokens(nn.Linear(3, 3)) is None


class _NoHeadCall(nn.Module):
    """A model whose forward computes logits without calling its output module."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 8)
        self.head = nn.Linear(8, 100)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids, **kwargs):
        return torch.nn.functional.linear(self.embed(input_ids), self.head.weight, self.head.bias)


def test_a_forward_that_skips_the_output_module_gives_full_logits_with_a_warning(caplog):
    model = _NoHeadCall()
    with caplog.at_level(logging.WARNING, logger="autoqra.loss"):
        chunked, _ = causal_lm_loss(model, {"input_ids": IDS}, use_cache_flag=False, chunk_tokens=4)
    full, _ = causal_lm_loss(model, {"input_ids": IDS}, use_cache_flag=False, chunk_tokens=None)
    assert float(chunked) == pytest.approx(float(full))
    assert "does not call its output module" in caplog.text


def test_finetune_chunked_and_full_train_the_same_adapters():
    tokens = torch.randperm(97, generator=torch.Generator().manual_seed(2))[:40].add(3).repeat(20)
    base = _compiled(tiny_llama)
    results = {}
    for chunk in ("auto", 11, None):
        model = copy.deepcopy(base)
        res = finetune(model, tokens, steps=3, seq_len=32, batch_size=2, lr=1e-2, progress=False,
                       loss_chunk_tokens=chunk)
        results[chunk] = (res.losses, [p.detach() for p in adapter_parameters(model)])
    for chunk in ("auto", 11):
        assert results[chunk][0] == pytest.approx(results[None][0], rel=1e-4)
        for a, b in zip(results[chunk][1], results[None][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=5e-4)  # Adam steps are 1e-2: equal to 5%


@pytest.mark.parametrize("bad", [0, -3, "big", 2.5, True])
def test_bad_chunk_size(bad):
    model = _compiled(tiny_llama)
    with pytest.raises(ConfigError, match="loss_chunk_tokens"):
        finetune(model, torch.arange(3, 99).repeat(3), steps=1, seq_len=16, batch_size=2, progress=False,
                 loss_chunk_tokens=bad)

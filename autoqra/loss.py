"""Causal-LM loss for fine-tuning, with the output projection and cross-entropy in token chunks.

At small model sizes the largest tensors of a training step are not weights but logits: SmolLM2's
49,152-token vocabulary makes the fp32 logits of a 4 × 256-token batch 192 MiB, and the loss and
its backward hold several such copies. ``causal_lm_loss(..., chunk_tokens=n)`` never builds them:

* the model's output embedding (``get_output_embeddings()``, e.g. ``lm_head``) is made to return
  its input for the duration of the call, so the model (or its ``DistributedDataParallel``
  wrapper: the forward still goes through it) returns the final hidden states;
* the targets' hidden states are cut into chunks of ``n`` tokens; each chunk runs the real output
  module (LoRA adapter included, if it has one) and a summed fp32 cross-entropy. When a gradient
  is needed, each chunk's gradient is taken at once, in the forward (`_HeadLoss`): the
  cross-entropy's gradient ``softmax − onehot`` is written over the chunk's logits and pulled
  back through the output module by autograd, giving the gradient of the hidden states and of the
  module's trainable parameters; the backward only scales them. One chunk's logits live at a
  time and each is computed once (the earlier ``torch.utils.checkpoint`` version recomputed every
  chunk's logits in the backward: on SmolLM2 the output projection and the softmax ran twice, ~20%
  of a fine-tuning step).

The loss and the gradients equal the full-logits computation (up to float summation order;
tested). Models whose forward changes the logits after the output module (Gemma's
``final_logit_softcapping``, Cohere's ``logit_scale``) would get a wrong loss, so they are
refused by name (`ConfigError`); a model whose forward does not call its output module gives
full logits back, which is detected and used as is, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoqra.errors import ConfigError

__all__ = ["IGNORE_INDEX", "auto_chunk_tokens", "causal_lm_loss"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
#: config attributes that rescale the logits after the output module: chunking would skip them
_POST_HEAD_CONFIG = ("final_logit_softcapping", "logit_scale", "output_mult", "logits_scaling")
_warned_not_called: set[str] = set()


def auto_chunk_tokens(model: nn.Module, chunk_mib: float = 32.0) -> int | None:
    """Tokens per chunk so one chunk's fp32 logits take about ``chunk_mib`` MiB (at least 16), or
    None (full logits, logged) when the model cannot be chunked: no output embedding with an
    ``out_features``, or logits rescaled after it."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    try:
        head = _output_module(inner)
    except ConfigError as exc:
        logger.info("loss computed on full logits: %s", exc)
        return None
    vocab = getattr(head, "out_features", None)
    if not vocab:
        logger.info("loss computed on full logits: the output module %s has no out_features", type(head).__name__)
        return None
    return max(16, int(chunk_mib * 2**20 / (4 * vocab)))


def _output_module(inner: nn.Module) -> nn.Module:
    getter = getattr(inner, "get_output_embeddings", None)
    try:
        head = getter() if getter is not None else None
    except NotImplementedError:  # some models declare the method without implementing it
        head = None
    if head is None:
        raise ConfigError(
            f"chunked loss needs a model with an output embedding (get_output_embeddings()); "
            f"{type(inner).__name__} has none: pass loss_chunk_tokens=None"
        )
    config = getattr(inner, "config", None)
    for name in _POST_HEAD_CONFIG:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0, False):
            raise ConfigError(
                f"{type(inner).__name__} rescales its logits after the output module (config.{name}={value}), "
                "which the chunked loss would skip: pass loss_chunk_tokens=None"
            )
    return head


@contextlib.contextmanager
def _head_returns_input(head: nn.Module, called: list[bool]) -> Iterator[None]:
    """Within the block, ``head(x)`` returns ``x`` (an instance attribute shadows ``forward``)."""

    def passthrough(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        called.append(True)
        return x

    had_own = "forward" in head.__dict__
    previous = head.__dict__.get("forward")
    head.forward = passthrough  # type: ignore[method-assign]
    try:
        yield
    finally:
        if had_own:
            head.forward = previous  # type: ignore[method-assign]
        else:
            del head.forward


def _summed_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """fp32 cross-entropy summed over the non-ignored targets (``logits [..., V]``, ``target [...]``)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _ce_and_grad(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed fp32 cross-entropy of ``logits [n, V]`` against ``target [n]`` (no ignored entries) and
    its gradient with respect to the logits, ``softmax − onehot``, written over the logits' fp32
    buffer (the logits of a float32 module) or a float32 copy."""
    work = logits.detach()
    work = work if work.dtype == torch.float32 else work.float()
    lse = torch.logsumexp(work, dim=-1)
    loss = (lse - work.gather(1, target.unsqueeze(1)).squeeze(1)).sum()
    grad = work.sub_(lse.unsqueeze(1)).exp_()
    grad[torch.arange(target.shape[0], device=target.device), target] -= 1.0
    return loss, grad


class _HeadLoss(torch.autograd.Function):
    """Summed cross-entropy of ``head(hidden)`` over chunks of rows, with the gradients of ``hidden``
    and of ``params`` (the head's trainable parameters) computed in the forward, one chunk at a time."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, target: torch.Tensor, chunk: int, head: nn.Module,  # type: ignore[override]
                *params: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        for start in range(0, target.shape[0], chunk):
            stop = start + chunk
            with torch.enable_grad():
                h = hidden[start:stop].detach().requires_grad_(True)
                logits = head(h)
                loss, grad_logits = _ce_and_grad(logits.reshape(-1, logits.shape[-1]), target[start:stop])
                grads = torch.autograd.grad(logits, [h, *params], grad_logits.view_as(logits).to(logits.dtype),
                                            allow_unused=True)
            total += loss
            grad_hidden[start:stop] = grads[0]
            for i, g in enumerate(grads[1:]):
                if g is not None:
                    grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
            del logits, grad_logits, grads
        ctx.present = [g is not None for g in grad_params]
        ctx.save_for_backward(grad_hidden, *(g for g in grad_params if g is not None))
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):  # type: ignore[override]  # noqa: ANN205
        grad_hidden, *stored = ctx.saved_tensors
        found = iter(stored)
        grads = [next(found) * grad_total if present else None for present in ctx.present]
        return (grad_hidden * grad_total, None, None, None, *grads)


def _chunked_head_loss(head: nn.Module, hidden: torch.Tensor, target: torch.Tensor, chunk: int) -> torch.Tensor:
    """Summed fp32 cross-entropy of ``head(hidden)``, ``chunk`` rows at a time (see the module docstring)."""
    params = [p for p in head.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (hidden.requires_grad or params):
        return _HeadLoss.apply(hidden, target, chunk, head, *params)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, target.shape[0], chunk):
        total = total + _summed_ce(head(hidden[start:start + chunk]), target[start:start + chunk])
    return total


def _labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    ids = batch["input_ids"]
    labels = batch.get("labels")
    if labels is None:
        mask = batch.get("attention_mask")
        labels = ids if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)
    return labels


def _logits_of(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    return logits


def causal_lm_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    use_cache_flag: bool,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy (fp32) of one batch and the number of targets it averages.

    Args:
        model: a causal LM (or its DDP wrapper) returning logits (``.logits`` or the first output).
        batch: ``input_ids``, optional ``attention_mask`` (0 = padding, not a target) and
            ``labels`` (-100 = ignored).
        use_cache_flag: pass ``use_cache=False`` (Hugging Face models: no KV cache in training).
        chunk_tokens: None: full logits; n: the output module and the loss in chunks of n target
            tokens (see the module docstring).
    """
    ids = batch["input_ids"]
    kwargs: dict[str, Any] = {"input_ids": ids}
    mask = batch.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = mask
    if use_cache_flag:
        kwargs["use_cache"] = False
    target = _labels(batch)[:, 1:]
    count = int((target != IGNORE_INDEX).sum())
    if chunk_tokens is None:
        return _summed_ce(_logits_of(model(**kwargs))[:, :-1, :], target) / max(count, 1), count
    if chunk_tokens < 1:
        raise ConfigError(f"loss_chunk_tokens must be >= 1 or None (full logits), got {chunk_tokens}")

    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    head = _output_module(inner)
    called: list[bool] = []
    with _head_returns_input(head, called):
        out = _logits_of(model(**kwargs))
    if not called:  # the forward computed its logits some other way: they are full logits
        name = type(inner).__name__
        if name not in _warned_not_called:
            _warned_not_called.add(name)
            logger.warning("%s's forward does not call its output module: the loss uses full logits "
                           "(pass loss_chunk_tokens=None to silence this)", name)
        return _summed_ce(out[:, :-1, :], target) / max(count, 1), count
    hidden = out[:, :-1, :].reshape(-1, out.shape[-1])
    flat_target = target.reshape(-1)
    keep = flat_target != IGNORE_INDEX
    if not bool(keep.all()):  # ignored targets cost nothing: drop them before the output module
        hidden, flat_target = hidden[keep], flat_target[keep]
    return _chunked_head_loss(head, hidden, flat_target, chunk_tokens) / max(count, 1), count

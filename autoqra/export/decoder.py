"""The causal LM as a function of plain tensors, in the input/output layout onnxruntime-genai reads.

``with_past=True`` (``DecoderWithPast``): inputs ``input_ids [batch, seq]`` (int64),
``attention_mask [batch, past + seq]`` (int64), ``position_ids [batch, seq]`` (int64) and, per
block ``i``, ``past_key_values.i.key`` / ``.value`` ``[batch, kv_heads, past, head_dim]``;
outputs ``logits [batch, seq, vocab]`` and ``present.i.key`` / ``.value`` ``[batch, kv_heads,
past + seq, head_dim]``. A first call passes ``past = 0``. ``with_past=False`` (``DecoderLogits``):
``input_ids``, ``attention_mask`` → ``logits``, dynamic batch and sequence length.

Hugging Face's ``DynamicCache`` is rebuilt from the flat tensors inside ``forward`` so that
``torch.export`` sees only tensors at the boundary.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from autoqra.errors import ExportError

__all__ = ["DecoderLogits", "DecoderShape", "DecoderWithPast", "decoder_shape"]

PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"


@dataclass(frozen=True)
class DecoderShape:
    """What the KV-cache layout needs from a model config."""

    layers: int
    kv_heads: int
    heads: int
    head_dim: int
    hidden: int
    vocab: int
    context: int


def decoder_shape(model: nn.Module) -> DecoderShape:
    """Read the cache geometry from a Hugging Face config (``ExportError`` if it has none)."""
    cfg = getattr(model, "config", None)
    try:
        heads = int(cfg.num_attention_heads)
        hidden = int(cfg.hidden_size)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
        layers = int(cfg.num_hidden_layers)
        vocab = int(cfg.vocab_size)
        context = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048))
    except (AttributeError, TypeError) as exc:
        raise ExportError(
            f"cannot read the attention geometry from {type(model).__name__}'s config ({exc}); ONNX export "
            "supports Hugging Face causal LMs (a .config with num_attention_heads, hidden_size, "
            "num_hidden_layers, vocab_size)"
        ) from exc
    return DecoderShape(layers, kv_heads, heads, head_dim, hidden, vocab, context)


def _cache_argument(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class DecoderLogits(nn.Module):
    """``(input_ids, attention_mask) -> logits`` (no cache)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class DecoderWithPast(nn.Module):
    """``(input_ids, attention_mask, position_ids, past...) -> (logits, present...)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from transformers.cache_utils import DynamicCache

        self.model = model
        self.shape = decoder_shape(model)
        self._cache_cls = DynamicCache
        self._cache_arg = _cache_argument(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.shape.layers)]
        # full layers for every block (no config): a sliding-window layer would crop its keys inside
        # the graph, while the graph's contract is present = past + new; the model's own masks still
        # apply each block's window (the same logits)
        cache = self._cache_cls(ddp_cache_data=pairs)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self._cache_arg: cache})
        new_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        present: list[torch.Tensor] = []
        for layer in new_cache.layers:
            present += [layer.keys, layer.values]
        if len(present) != 2 * self.shape.layers:
            raise ExportError(
                f"the model returned a cache of {len(present) // 2} layers, expected {self.shape.layers}; "
                "export with with_past=False"
            )
        return (out.logits, *present)

    def names(self) -> tuple[list[str], list[str]]:
        """(input names, output names) in the order of ``forward``."""
        inputs = ["input_ids", "attention_mask", "position_ids"]
        outputs = ["logits"]
        for i in range(self.shape.layers):
            inputs += [PAST_KEY % i, PAST_VALUE % i]
            outputs += [PRESENT_KEY % i, PRESENT_VALUE % i]
        return inputs, outputs

    def empty_past(self, batch: int, dtype: torch.dtype, length: int = 0) -> list[torch.Tensor]:
        s = self.shape
        return [torch.zeros(batch, s.kv_heads, length, s.head_dim, dtype=dtype) for _ in range(2 * s.layers)]

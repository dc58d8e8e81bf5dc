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
import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from autoqra.errors import ExportError

__all__ = ["DecoderLogits", "DecoderShape", "DecoderWithPast", "decoder_shape", "probe_cache"]

logger = logging.getLogger(__name__)

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


def probe_cache(model: nn.Module, shape: DecoderShape) -> DecoderShape:
    """``shape`` with the cache geometry the model really produces: one token through it with the
    cache on, the key shapes ``[batch, kv_heads, 1, head_dim]`` of every block read back. A config can
    name a key the architecture ignores (``num_key_value_heads`` on GPT-NeoX) or derive ``head_dim``
    differently; the graph's cache inputs and ``genai_config.json`` must match the model, not the config."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=torch.ones(1, 1, dtype=torch.long), use_cache=True)
    finally:
        model.train(was_training)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    keys = [layer.keys for layer in getattr(cache, "layers", ()) if getattr(layer, "keys", None) is not None]
    if len(keys) != shape.layers or any(k.dim() != 4 for k in keys):
        raise ExportError(
            f"the model's cache has {len(keys)} layers of keys (expected {shape.layers} of [batch, heads, seq, dim]); "
            "export with with_past=False"
        )
    geometry = {(int(k.shape[1]), int(k.shape[3])) for k in keys}
    if len(geometry) != 1:
        raise ExportError(f"the blocks' caches differ in shape {sorted(geometry)}; export with with_past=False")
    kv_heads, head_dim = geometry.pop()
    if (kv_heads, head_dim) != (shape.kv_heads, shape.head_dim):
        logger.info("cache geometry from the model (%d key/value heads × %d) instead of the config's (%d × %d)",
                    kv_heads, head_dim, shape.kv_heads, shape.head_dim)
    return replace(shape, kv_heads=kv_heads, head_dim=head_dim)


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

    def __init__(self, model: nn.Module, shape: DecoderShape | None = None, split_cache: bool = False) -> None:
        """``split_cache``: trace with :class:`autoqra.export.gqa.SplitCache` and hand it to the attention
        layers (``attention="onnxruntime"``)."""
        super().__init__()
        from transformers.cache_utils import DynamicCache

        from autoqra.export.gqa import SplitCache

        self.model = model
        self.shape = shape if shape is not None else decoder_shape(model)
        self._cache_cls = SplitCache if split_cache else DynamicCache
        self._split = split_cache
        self._cache_arg = _cache_argument(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.shape.layers)]
        # full layers for every block (no config): a sliding-window layer would crop its keys inside
        # the graph, while the graph's contract is present = past + new; the model's own masks still
        # apply each block's window (the same logits)
        cache = self._cache_cls(ddp_cache_data=pairs)
        if self._split:  # lengths from attention_mask: onnxruntime-genai may pass a shared, maximum-length buffer
            cache.autoqra_past_length = attention_mask.shape[1] - input_ids.shape[1]
        layers = [m for m in self.model.modules() if isinstance(getattr(m, "layer_idx", None), int)] if self._split else []
        for m in layers:
            m._autoqra_cache = cache
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, **{self._cache_arg: cache})
        finally:
            for m in layers:
                del m._autoqra_cache
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

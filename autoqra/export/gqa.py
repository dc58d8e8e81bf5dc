"""Attention as onnxruntime's ``com.microsoft::GroupQueryAttention``: one node a layer, the cache appended inside it.

``export_onnx(attention="onnxruntime")`` traces each attention layer as one PyTorch op,
:func:`group_query_attention`, that the exporter translates into onnxruntime's fused
``GroupQueryAttention`` contrib op (the op onnxruntime-genai's own model builder emits). The op takes
the layer's new keys and values and the past cache separately, appends them itself (``present``), and
computes the scores, mask, softmax and weighted sum in one kernel — in place of the ~20 nodes of the
decomposed form (reshapes, transposes, the cache ``Concat``, two products, the mask, the softmax).

How the trace gets the past and the new keys apart: Hugging Face attention layers update the cache
before calling the attention function, which then sees only the concatenation. During the export the
cache is a :class:`SplitCache`, which records for every layer what it held before the update and what
the update appended; the attention function (``autoqra_onnxruntime``, registered with transformers'
``AttentionInterface``) looks the layer up, calls the op and puts the op's ``present`` into the cache
(the concatenation the update made is then unused and dropped from the graph). A call the op does not
cover (see :func:`autoqra.export.attention.covered`; and bf16, which onnxruntime's CPU kernel lacks) runs the grouped form of :mod:`autoqra.export.attention` on the
concatenation instead — the same result, the decomposed nodes.

Semantics kept exactly: the model's own additive mask (``eager_mask``: causal, padding, sliding windows)
is passed as the op's ``attention_bias``; the op's own causal rule then adds nothing (``seqlens_k`` is
every row's full length). Rotary embeddings stay the model's own nodes before the op.

One limit, onnxruntime's (CPU kernel, 1.32): a call with ``batch > 1`` **and** more than one new token
**and** a non-empty past is refused at run time ("batch_size must be 1 when sequence_length > 1 and past
context is given"). Prompts (empty past) of any batch, and token-by-token decoding of any batch, run;
export with ``attention="grouped"`` to continue several sequences by more than one token at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autoqra.export.attention import covered, grouped_product, grouped_query_attention
from autoqra.export.ops import contrib_op

__all__ = ["SplitCache", "group_query_attention", "onnx_translation_table", "reference_attention"]

#: the dtypes onnxruntime's CPU kernel takes
_KERNEL_DTYPES = (torch.float32, torch.float16)


#: the op's PyTorch reference: the grouped form's arithmetic (``query [b, h, s, d]``, ``key``/``value``
#: ``[b, kv, t, d]``, ``bias [b, 1, s, t]`` → ``[b, h, s, d]``)
reference_attention = grouped_product


@torch.library.custom_op("autoqra::group_query_attention", mutates_args=())
def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, bias: torch.Tensor, num_heads: int, kv_heads: int,
                          scale: float, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``GroupQueryAttention``'s contract: ``query [b, s, h·d]``, ``key``/``value`` ``[b, s, kv·d]`` (new
    tokens), ``past_key``/``past_value`` ``[b, kv, p, d]``, ``bias [b, 1, s, p + s]`` (additive), ``softcap``
    (0: none) → ``(out [b, s, h·d], present_key, present_value [b, kv, p + s, d])``."""
    b, s, _ = query.shape
    d = query.shape[-1] // num_heads
    new_key = key.view(b, s, kv_heads, d).transpose(1, 2)
    new_value = value.view(b, s, kv_heads, d).transpose(1, 2)
    present_key = torch.cat([past_key, new_key], dim=2)
    present_value = torch.cat([past_value, new_value], dim=2)
    out = reference_attention(query.view(b, s, num_heads, d).transpose(1, 2), present_key, present_value, bias, scale,
                              softcap)
    return out.transpose(1, 2).reshape(b, s, num_heads * d), present_key, present_value


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, bias, num_heads, kv_heads, scale, softcap=0.0):  # type: ignore[no-untyped-def]
    b, s, _ = query.shape
    total = past_key.shape[2] + s
    shape = (b, kv_heads, total, past_key.shape[3])
    return query.new_empty(query.shape), past_key.new_empty(shape), past_value.new_empty(shape)


@dataclass(frozen=True)
class _Update:
    """One layer's cache update during the trace: the past, the new keys/values, the concatenation."""

    past_key: torch.Tensor
    past_value: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    full_key: torch.Tensor


def _split_cache_class() -> type:
    from transformers.cache_utils import DynamicCache

    class _SplitCache(DynamicCache):
        """A ``DynamicCache`` that records each layer's past and new keys/values (see the module docstring)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.autoqra_updates: dict[int, _Update] = {}
            self.autoqra_past_length: Any = None  # set from attention_mask by the decoder wrapper

        def get_seq_length(self, layer_idx: int = 0) -> Any:
            """The past's length from ``attention_mask`` (a shared buffer's shape is the maximum length)."""
            if self.autoqra_past_length is None:
                return super().get_seq_length(layer_idx)
            return self.autoqra_past_length

        def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[Any, int]:
            if self.autoqra_past_length is None:
                return super().get_mask_sizes(query_length, layer_idx)
            return self.autoqra_past_length + query_length, 0

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
            past = (getattr(layer, "keys", None), getattr(layer, "values", None))
            keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            if past[0] is not None and past[1] is not None and past[0].dim() == 4:
                self.autoqra_updates[layer_idx] = _Update(past[0], past[1], key_states, value_states, keys)
            return keys, values

        def autoqra_present(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
            """Replace the layer's concatenation by the op's ``present`` (the graph's cache output)."""
            layer = self.layers[layer_idx]
            layer.keys, layer.values = key, value

    return _SplitCache


_SPLIT_CACHE: type | None = None


def SplitCache(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - a class factory (transformers is imported lazily)
    """A new split cache (a ``DynamicCache`` subclass; arguments as ``DynamicCache``'s)."""
    global _SPLIT_CACHE
    if _SPLIT_CACHE is None:
        _SPLIT_CACHE = _split_cache_class()
    return _SPLIT_CACHE(*args, **kwargs)


def onnxruntime_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract (as :func:`autoqra.export.attention.grouped_query_attention`),
    traced as one :func:`group_query_attention` op where the layer's cache update was recorded."""
    cache = getattr(module, "_autoqra_cache", None)
    index = getattr(module, "layer_idx", None)
    update = None if cache is None or index is None else cache.autoqra_updates.get(index)
    if (update is None or update.full_key is not key or query.dtype not in _KERNEL_DTYPES
            or not covered(query, key, value, attention_mask, dropout, kwargs) or attention_mask.dtype != query.dtype):
        return grouped_query_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                       **kwargs)
    b, h, s, d = query.shape
    kv = key.shape[1]
    scale = d**-0.5 if scaling is None else scaling
    out, present_key, present_value = group_query_attention(
        query.transpose(1, 2).reshape(b, s, h * d), update.key.transpose(1, 2).reshape(b, s, kv * d),
        update.value.transpose(1, 2).reshape(b, s, kv * d), update.past_key, update.past_value,
        attention_mask, h, kv, float(scale), float(kwargs.get("softcap") or 0.0))
    cache.autoqra_present(index, present_key, present_value)
    return out.view(b, s, h, d), None


def _gqa_op() -> Any:
    """``GroupQueryAttention`` as onnxruntime documents it (its inputs; the attributes used here)."""
    return contrib_op(
        "GroupQueryAttention", "onnxruntime contrib op: grouped-query attention with a key/value cache",
        inputs=[("query", "T"), ("key?", "T"), ("value?", "T"), ("past_key?", "T"), ("past_value?", "T"),
                ("seqlens_k", "M"), ("total_sequence_length", "M"), ("cos_cache?", "T"), ("sin_cache?", "T"),
                ("position_ids?", "P"), ("attention_bias?", "T")],
        outputs=[("output", "T"), ("present_key", "T"), ("present_value", "T")],
        types=[("T", ["tensor(float)", "tensor(float16)"], "activations"), ("M", ["tensor(int32)"], "lengths"),
               ("P", ["tensor(int64)"], "positions")],
        attributes={"num_heads": "INT", "kv_num_heads": "INT", "scale": "FLOAT", "softcap": "FLOAT"},
    )


def onnx_translation_table() -> dict[Any, Any]:
    """``{torch op: onnxscript function}`` for the exporter: :func:`group_query_attention` → one
    ``GroupQueryAttention`` node (``seqlens_k`` = every row's full length − 1 and ``total_sequence_length``
    from the bias's last axis, so the op's own causal rule is the bias's)."""
    gqa_op = _gqa_op()

    def group_query_attention_onnx(query, key, value, past_key, past_value, bias,  # type: ignore[no-untyped-def]
                                   num_heads: int, kv_heads: int, scale: float, softcap: float = 0.0):
        from onnxscript.onnx_opset import opset18 as op

        total = op.Shape(bias, start=3, end=4)  # int64 [1]
        seqlens = op.Cast(op.Expand(op.Sub(total, op.Constant(value_ints=[1])), op.Shape(bias, start=0, end=1)), to=6)
        total = op.Cast(op.Squeeze(total, op.Constant(value_ints=[0])), to=6)  # int32 scalar
        return gqa_op(query, key, value, past_key, past_value, seqlens, total, None, None, None, bias,
                      num_heads=num_heads, kv_num_heads=kv_heads, scale=scale, softcap=softcap)

    return {torch.ops.autoqra.group_query_attention.default: group_query_attention_onnx}

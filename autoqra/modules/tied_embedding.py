"""``TiedQuantEmbedding``: an input embedding that reads its rows from the compiled output layer it is
tied to, so that a tied vocabulary matrix is held once, in the output layer's format.

Small language models tie ``lm_head`` to the input embedding (SmolLM2, Qwen2.5-0.5B, Llama 3.2 1B, Gemma):
one ``[vocab, hidden]`` matrix, a fifth to a third of the model. Quantizing the ``lm_head`` alone
(``include=("lm_head",)``) would *add* its codes beside the float matrix the embedding still reads.
Instead, the compile swaps the embedding for this module, which holds no tensor of its own: each lookup
dequantizes the requested rows of the ``lm_head``'s codes (:meth:`QuantLoRALinear.rows`), so the float
matrix is freed and the held bytes are the plan's.

* The lookup is the output layer's *base* weight: its adapter is not applied (as with peft, where a LoRA
  on a tied ``lm_head`` does not change the input embedding), and the rows come back in the dtype the
  embedding had. A ``…ScaledWordEmbedding`` (Gemma) keeps its ``embed_scale``.
* The output layer is referenced, not registered as a submodule: its tensors appear once in
  ``state_dict()`` / ``parameters()`` (under the output layer's name), and device moves of the model reach
  them through it. ``autoqra.save`` records the sharing; ``autoqra.load`` restores it.
* Measured on SmolLM2-135M (8 Lee windows of 512 tokens, fp32 28.14): the embedding side of a shared 8-bit
  matrix costs nothing (28.14), of a 4-bit one +0.9% (28.38), 3 bits +6%, 2 bits +70% (the ``lm_head``
  side alone: 28.14 / 30.70 / 43.20 / 102.5). The measured selection of `autoqra.compile` scores plans
  with the sharing in place.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from autoqra.errors import ConfigError, UnsupportedLayerError
from autoqra.modules.quant_lora_linear import QuantLoRALinear

__all__ = ["TIED_EMBEDDING_MODES", "TiedQuantEmbedding", "check_mode", "shareable"]

#: ``compile(tied_embedding=...)``: "share" (default) reads a tied embedding from its compiled output
#: layer; "keep" leaves the embedding's float matrix as it is (held beside the output layer's codes).
TIED_EMBEDDING_MODES = ("share", "keep")


def check_mode(mode: object) -> str:
    """``mode`` when it is one of :data:`TIED_EMBEDDING_MODES`, else a `ConfigError` naming them."""
    if mode not in TIED_EMBEDDING_MODES:
        raise ConfigError(f"tied_embedding must be one of {TIED_EMBEDDING_MODES}, got {mode!r}")
    return mode


def _scale_of(embedding: nn.Embedding) -> torch.Tensor | float | int | None:
    """The ``embed_scale`` factor a ``…ScaledWordEmbedding``'s own forward applies (None for a plain one)."""
    if type(embedding).forward is nn.Embedding.forward:
        return None
    scale = getattr(embedding, "embed_scale", None)
    return scale if isinstance(scale, (torch.Tensor, float, int)) else None


def shareable(embedding: nn.Module) -> str | None:
    """None when ``embedding`` can read its rows from a tied output layer, else why not."""
    if not isinstance(embedding, nn.Embedding):
        return f"{type(embedding).__name__} is not an nn.Embedding"
    if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
        return "it uses max_norm / scale_grad_by_freq / sparse, which a shared lookup does not reproduce"
    if type(embedding).forward is not nn.Embedding.forward and _scale_of(embedding) is None:
        return f"{type(embedding).__name__} has its own forward (only an embed_scale factor is understood)"
    return None


class TiedQuantEmbedding(nn.Module):
    """See the module docstring. ``embedding``: the module it replaces (only its settings are kept)."""

    def __init__(self, source: QuantLoRALinear, embedding: nn.Embedding, *, source_name: str) -> None:
        super().__init__()
        reason = shareable(embedding)
        if reason is not None:
            raise UnsupportedLayerError(f"cannot share the embedding with {source_name!r}: {reason}; compile "
                                        "with tied_embedding='keep'")
        if (source.out_features, source.in_features) != tuple(embedding.weight.shape):
            raise UnsupportedLayerError(
                f"{source_name!r} is [{source.out_features}, {source.in_features}], the embedding "
                f"{list(embedding.weight.shape)}: they are not one tied matrix")
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        # an empty buffer carries the output dtype, so model.to(dtype) / .float() / a bf16 model widened for
        # export change it as they would an embedding's weight
        self.register_buffer("dtype_probe", torch.empty(0, dtype=embedding.weight.dtype,
                                                      device=embedding.weight.device), persistent=False)
        self.source_name = source_name
        self.__dict__["source"] = source  # a reference, not a submodule: its tensors are the output layer's
        # the replaced module without its weight (the class and settings `to_embedding` rebuilds)
        template = embedding.__class__.__new__(embedding.__class__)
        template.__dict__.update(embedding.__dict__)
        template._parameters, template._buffers = {"weight": None}, dict(embedding._buffers)
        template._modules = {}
        self.__dict__["template"] = template
        scale = _scale_of(embedding)
        if scale is not None:
            scale = torch.as_tensor(scale, dtype=torch.float32, device=embedding.weight.device)
            self.register_buffer("embed_scale", scale.detach().clone(), persistent=False)
        else:
            self.embed_scale = None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype lookups come back in (the replaced embedding's, following the model's casts)."""
        return self.dtype_probe.dtype

    def dequantized_weight(self) -> torch.Tensor:
        """The whole ``[vocab, hidden]`` matrix the lookups read (materialized: the size of a float copy)."""
        return self.source.dequantized_weight(self.dtype)

    def to_embedding(self) -> nn.Embedding:
        """A plain embedding module of the replaced class holding the dequantized matrix (float, untied)."""
        embedding = copy.deepcopy(self.template)
        embedding.weight = nn.Parameter(self.dequantized_weight().detach().clone(), requires_grad=False)
        return embedding

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.source.rows(input_ids, self.dtype).view(*input_ids.shape, self.embedding_dim)
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(self.dtype)
        return out

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, reads {self.source_name!r} "
                f"({self.source.bits}-bit), dtype={str(self.dtype).removeprefix('torch.')}")

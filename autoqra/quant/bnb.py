"""Optional ``bnb`` backend: bitsandbytes nf4 (4 bits) and int8 (8 bits), QLoRA-style baselines.

* 4 bits: ``bitsandbytes.functional.quantize_4bit(quant_type="nf4", blocksize=group_size)``
  on the row-padded weight (so bitsandbytes' flat blocks are exactly our per-row groups). The
  codes index the NF4 code book (:meth:`BnbBackend.codebook`); ``scale`` = the block absmax
  (rounded from bitsandbytes' fp32 to our fp16), ``zero`` = 0.
* 8 bits: ``bitsandbytes.functional.int8_vectorwise_quant`` (row-wise symmetric absmax, as
  LLM.int8 weights, without outlier decomposition); stored as codes ``q + 128`` with
  ``zero = 128`` and ``scale = absmax / 127`` repeated for every group of the row, so the bytes
  follow the one cost model.

Both ran on CPU with bitsandbytes 0.50 here. Install with ``pip install autoqra[bnb]``.
``importance`` is ignored (logged warning): bitsandbytes' rounding has no weights.
"""

from __future__ import annotations

import functools
import logging
import math

import torch

from autoqra.quant.base import (
    QuantBackend,
    QuantizedWeight,
    QuantSpec,
    Support,
    check_weight,
    register_backend,
)
from autoqra.quant.pack import pack

__all__ = ["BnbBackend"]

logger = logging.getLogger(__name__)

#: block sizes bitsandbytes' quantize_4bit accepts
_NF4_BLOCKS = (64, 128, 256, 512, 1024, 2048, 4096)


@register_backend
class BnbBackend(QuantBackend):
    """bitsandbytes nf4 / int8, stored in the common packed format."""

    name = "bnb"
    supported_bits = (4, 8)
    package = "bitsandbytes.functional"
    extra = "bnb"

    def supports(self, in_features: int, out_features: int, spec: QuantSpec) -> Support:
        base = super().supports(in_features, out_features, spec)
        if base.ok and spec.bits == 4 and spec.group_size not in _NF4_BLOCKS:
            return Support(
                False, f"bitsandbytes nf4 needs group_size in {_NF4_BLOCKS}, got {spec.group_size}"
            )
        return base

    def codebook(self, bits: int) -> torch.Tensor | None:
        return _nf4_codebook() if bits == 4 else None

    def quantize(
        self,
        weight: torch.Tensor,
        spec: QuantSpec,
        *,
        importance: torch.Tensor | None = None,
        name: str | None = None,
    ) -> QuantizedWeight:
        w = check_weight(weight, name)
        out_f, in_f = w.shape
        self.check_supported(in_f, out_f, spec, name)
        bnbf = self.require()
        if importance is not None:
            logger.warning("bnb backend ignores the importance vector (layer %s)", name or "?")
        g = spec.group_size
        n_groups = math.ceil(in_f / g)
        w = torch.nn.functional.pad(w, (0, n_groups * g - in_f)).cpu().contiguous()
        if spec.bits == 4:
            packed4, state = bnbf.quantize_4bit(w, blocksize=g, quant_type="nf4")
            p = packed4.reshape(-1)
            codes = torch.stack([p >> 4, p & 15], dim=1).reshape(out_f, n_groups * g)
            scale = state.absmax.reshape(out_f, n_groups)
            zero = torch.zeros_like(scale)
            codebook = state.code.to(torch.float32)
        else:
            q, row_absmax, _ = bnbf.int8_vectorwise_quant(w)
            codes = (q.to(torch.int16) + 128).to(torch.uint8)
            scale = (row_absmax.to(torch.float32) / 127.0).unsqueeze(1).expand(out_f, n_groups)
            zero = torch.full_like(scale, 128.0)
            codebook = None
        return QuantizedWeight(
            packed=pack(codes, spec.bits).to(weight.device),
            scale=scale.to(torch.float16).contiguous().to(weight.device),
            zero=zero.to(torch.float16).contiguous().to(weight.device),
            shape=(out_f, in_f),
            bits=spec.bits,
            group_size=g,
            codebook=None if codebook is None else codebook.to(weight.device),
            backend=self.name,
        )


@functools.cache
def _nf4_codebook() -> torch.Tensor | None:
    """The 16 NF4 levels, read from bitsandbytes (``None`` when it is not installed)."""
    from autoqra.quant.base import optional_import

    bnbf = optional_import("bitsandbytes.functional")
    if bnbf is None:
        return None
    return bnbf.get_4bit_type("nf4", device="cpu").to(torch.float32)

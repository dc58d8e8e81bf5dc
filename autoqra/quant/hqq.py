"""Optional ``hqq`` backend: Half-Quadratic Quantization chooses the scales and zeros.

Uses ``hqq.core.quantize.Quantizer.quantize`` (``optimize=True``, groups along the input
dimension, float zeros, no bit-packing) on CPU, then stores the result in the common packed
format (:class:`autoqra.quant.base.QuantizedWeight`, fp16 scale and zero), so it runs and counts
exactly like ``packed``. Rows are zero-padded to whole groups before HQQ sees them (the zeros
take part in HQQ's fit of the last group). HQQ's objective has no importance weights: an
``importance`` vector is ignored, with a logged warning. Works on CPU with hqq 0.2.x; install
with ``pip install autoqra[hqq]``.
"""

from __future__ import annotations

import logging
import math

import torch

from autoqra.quant.base import QuantBackend, QuantizedWeight, QuantSpec, check_weight, register_backend
from autoqra.quant.pack import pack

__all__ = ["HQQBackend"]

logger = logging.getLogger(__name__)


@register_backend
class HQQBackend(QuantBackend):
    """HQQ-optimized asymmetric group-wise integers, stored in the packed format."""

    name = "hqq"
    supported_bits = (2, 3, 4, 8)
    package = "hqq.core.quantize"
    extra = "hqq"
    _warned: bool = False

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
        hqq_quantize = self.require()
        if importance is not None and not self._warned:
            self._warned = True  # once per backend instance: one line, not one per layer
            logger.warning("hqq backend ignores importance vectors (first: layer %s); HQQ fits unweighted error",
                           name or "?")
        g = spec.group_size
        n_groups = math.ceil(in_f / g)
        w = torch.nn.functional.pad(w, (0, n_groups * g - in_f))
        codes, meta = hqq_quantize.Quantizer.quantize(
            w.cpu(),
            nbits=spec.bits,
            channel_wise=True,
            group_size=g,
            optimize=True,
            round_zero=False,
            axis=1,
            bitpack=False,
            compute_dtype=torch.float32,
            device="cpu",
        )
        codes = codes.reshape(out_f, n_groups * g).round().clamp(0, (1 << spec.bits) - 1).to(torch.uint8)
        return QuantizedWeight(
            packed=pack(codes, spec.bits).to(weight.device),
            scale=meta["scale"].reshape(out_f, n_groups).to(torch.float16).to(weight.device),
            zero=meta["zero"].reshape(out_f, n_groups).to(torch.float16).to(weight.device),
            shape=(out_f, in_f),
            bits=spec.bits,
            group_size=g,
            backend=self.name,
        )

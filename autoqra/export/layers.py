"""``OnnxQuantLinear``: the export-time stand-in for a :class:`QuantLoRALinear`.

Built from a compiled layer just before export and swapped back right after, it holds the tensors
in the form onnxruntime's ``MatMulNBits`` reads (see :mod:`autoqra.export.ops`) and its forward is
what the ONNX graph computes:

* **2 / 4 bits**: ``MatMulNBits`` with autoqra's packed codes as they are (the byte layouts are the
  same), the fp16 scales and *fractional* zero points cast to the activation dtype (exact).
* **3 bits**: onnxruntime has no 3-bit kernel; the codes (0..7) go into a 4-bit container with the
  same scales and zero points: exact, at 4/3 of the codes' bytes (:func:`container_bytes`).
* **8 bits**: onnxruntime's CPU kernel refuses float zero points at 8 bits, so the zero point is
  split into ``round(zero)`` (uint8, in the op) and the residual ``zero - round(zero)``, whose
  product ``-Σ_group(x) · (residual · scale)`` is added by one small ``MatMul`` over the group
  sums (exact up to float rounding; omitted when every zero point is an integer).
* **16 bits**: a float ``MatMul`` with the fp16 weight cast to the activation dtype (``weight_t [in, out]``).
* **Adapters**: ``separate`` keeps ``x @ A^T @ (scaling · B)^T`` as its own ``MatMul`` pair
  beside the quantized product (initializers ``<layer>.lora_A_t = A^T [in, r]`` and
  ``<layer>.lora_B_t = (scaling · B)^T [r, out]``: swap them to change the adapter); ``merged`` folds ``scaling · B A`` into a 16-bit weight and is
  refused for a quantized layer, whose merge would re-quantize (change) the base.

Code-book formats (bitsandbytes nf4) have no ``MatMulNBits`` form and are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoqra.errors import ExportError
from autoqra.export.ops import matmul_nbits  # noqa: F401  (registers torch.ops.autoqra.matmul_nbits)
from autoqra.ir.cost import DENSE_BITS
from autoqra.modules.quant_lora_linear import QuantLoRALinear
from autoqra.quant.pack import pack, unpack

__all__ = ["ADAPTER_MODES", "ACCURACY_LEVELS", "OnnxQuantLinear", "container_bytes"]

ADAPTER_MODES = ("separate", "merged")
#: MatMulNBits ``accuracy_level``: 0/1 fp32 compute (exact), 2 fp16, 3 bf16, 4 int8 activations (fastest on CPU)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def container_bytes(layer: QuantLoRALinear) -> int:
    """Extra bytes the ONNX file spends on this layer's codes beyond autoqra's packed form
    (a 3-bit layer's codes in a 4-bit container; 0 for every other layer)."""
    if layer.bits != 3:
        return 0
    values = layer.out_features * layer.scale.shape[1] * layer.group_size
    return values // 2 - layer.packed_qweight().numel()


class OnnxQuantLinear(nn.Module):
    """See the module docstring. ``dtype``: the activation dtype of the exported graph."""

    def __init__(self, layer: QuantLoRALinear, *, name: str, adapters: str, accuracy_level: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        if adapters not in ADAPTER_MODES:
            raise ExportError(f"adapters must be one of {ADAPTER_MODES}, got {adapters!r}")
        if accuracy_level not in ACCURACY_LEVELS:
            raise ExportError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level!r}")
        if layer.codebook is not None:
            raise ExportError(
                f"layer {name!r} uses the code-book backend {layer.backend_name!r}, which onnxruntime's "
                "MatMulNBits cannot represent; compile with backend='packed' (the default) to export"
            )
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.accuracy_level = accuracy_level
        self.bits = layer.bits
        has_adapter = bool(layer.rank) and not layer.merged
        if adapters == "merged" and has_adapter and layer.bits != DENSE_BITS:
            raise ExportError(
                f"layer {name!r} is {layer.bits}-bit: merging its adapter would re-quantize the base and "
                "change the model; export with adapters='separate' (each adapter its own small MatMul pair)"
            )
        with torch.no_grad():
            self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().to(dtype).clone(),
                                                                      requires_grad=False)
            self.lora_A_t = self.lora_B_t = None
            if layer.bits == DENSE_BITS:
                weight = layer.weight.to(torch.float32)
                if has_adapter and adapters == "merged":
                    weight = weight + layer.delta_weight()
                    has_adapter = False
                self.register_buffer("weight_t", weight.T.to(dtype).contiguous())  # [in, out]
            else:
                self._init_quantized(layer, dtype)
            if has_adapter:
                self.lora_A_t = nn.Parameter(layer.lora_A.detach().T.to(dtype).contiguous(), requires_grad=False)
                self.lora_B_t = nn.Parameter((layer.lora_B.detach().float() * layer.scaling).T.to(dtype).contiguous(),
                                             requires_grad=False)

    def _init_quantized(self, layer: QuantLoRALinear, dtype: torch.dtype) -> None:
        n, n_blocks, block = layer.out_features, layer.scale.shape[1], layer.group_size
        packed = layer.packed_qweight()
        self.block_size = block
        self.kernel_bits = 4 if layer.bits == 3 else layer.bits
        if layer.bits == 3:  # codes 0..7 in a 4-bit container
            packed = pack(unpack(packed, 3, n * n_blocks * block), 4)
        self.register_buffer("qweight", packed.view(n, n_blocks, block * self.kernel_bits // 8).clone())
        self.register_buffer("scales", layer.scale.to(dtype).reshape(-1).clone())
        zero = layer.zero.float()
        self.register_buffer("zero_residual", None)
        if layer.bits == 8:
            integer = zero.round().clamp(0, 255)
            self.register_buffer("zero_points", integer.to(torch.uint8).reshape(-1).clone())
            residual = (zero - integer) * layer.scale.float()
            if bool((residual != 0).any()):
                self.register_buffer("zero_residual", residual.T.to(dtype).contiguous())  # [n_blocks, out]
        else:
            self.register_buffer("zero_points", layer.zero.to(dtype).reshape(-1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == DENSE_BITS:
            y = x @ self.weight_t
        else:
            y = torch.ops.autoqra.matmul_nbits(
                x, self.qweight, self.scales, self.zero_points, self.in_features, self.out_features,
                self.kernel_bits, self.block_size, self.accuracy_level,
            )
            if self.zero_residual is not None:
                n_blocks = self.zero_residual.shape[0]
                pad = n_blocks * self.block_size - self.in_features
                xs = F.pad(x, (0, pad)) if pad else x
                sums = xs.reshape(*x.shape[:-1], n_blocks, self.block_size).sum(-1)
                y = y - sums @ self.zero_residual
        if self.lora_A_t is not None:
            y = y + (x @ self.lora_A_t) @ self.lora_B_t
        if self.bias is not None:
            y = y + self.bias
        return y

"""``OnnxQuantLinear``: the export-time stand-in for a :class:`QuantLoRALinear`.

Built from a compiled layer just before export and swapped back right after, it holds the tensors
in the form onnxruntime's ``MatMulNBits`` reads (see :mod:`autoqra.export.ops`) and its forward is
what the ONNX graph computes:

* **2 / 4 / 8 bits**: ``MatMulNBits`` with autoqra's packed codes as they are (the byte layouts are
  the same) and the fp16 scales (cast to the activation dtype in the graph; onnxruntime folds the
  cast at load). autoqra's zero points are *fractional*; onnxruntime's fast CPU kernels take only
  integer (uint8) zero points (float zero points run ~60x slower at 4 bits and are refused at 8),
  so each zero point is split into ``round(zero)`` (uint8, packed like the codes, in the op) and
  the exact fp16 fraction ``zero - round(zero)``, whose term ``-Σ_group(x) · fraction · scale`` is
  a product with the per-group sums of ``x`` (exact up to float rounding; omitted when every zero
  point is an integer). File cost over autoqra's format: ``bits / 8`` bytes a group.
* **One side path**: the adapter and the fraction term share one ``MatMul``,
  ``y = MatMulNBits(x) + [x @ A^T | Σ_group x] @ [(scaling · B)^T ; -(fraction · scale)^T]``; the
  right factor reads only initializers (onnxruntime folds it at load), the group sums read no weights
  and onnxruntime computes them once for the layers that share an input (q/k/v, gate/up).
* **3 bits**: onnxruntime has no 3-bit kernel; the codes (0..7) go into a 4-bit container with the
  same scales and zero points: exact, at 4/3 of the codes' bytes (:func:`container_bytes`).
* **16 bits**: a float ``MatMul`` with the fp16 weight cast to the activation dtype (``weight_t [in, out]``).
* **Adapters**: ``separate`` keeps ``x @ A^T @ (scaling · B)^T`` as its own ``MatMul`` pair
  beside the quantized product (initializers ``<layer>.lora_A_t = A^T [in, r]`` and
  ``<layer>.lora_B_t = (scaling · B)^T [r, out]``: swap them to change the adapter); ``merged`` folds ``scaling · B A`` into a 16-bit weight and is
  refused for a quantized layer, whose merge would re-quantize (change) the base.

Code-book formats (bitsandbytes nf4) have no ``MatMulNBits`` form and are refused.
"""

from __future__ import annotations

import torch
from torch import nn

from autoqra.errors import ExportError
from autoqra.export.ops import side_path  # also registers torch.ops.autoqra.quant_linear
from autoqra.ir.cost import DENSE_BITS
from autoqra.modules.quant_lora_linear import QuantLoRALinear
from autoqra.modules.tied_embedding import TiedQuantEmbedding
from autoqra.quant.pack import pack, unpack

__all__ = ["ADAPTER_MODES", "ACCURACY_LEVELS", "OnnxQuantLinear", "OnnxTiedEmbedding", "container_bytes"]

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
        self.kernel_bits = kb = 4 if layer.bits == 3 else layer.bits
        if layer.bits == 3:  # codes 0..7 in a 4-bit container
            packed = pack(unpack(packed, 3, n * n_blocks * block), 4)
        self.register_buffer("qweight", packed.view(n, n_blocks, block * kb // 8).clone())
        # fp16 in the file (as in autoqra's format); cast in the graph, folded by onnxruntime at load
        self.register_buffer("scales", layer.scale.reshape(-1).clone())
        integer = layer.zero.float().round().clamp(0, (1 << kb) - 1)
        per_byte = 8 // kb  # zero points packed like the codes, each row padded to whole bytes
        rows = torch.nn.functional.pad(integer.to(torch.uint8), (0, (-n_blocks) % per_byte))
        self.register_buffer("zero_points", pack(rows, kb))
        fraction = (layer.zero.float() - integer).to(torch.float16)  # exact: fp16 minus a small integer
        self.register_buffer("zero_fraction", fraction.clone() if bool((fraction != 0).any()) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits != DENSE_BITS:  # one op, translated into MatMulNBits + the side path + bias
            return torch.ops.autoqra.quant_linear(
                x, self.qweight, self.scales, self.zero_points, self.zero_fraction, self.lora_A_t, self.lora_B_t,
                self.bias, self.in_features, self.out_features, self.kernel_bits, self.block_size,
                self.accuracy_level,
            )
        y = x @ self.weight_t
        side = side_path(x, None, None, self.lora_A_t, self.lora_B_t, 0)
        if side is not None:
            y = y + side
        if self.bias is not None:
            y = y + self.bias
        return y


class OnnxTiedEmbedding(nn.Module):
    """The export-time stand-in for a :class:`~autoqra.modules.tied_embedding.TiedQuantEmbedding`: it gathers the
    requested rows of its output layer's exported tensors — the codes, scales and zero points the
    ``MatMulNBits`` reads (or the 16-bit ``weight_t``) — and dequantizes them with plain ONNX operators
    (``Gather``, bit shifts, ``Sub``, ``Mul``): the file holds the tied matrix once. ``source`` is referenced,
    not registered, so its tensors keep the output layer's names."""

    def __init__(self, source: OnnxQuantLinear, embedding: TiedQuantEmbedding, *, name: str, dtype: torch.dtype,
                 merged_rank: bool) -> None:
        super().__init__()
        if source.bits == DENSE_BITS and merged_rank:
            raise ExportError(
                f"{name!r} reads its rows from {embedding.source_name!r}, whose adapter adapters='merged' would fold "
                "into the shared 16-bit weight (the embedding would change); export with adapters='separate'")
        self.__dict__["source"] = source
        self.embedding_dim = embedding.embedding_dim
        self.dtype = dtype
        self.embed_scale = None if embedding.embed_scale is None else float(embedding.embed_scale)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = self.source
        flat = input_ids.reshape(-1)
        if s.bits == DENSE_BITS:
            rows = s.weight_t.index_select(1, flat).T  # weight_t is [in, out]: a vocabulary row is a column
        else:
            n_blocks, block = s.qweight.shape[1], s.block_size
            codes = _unpacked(s.qweight.index_select(0, flat), s.kernel_bits)  # [n, n_blocks, block]
            picked = (flat.unsqueeze(1) * n_blocks + torch.arange(n_blocks, device=flat.device)).reshape(-1)
            scale = s.scales.index_select(0, picked).reshape(-1, n_blocks).float()  # the flat fp16 scales
            # the zero points are packed flat, each row padded to whole bytes: gather each row's bytes by index
            # (a Reshape of the initializer would be folded into a second copy)
            row_bytes = s.zero_points.shape[0] // s.qweight.shape[0]
            at = (flat.unsqueeze(1) * row_bytes + torch.arange(row_bytes, device=flat.device)).reshape(-1)
            zero = _unpacked(s.zero_points.index_select(0, at), s.kernel_bits).reshape(flat.shape[0], -1)
            zero = zero[:, :n_blocks].float()
            if s.zero_fraction is not None:
                zero = zero + s.zero_fraction.index_select(0, flat).float()
            rows = ((codes.float() - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(flat.shape[0], n_blocks * block)
            rows = rows[:, : s.in_features]
        out = rows.to(self.dtype).reshape(*input_ids.shape, self.embedding_dim)
        return out * self.embed_scale if self.embed_scale is not None else out


def _unpacked(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The ``bits``-bit values of uint8 bytes (little-endian in each byte), as int32 ``[..., bytes · 8 / bits]``.
    Not :func:`autoqra.quant.pack.unpack`: its uint8 shifts export as a ``BitShift`` that onnxruntime refuses
    to load (output typed int8; tried 2026-12-05), so the bytes are widened to int32 first."""
    if bits == 8:
        return packed.to(torch.int32)
    wide = packed.to(torch.int32)
    mask = (1 << bits) - 1
    parts = [(wide >> shift) & mask if shift else wide & mask for shift in range(0, 8, bits)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))

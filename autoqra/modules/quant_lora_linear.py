"""``QuantLoRALinear``: a packed-integer (or fp16) base weight plus a trainable LoRA adapter.

``y = x W_q^T + scaling * (dropout(x) A^T) B^T + bias`` where ``W_q`` is stored in the common
packed format of :mod:`autoqra.quant.base` (``qweight`` uint8 codes, fp16 ``scale`` / ``zero``
per group: registered buffers, so they are in the state dict), or as an fp16 ``weight`` buffer
at 16 bits. Only ``lora_A [r, in]`` and ``lora_B [out, r]`` are parameters that train; rank 0
means no adapter. The bias is kept as is (a frozen parameter).

Choices made here:

* **Bytes.** What the layer holds is what the one cost model (:mod:`autoqra.ir.cost`) counts:
  ``state_nbytes()`` equals ``CostModel(group_size=..., adapter_bytes=<adapter dtype size>)
  .layer_bytes(in, out, bits, rank)`` exactly (bias excluded), and so do the distinct tensor
  storages the layer holds after a forward and a backward (:func:`autoqra.footprint.held_bytes`),
  unless the user opted into ``kernel_cache=True`` (speed over memory, below). ``lora_A`` /
  ``lora_B`` live in ``adapter_dtype`` (default float32, the training dtype: 4 bytes a parameter).
* **Scaling.** ``alpha=None`` means ``scaling = 1.0`` (``alpha = rank``): layers get different
  ranks from the search, and a rank-independent scaling keeps ``B A`` meaning the same thing
  everywhere. An explicit ``alpha`` gives ``scaling = alpha / rank``. The LoftQ init divides
  ``B`` by ``scaling``, so ``W_q + scaling * B A`` absorbs the quantization error either way.
* **Init.** Quantized bases: LoftQ (:func:`autoqra.quant.loftq.loftq_init`, weighted by
  ``d`` / ``g`` when given). ``loftq_iters=0`` or 16 bits: plain quantization (or the fp16
  weight) with the standard LoRA init (Kaiming-uniform ``A``, zero ``B``).
* **Forward.** At 4 bits on CPU (torch's ``_weight_int4pack_mm_for_cpu`` present,
  ``out`` a multiple of the layout's block: 64 under AVX-512, 32 under AVX2, group size 32/64/128/256, uniform grid, ``fast_path=True``) ``qweight``
  *holds* its codes in the kernel's own layout (:mod:`autoqra.quant.int4_layout`, the same
  number of bytes as the packed form, which it replaces): the base product runs in torch's
  int4 kernel with the activations and the group scale/offset in bf16 (output within ~0.3%
  relative of the fp32 reference; the scale/offset pairs are derived per call, never kept) for
  fewer than ``KERNEL_MAX_ROWS`` (256) input rows: decoding and small batches; longer inputs
  (prefill, training, evaluation) take the chunked path below, which is faster there.
  ``state_dict()`` / save / export always see the packed form (``packed_qweight()``), and a
  move to another device converts back. On a CUDA GPU the same holds with torch's CUDA int4 layout
  (:mod:`autoqra.quant.int4_cuda`, tinygemm's ``_weight_int4pack_mm``; ``out % 8 == 0``) for fewer than
  ``CUDA_KERNEL_MAX_ROWS`` (256) rows. On either device ``kernel_cache=True`` keeps the bf16
  scale/offset pairs instead of deriving them per call (held and counted: +1/9 of a 4-bit base at group
  64). Under ``torch.autocast`` the base product runs in autocast's dtype. 2/3-bit codes fit the same kernel only as a second,
  4-bit copy: ``kernel_cache=True`` opts into that (speed over memory: the copy is held beside
  the packed codes and counted by ``held_bytes``). Otherwise (2/3/8 bits, code books, GPU,
  ``fast_path=False``) the weight is
  dequantized in row chunks of at most 16M elements (64 MB of float32: one chunk for every
  layer of a small model, a bounded transient for a large one), each multiplied at once, in the
  input's dtype. While tracing / exporting (``torch.jit``, ONNX, ``torch.export``) the forward is the
  plain ``F.linear(x, dequantized_weight())``. Under ``torch.compile`` too, except a grad-free product
  that eager mode would give the int4 kernel (a layout above, few rows: decoding), which keeps it as
  the opaque op :mod:`autoqra.quant.int4_op` (CUDA graphs can then replay a decoding step).
  Gradients reach the input on every path; the backward recomputes the dequantized rows chunk by
  chunk instead of saving the weight (a 16-bit base: its fp16 weight, cast again in the backward,
  not a cast copy; under ``torch.compile`` the product is checkpointed to the same effect).
* **Adapter product.** On an input of the adapters' dtype: ``addmm`` into the base output. On another dtype
  (a bf16 / fp16 model, fp32 adapters) or under autocast: ``_LoRAProduct``, in the adapters' dtype with the
  input saved as given (not an fp32 / autocast copy per layer) and cast again in the backward.
* **Merging.** :meth:`merge` folds ``scaling * B A`` into the base: at 16 bits by adding it
  (undone by :meth:`unmerge`); on a quantized base by re-quantizing ``W_q + scaling * B A``,
  which is lossy: it returns and logs the relative error it adds, and cannot be unmerged.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from autoqra.errors import ConfigError, MergeError, QuantizationError, UnsupportedLayerError
from autoqra.ir.cost import DENSE_BITS, PACKED_BITS, packed_nbytes
from autoqra.quant import int4_cuda, int4_layout, int4_op
from autoqra.quant.base import (
    QuantBackend,
    QuantizedWeight,
    QuantSpec,
    check_weight,
    dequantize_codes,
    get_backend,
    optional_import,
)
from autoqra.quant.loftq import input_importance, loftq_init
from autoqra.quant.memo import quantize_memo
from autoqra.quant.pack import pack, unpack

__all__ = ["QuantLoRALinear", "linear_weight"]

logger = logging.getLogger(__name__)

_INT4_GROUP_SIZES = (32, 64, 128, 256)
#: buffers whose dtype is part of the storage format (a module dtype cast must not touch them)
_FORMAT_BUFFERS = ("scale", "zero", "weight")
#: weight elements dequantized at a time on the chunked path (64 MB of float32). Measured on SmolLM2's
#: shapes (2 threads, 512 rows, forward + input gradient of all 210 layers): 1.47 s at 3 bits and
#: 1.30 s at 4 bits in one piece, against 2.21 s and 1.53 s in the cache-sized 1 MB chunks used
#: before (fp32 ``nn.Linear``: 0.91 s); one piece is as fast or faster at 1-128 rows as well
_CHUNK_ELEMENTS = 1 << 24
#: from this many input rows (tokens) on, the int4 kernel is slower than dequantizing chunks for the
#: float matmul (measured on SmolLM2's 576/1536 shapes, 1 thread: at 512 rows the kernel took 1.9-2.5x
#: the fp32 ``nn.Linear``, the chunks 1.2-1.8x; at 128 rows both ~2.2x; at 1-64 rows the kernel wins)
KERNEL_MAX_ROWS = 256
#: the same limit for torch's CUDA int4 kernel (tinygemm, built for few rows). Measured on an H200 (torch
#: 2.11, bf16 inputs, whole layer forward, two runs): the kernel beat dequantizing once for cuBLAS at 1-256
#: rows on 4096x4096 in both (0.36-0.44 vs 0.56-0.88 ms at 256); at 512 one run had it losing (0.67 vs
#: 0.57 ms), the other winning (0.68 vs 0.91 ms); on 1536x576 it won up to 512 in both
CUDA_KERNEL_MAX_ROWS = 256


def _exporting() -> bool:
    """Tracing for an exported graph (``torch.jit.trace``, ONNX, ``torch.export``): plain standard ops only."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)()
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or exporting


def _tracing() -> bool:
    """Exporting or ``torch.compile``-ing: plain differentiable ops (dequantize, then linear), except
    the grad-free int4 kernel product under ``torch.compile`` (:meth:`QuantLoRALinear._compiled_kernel`)."""
    return _exporting() or torch.compiler.is_compiling()


def _version_of(t: torch.Tensor) -> int:
    """A tensor's in-place version counter (-1 for inference tensors, which keep none)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _is_hf_conv1d(module: nn.Module) -> bool:
    pytorch_utils = optional_import("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None) if pytorch_utils is not None else None
    return conv1d is not None and isinstance(module, conv1d)


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [out, in], bias or None)`` of an ``nn.Linear`` or a Hugging Face ``Conv1D``
    (whose weight is stored ``[in, out]``)."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if _is_hf_conv1d(module):
        return module.weight.T, module.bias
    raise UnsupportedLayerError(
        f"QuantLoRALinear.from_linear expects nn.Linear or transformers Conv1D, got {type(module).__name__}"
    )


class _PackedLinear(torch.autograd.Function):
    """``x @ W_q^T`` from the packed base; the backward recomputes ``grad @ W_q`` chunk by chunk,
    so no dequantized weight is kept alive between forward and backward (the base never trains)."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, layer: QuantLoRALinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer._packed_mm(x2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return ctx.layer._packed_mm_t(grad), None


class _DenseProduct(torch.autograd.Function):
    """``x @ W^T`` from a 16-bit layer's fp16 ``weight`` in ``dtype`` (the input's, or autocast's), saving the
    fp16 buffer itself for the backward: the plain ``F.linear(x, weight.to(dtype))`` keeps the cast copy
    alive until the backward (an fp32 model: twice the layer's bytes, per 16-bit layer). The input is not
    saved (the base never trains); the backward casts the weight again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                dtype: torch.dtype) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(x.to(dtype), weight.to(dtype))
        ctx.save_for_backward(weight)
        ctx.input_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        with torch.autocast(grad.device.type, enabled=False):
            return (grad @ weight.to(grad.dtype)).to(ctx.input_dtype), None, None


class _LoRAProduct(torch.autograd.Function):
    """``scaling * (x Aᵀ) Bᵀ`` in the adapters' dtype for an input of another dtype (a bf16 / fp16 model, fp32
    adapters) or under autocast, saving the input *as given*: the plain ``x.to(A.dtype)`` (or autocast's cast
    to bf16) would keep a copy of every layer's input alive until the backward (q, k and v each their own),
    more than the bf16 activations themselves. The backward casts ``x`` again, one layer at a time. Products
    run outside autocast, in the adapters' dtype."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, a: torch.Tensor, b: torch.Tensor,  # type: ignore[override]
                scaling: float) -> torch.Tensor:
        with torch.autocast(x2.device.type, enabled=False):
            t = x2.to(a.dtype) @ a.T
            out = torch.mm(t, b.T).mul_(scaling)
        ctx.save_for_backward(x2, a, b, t)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x2, a, b, t = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.to(a.dtype) * ctx.scaling
            gt = g @ b
            grad_x = (gt @ a).to(x2.dtype) if ctx.needs_input_grad[0] else None
            grad_a = gt.T @ x2.to(a.dtype) if ctx.needs_input_grad[1] else None
            grad_b = g.T @ t if ctx.needs_input_grad[2] else None
        return grad_x, grad_a, grad_b, None


class QuantLoRALinear(nn.Module):
    """Quantized linear layer with a LoRA adapter (see the module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        group_size: int = 64,
        backend: str = "packed",
        bias: bool = True,
        *,
        adapter_dtype: torch.dtype = torch.float32,
        fast_path: bool = True,
        kernel_cache: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for label, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"QuantLoRALinear.{label} must be a positive int, got {value!r}")
        if bits not in PACKED_BITS and bits != DENSE_BITS:
            raise ConfigError(
                f"QuantLoRALinear.bits must be one of {PACKED_BITS + (DENSE_BITS,)}, got {bits!r}"
            )
        if not isinstance(rank, int) or not 0 <= rank <= min(in_features, out_features):
            raise ConfigError(
                f"QuantLoRALinear.rank must be an int in [0, {min(in_features, out_features)}], got {rank!r}"
            )
        if alpha is not None and not alpha > 0:
            raise ConfigError(f"QuantLoRALinear.alpha must be > 0 or None, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"QuantLoRALinear.dropout must lie in [0, 1), got {dropout!r}")
        if not adapter_dtype.is_floating_point:
            raise ConfigError(f"QuantLoRALinear.adapter_dtype must be floating point, got {adapter_dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.rank = rank
        self.alpha = alpha
        self.scaling = 1.0 if alpha is None or rank == 0 else float(alpha) / rank
        self.group_size = group_size
        self.backend_name = backend.name if isinstance(backend, QuantBackend) else str(backend)
        #: how ``qweight`` holds the codes: "packed" (autoqra's format), "int4_cpu" or "int4_cuda" (torch's
        #: int4 kernel layouts on the CPU and on CUDA GPUs, same bytes)
        self.layout = "packed"
        self._fast_path = fast_path
        self.kernel_cache = kernel_cache
        self.merged = False
        self._kernel_cache: tuple[tuple[int, ...], torch.Tensor, torch.Tensor] | None = None

        codebook = None
        if bits == DENSE_BITS:
            self.register_buffer(
                "weight", torch.zeros(out_features, in_features, dtype=torch.float16, device=device)
            )
        else:
            spec = QuantSpec(bits=bits, group_size=group_size)
            quantizer = get_backend(backend)
            support = quantizer.supports(in_features, out_features, spec)
            if not support.ok:
                raise UnsupportedLayerError(support.reason)
            n_groups = math.ceil(in_features / group_size)
            n_bytes = packed_nbytes(out_features * n_groups * group_size, bits)
            self.register_buffer("qweight", torch.zeros(n_bytes, dtype=torch.uint8, device=device))
            self.register_buffer(
                "scale", torch.zeros(out_features, n_groups, dtype=torch.float16, device=device)
            )
            self.register_buffer(
                "zero", torch.zeros(out_features, n_groups, dtype=torch.float16, device=device)
            )
            codebook = quantizer.codebook(bits)
        # a code book is a constant of the backend's format: kept with the module, not saved
        self.register_buffer("codebook", None if codebook is None else codebook.to(device), persistent=False)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        )
        if rank:
            self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=adapter_dtype, device=device))
            self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=adapter_dtype, device=device))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            self.lora_A = None
            self.lora_B = None
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._sync_layout()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        bits: int,
        rank: int,
        *,
        alpha: float | None = None,
        dropout: float = 0.0,
        d: torch.Tensor | None = None,
        g: torch.Tensor | None = None,
        loftq_iters: int = 2,
        backend: str | QuantBackend = "packed",
        group_size: int = 64,
        adapter_dtype: torch.dtype = torch.float32,
        fast_path: bool = True,
        kernel_cache: bool = False,
        name: str | None = None,
        hessian: torch.Tensor | None = None,
    ) -> QuantLoRALinear:
        """Build from an ``nn.Linear`` or HF ``Conv1D``; LoftQ-initialize the adapter (see the
        module docstring). ``d`` / ``g``: per-input-channel RMS of the inputs and
        per-output-channel RMS of the output gradient; a rank above ``min(in, out)`` is clamped.
        ``hessian``: the inputs' second-moment matrix ``[in, in]`` — error-compensating rounding
        (`autoqra.quant.gptq`) and the adapter fitted in the exact output-error norm."""
        weight, bias = linear_weight(linear)
        w = check_weight(weight, name)
        out_f, in_f = w.shape
        # statistics gathered elsewhere (calibration keeps them on the CPU) work on the weight's device
        d, g, hessian = (None if t is None else t.to(w.device) for t in (d, g, hessian))
        if not isinstance(rank, int) or rank < 0:
            raise ConfigError(f"rank must be an int >= 0, got {rank!r}")
        if rank > min(in_f, out_f):
            logger.warning(
                "layer %s: rank %d exceeds min(out, in) = %d; clamped", name or "?", rank, min(in_f, out_f)
            )
            rank = min(in_f, out_f)
        if not isinstance(loftq_iters, int) or loftq_iters < 0:
            raise ConfigError(f"loftq_iters must be an int >= 0, got {loftq_iters!r}")
        module = cls(
            in_f,
            out_f,
            bits,
            rank,
            alpha=alpha,
            dropout=dropout,
            group_size=group_size,
            backend=backend.name if isinstance(backend, QuantBackend) else backend,
            bias=bias is not None,
            adapter_dtype=adapter_dtype,
            fast_path=fast_path,
            kernel_cache=kernel_cache,
            device=w.device,
        )
        with torch.no_grad():
            if bias is not None:  # kept in the model's own dtype, as every untouched parameter
                module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
            if bits == DENSE_BITS:
                module.weight.copy_(w.to(torch.float16))
                return module
            spec = QuantSpec(bits=bits, group_size=group_size)
            if rank == 0 or loftq_iters == 0:
                quantizer = get_backend(backend)
                importance = input_importance(d, in_f, name)
                if hessian is not None:
                    from autoqra.quant.gptq import gptq_quantize

                    module.load_quantized(gptq_quantize(w, spec, hessian, name=name))
                else:
                    module.load_quantized(quantize_memo(quantizer, w, spec, importance=importance, name=name))
                return module
            qw, a, b = loftq_init(w, bits, rank, backend, spec, iters=loftq_iters, d=d, g=g, name=name,
                                  hessian=hessian)
            module.load_quantized(qw)
            module.lora_A.copy_(a.to(adapter_dtype))
            module.lora_B.copy_((b / module.scaling).to(adapter_dtype))
        return module

    def load_quantized(self, qw: QuantizedWeight) -> None:
        """Copy a :class:`QuantizedWeight` of this layer's shape / bits / group size into the buffers."""
        if self.bits == DENSE_BITS:
            raise ConfigError("a 16-bit QuantLoRALinear keeps an fp16 weight, not a quantized one")
        if (qw.shape, qw.bits, qw.group_size) != (
            (self.out_features, self.in_features),
            self.bits,
            self.group_size,
        ):
            raise QuantizationError(
                f"quantized weight {qw.shape} at {qw.bits} bits, group {qw.group_size} does not fit this layer "
                f"({self.out_features}, {self.in_features}) at {self.bits} bits, group {self.group_size}"
            )
        with torch.no_grad():
            self._buffers["qweight"] = qw.packed.detach().to(self.scale.device, torch.uint8).clone()
            self.layout = "packed"
            self.scale.copy_(qw.scale)
            self.zero.copy_(qw.zero)
        self._kernel_cache = None
        self._sync_layout()

    # -- storage layout -------------------------------------------------------------------------
    @property
    def fast_path(self) -> bool:
        """Use torch's int4 CPU kernel where it costs no memory (4 bits); setting it re-lays out ``qweight``."""
        return self._fast_path

    @fast_path.setter
    def fast_path(self, value: bool) -> None:
        self._fast_path = bool(value)
        if "scale" in self._buffers or "weight" in self._buffers:
            self._sync_layout()

    def _resident_layout(self, device: torch.device | None = None) -> str:
        """The layout the codes live in on ``device``: an int4 kernel's (4 bits, uniform grid, supported
        shape and group size; "int4_cpu" or "int4_cuda") or "packed"."""
        device = device if device is not None else self.scale.device
        if not (self.bits == 4 and self.fast_path and self.codebook is None and self.group_size in _INT4_GROUP_SIZES):
            return "packed"
        if (device.type == "cpu" and self.out_features % int4_layout.block_n() == 0
                and int4_layout.layout_matches_torch()):
            return "int4_cpu"
        k = self.scale.shape[1] * self.group_size
        if (device.type == "cuda" and self.out_features % int4_cuda.TILE_N == 0
                and int4_cuda.available(device, k)):
            return "int4_cuda"
        return "packed"

    def _sync_layout(self) -> None:
        """Put ``qweight`` in the layout the current device and settings call for (in place)."""
        if self.bits == DENSE_BITS:
            return
        want = self._resident_layout()
        if want == self.layout:
            return
        if self.qweight.device.type == "meta":  # no values to convert: just the packed shape
            k = self.scale.shape[1] * self.group_size
            self._buffers["qweight"] = torch.empty(packed_nbytes(self.out_features * k, self.bits),
                                                   dtype=torch.uint8, device="meta")
            self.layout = "packed"
            return
        codes = self._codes(0, self.out_features)
        with torch.no_grad():
            if want == "int4_cpu":
                self._buffers["qweight"] = int4_layout.encode(codes)
            elif want == "int4_cuda":
                self._buffers["qweight"] = int4_cuda.encode(codes)
            else:
                self._buffers["qweight"] = pack(codes, self.bits)
        self.layout = want
        self._kernel_cache = None

    def _codes(self, start: int, stop: int) -> torch.Tensor:
        """Codes of rows ``start:stop`` as ``uint8 [rows, padded in]`` (from either layout)."""
        k = self.scale.shape[1] * self.group_size
        if self.layout == "int4_cpu":
            block = int4_layout.block_n()
            lo, hi = start - start % block, -(-stop // block) * block
            return int4_layout.decode(self.qweight, lo, hi)[start - lo : stop - lo]
        if self.layout == "int4_cuda":
            tile = int4_cuda.TILE_N
            lo, hi = start - start % tile, -(-stop // tile) * tile
            return int4_cuda.decode(self.qweight, k, lo, hi)[start - lo : stop - lo]
        row_bytes = self.qweight.numel() // self.out_features
        return unpack(self.qweight[start * row_bytes : stop * row_bytes], self.bits, (stop - start) * k).view(
            stop - start, k
        )

    def packed_qweight(self) -> torch.Tensor:
        """The codes in autoqra's packed format (``qweight`` itself unless it holds the kernel layout)."""
        if self.bits == DENSE_BITS:
            raise ConfigError("a 16-bit QuantLoRALinear keeps an fp16 weight, not packed codes")
        if self.layout == "packed":
            return self.qweight
        return pack(self._codes(0, self.out_features), self.bits)

    def __getstate__(self) -> dict:
        """Pickling (``torch.save(model)``) stores the packed codes: a kernel layout belongs to the machine
        and device that made it (the CPU layout's block differs between AVX2 and AVX-512; the CUDA one is
        learned on a GPU), and `__setstate__` lays the codes out again for wherever they are loaded."""
        state = dict(self.__dict__)
        if self.bits != DENSE_BITS and self.layout != "packed":
            state["_buffers"] = {**self._buffers, "qweight": self.packed_qweight()}
            state["layout"] = "packed"
            state["_kernel_cache"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._sync_layout()

    def __deepcopy__(self, memo: dict) -> QuantLoRALinear:
        """A copy in the same process keeps the layout as it is (no packing and re-laying out)."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:  # type: ignore[no-untyped-def]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != "packed":  # the saved format is always the packed one
            destination[prefix + "qweight"] = self.packed_qweight()

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        """Device moves apply to every buffer, but a dtype cast (``model.to(torch.bfloat16)``)
        leaves the stored format alone: scales, zeros and the 16-bit weight stay fp16."""
        kept = {n: b for n, b in self._buffers.items() if n in _FORMAT_BUFFERS and b is not None}
        result = super()._apply(fn, recurse)
        for n, old in kept.items():
            new = self._buffers[n]
            if new is not None and new.dtype != old.dtype:
                self._buffers[n] = old.to(new.device)
        self._sync_layout()
        return result

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._kernel_cache = None  # new buffer contents: the kernel layout is rebuilt on next use
        if self.layout != "packed":  # state dicts hold the packed form: load into it, then re-lay out
            with torch.no_grad():
                self._buffers["qweight"] = self.packed_qweight()
            self.layout = "packed"
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_layout()

    # -- views ----------------------------------------------------------------------------------
    @property
    def spec(self) -> QuantSpec | None:
        return None if self.bits == DENSE_BITS else QuantSpec(bits=self.bits, group_size=self.group_size)

    def quantized_weight(self) -> QuantizedWeight:
        """The base as a :class:`QuantizedWeight` (sharing the buffers in the packed layout)."""
        if self.bits == DENSE_BITS:
            raise ConfigError("a 16-bit QuantLoRALinear has no quantized weight")
        return QuantizedWeight(
            packed=self.packed_qweight(),
            scale=self.scale,
            zero=self.zero,
            shape=(self.out_features, self.in_features),
            bits=self.bits,
            group_size=self.group_size,
            codebook=self.codebook,
            backend=self.backend_name,
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base weight ``[out, in]`` (adapter not included)."""
        if self.bits == DENSE_BITS:
            return self.weight.to(dtype)
        return dequantize_codes(
            self._codes(0, self.out_features),
            self.scale,
            self.zero,
            (self.out_features, self.in_features),
            self.group_size,
            self.codebook,
            dtype,
        )

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``ids`` (any integer shape, flattened) of the base weight, ``[n, in]``, read from the codes
        in whichever layout holds them — the lookup of a tied input embedding that shares this layer's
        weight (`autoqra.modules.tied_embedding`). A merged 16-bit layer gives its base rows (the
        adapter's delta taken out again)."""
        ids = ids.reshape(-1).to(device=self._device(), dtype=torch.long)
        if self.bits == DENSE_BITS:
            w = self.weight[ids].to(dtype)
            if self.merged and self.rank:
                w = w - (self.scaling * self.lora_B[ids].float() @ self.lora_A.float()).to(dtype)
            return w
        k = self.scale.shape[1] * self.group_size
        if self.layout == "int4_cpu":
            block = int4_layout.block_n()
            half = block // 2
            # a block of `block` rows is [K, block/2] bytes: row j's codes in the low nibbles of column j,
            # row j + block/2's in the high nibbles
            view = self.qweight.view(self.out_features // block, k, half)
            j = ids % block
            byte = view[ids // block, :, j % half]  # [n, K]
            codes = (byte >> (4 * (j >= half).to(torch.uint8)).unsqueeze(1)) & 15
        elif self.layout == "int4_cuda":
            # one decode of the row span the ids touch (a single tile for one decoded token; at most the whole
            # matrix for a training batch, a bounded transient on a GPU), then the rows picked from it
            lo, hi = (int(ids.min()), int(ids.max()) + 1) if len(ids) else (0, 0)
            codes = self._codes(lo, hi)[ids - lo] if len(ids) else torch.empty(0, k, dtype=torch.uint8,
                                                                              device=ids.device)
        else:
            row_bytes = self.qweight.numel() // self.out_features
            picked = self.qweight.view(self.out_features, row_bytes)[ids]
            codes = unpack(picked.reshape(-1), self.bits, len(ids) * k).view(len(ids), k)
        return dequantize_codes(codes, self.scale[ids], self.zero[ids], (len(ids), self.in_features),
                                self.group_size, self.codebook, dtype)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters: ``[lora_A, lora_B]`` (empty at rank 0)."""
        return [self.lora_A, self.lora_B] if self.rank else []

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` (float32 ``[out, in]``; zeros at rank 0)."""
        if not self.rank:
            return torch.zeros(self.out_features, self.in_features, device=self._device())
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def state_nbytes(self, adapter_bytes: int | None = None) -> int:
        """Bytes of base (codes + scales + zeros, or fp16 weight) + adapters at ``adapter_bytes``
        per parameter (default: the size of the dtype they are held in); equals
        ``CostModel.layer_bytes`` (bias excluded)."""
        if adapter_bytes is None:
            adapter_bytes = self.lora_A.element_size() if self.rank else 0
        if self.bits == DENSE_BITS:
            base = [self.weight]
        else:
            base = [self.qweight, self.scale, self.zero]
        return (
            sum(t.numel() * t.element_size() for t in base)
            + self.rank * (self.in_features + self.out_features) * adapter_bytes
        )

    def _device(self) -> torch.device:
        return (self.weight if self.bits == DENSE_BITS else self.qweight).device

    # -- forward --------------------------------------------------------------------------------
    def _kernel_eligible(self, x: torch.Tensor) -> bool:
        if self.layout == "int4_cuda":  # few rows: tinygemm; many: one dequantization and cuBLAS
            return 0 < x.shape[0] < CUDA_KERNEL_MAX_ROWS and x.dtype.is_floating_point
        if not 0 < x.shape[0] < KERNEL_MAX_ROWS:  # many rows: dequantized chunks + sgemm are faster
            return False
        if self.layout == "int4_cpu":
            return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        return (
            self.fast_path
            and self.kernel_cache
            and self.bits <= 4
            and self.codebook is None
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and self.out_features % 16 == 0
            and self.group_size in _INT4_GROUP_SIZES
            and int4_layout.kernel_available()
        )

    def _scale_offset(self) -> torch.Tensor:
        """The kernel's bf16 ``[groups, out, 2]`` (scale, offset) pairs. The kernel computes
        ``(c - 8) * s + o`` on 4-bit codes ``c``; our codes ``q`` are shifted by
        ``8 - 2**(bits-1)`` (``c = q + shift``) to center them on 8, so ``o = (2**(bits-1) - z) * s``
        is about the group's centre value: small, and its bf16 rounding costs little."""
        scale = self.scale.float()
        offset = (float(1 << (self.bits - 1)) - self.zero.float()) * scale
        return torch.stack([scale.T, offset.T], dim=-1).to(torch.bfloat16).contiguous()

    def _kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int4 kernel layout of the codes and bf16 (scale, offset): the held ``qweight`` itself
        at 4 bits (scale/offset derived per call, or kept with ``kernel_cache``), else a cached
        4-bit copy (``kernel_cache``)."""
        if self.layout in ("int4_cpu", "int4_cuda"):
            if not self.kernel_cache or torch.compiler.is_compiling():  # the cache's key is not traceable
                return self.qweight, self._scale_offset()
            key = tuple(v for t in (self.scale, self.zero) for v in (t.data_ptr(), _version_of(t)))
            if self._kernel_cache is None or self._kernel_cache[0] != key:
                self._kernel_cache = (key, self.qweight, self._scale_offset())
            return self.qweight, self._kernel_cache[2]
        key = tuple(v for t in (self.qweight, self.scale, self.zero) for v in (t.data_ptr(), _version_of(t)))
        if self._kernel_cache is not None and self._kernel_cache[0] == key:
            return self._kernel_cache[1], self._kernel_cache[2]
        n_groups = self.scale.shape[1]
        k = n_groups * self.group_size
        codes = unpack(self.qweight, self.bits, self.out_features * k).view(self.out_features, k)
        shift = 8 - (1 << (self.bits - 1))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32) + shift, 1)
        scale_offset = self._scale_offset()
        self._kernel_cache = (key, packed, scale_offset)
        return packed, scale_offset

    def _kernel_mm(self, x2: torch.Tensor) -> torch.Tensor:
        packed, scale_offset = self._kernel_weights()
        xb = x2.to(torch.bfloat16)
        pad = self.scale.shape[1] * self.group_size - self.in_features
        if pad:
            xb = F.pad(xb, (0, pad))
        # under torch.compile one opaque op for inductor; eager, the kernel itself (see autoqra.quant.int4_op)
        mm = int4_op.int4_mm if torch.compiler.is_compiling() else int4_op.product
        return mm(xb.contiguous(), packed, self.group_size, scale_offset).to(x2.dtype)

    def _row_chunks(self) -> range:
        rows = max(1, _CHUNK_ELEMENTS // (self.scale.shape[1] * self.group_size))
        if self.layout in ("int4_cpu", "int4_cuda"):  # whole layout blocks
            block = int4_layout.block_n() if self.layout == "int4_cpu" else int4_cuda.TILE_N
            rows = max(block, rows // block * block)
        return range(0, self.out_features, rows)

    def _dequantized_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``start:stop`` of the base weight (each packed row is a whole number of bytes,
        since the group size is a multiple of 8)."""
        return dequantize_codes(
            self._codes(start, stop),
            self.scale[start:stop],
            self.zero[start:stop],
            (stop - start, self.in_features),
            self.group_size,
            self.codebook,
            dtype,
        )

    def _packed_mm(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 [n, in] @ W_q^T`` without autograd: the int4 kernel, or dequantization in row
        chunks (a bounded transient; see ``_CHUNK_ELEMENTS``)."""
        if self._kernel_eligible(x2):
            return self._kernel_mm(x2)
        with torch.no_grad():
            out = x2.new_empty(x2.shape[0], self.out_features)
            step = self._row_chunks().step
            for start in self._row_chunks():
                stop = min(start + step, self.out_features)
                torch.matmul(x2, self._dequantized_rows(start, stop, x2.dtype).T, out=out[:, start:stop])
        return out

    def _packed_mm_t(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad [n, out] @ W_q`` (the input gradient), dequantizing in row chunks."""
        with torch.no_grad():
            chunks = self._row_chunks()
            if len(chunks) == 1:  # one piece: no zero-filled accumulator
                return grad @ self._dequantized_rows(0, self.out_features, grad.dtype)
            out = grad.new_zeros(grad.shape[0], self.in_features)
            step = chunks.step
            for start in chunks:
                stop = min(start + step, self.out_features)
                out.addmm_(grad[:, start:stop], self._dequantized_rows(start, stop, grad.dtype))
        return out

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if _tracing() and (self.bits == DENSE_BITS or not self._compiled_kernel(x2)):
            if torch.is_grad_enabled() and x.requires_grad and not _exporting():
                # torch.compile would save the dequantized (or cast) weight for the backward (a float copy
                # of the base per layer); checkpointed, the backward dequantizes again, as in eager mode
                return checkpoint(self._plain_product, x, use_reentrant=False)
            return self._plain_product(x)
        if self.bits == DENSE_BITS:
            device_type = x.device.type
            dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
            if dtype != self.weight.dtype and torch.is_grad_enabled() and x.requires_grad:
                return _DenseProduct.apply(x, self.weight, dtype)
            return F.linear(x, self.weight.to(x.dtype))
        device_type = x2.device.type
        if torch.is_autocast_enabled(device_type):  # the base product in autocast's dtype (bf16 / fp16)
            x2 = x2.to(torch.get_autocast_dtype(device_type))
            with torch.autocast(device_type, enabled=False):
                y2 = self._packed_product(x2)
        else:
            y2 = self._packed_product(x2)
        return y2.reshape(*x.shape[:-1], self.out_features)

    def _plain_product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_q^T`` in plain differentiable ops: the weight dequantized (or cast) whole, then a float matmul."""
        return F.linear(x, self.dequantized_weight(x.dtype))

    def _compiled_kernel(self, x2: torch.Tensor) -> bool:
        """Under ``torch.compile`` (not export): whether the int4 kernel computes the base product. It
        does where it would in eager mode and no gradient is asked for; the kernel then runs as the
        opaque op :func:`autoqra.quant.int4_op.int4_mm`, with the scale/offset pairs derived in the
        graph (inductor fuses that into one kernel)."""
        return (
            torch.compiler.is_compiling()
            and not _exporting()
            and self.layout in ("int4_cpu", "int4_cuda")
            and not (torch.is_grad_enabled() and x2.requires_grad)
            and self._kernel_eligible(x2)
        )

    def _packed_product(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 @ W_q^T``, differentiable in ``x2`` when it requires grad (the base never trains)."""
        if torch.is_grad_enabled() and x2.requires_grad:
            return _PackedLinear.apply(x2, self)
        return self._packed_mm(x2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base_forward(x)
        if self.rank and not self.merged:
            xd = self.lora_dropout(x)
            other = xd.dtype != self.lora_A.dtype or torch.is_autocast_enabled(xd.device.type)
            if other and torch.is_grad_enabled() and not _tracing():
                delta = _LoRAProduct.apply(xd.reshape(-1, self.in_features), self.lora_A, self.lora_B, self.scaling)
                return self._add_bias(y + delta.view(*y.shape[:-1], self.out_features).to(y.dtype))
            t = F.linear(xd.to(self.lora_A.dtype), self.lora_A)
            if t.dtype == y.dtype:  # one fused y + scaling * t Bᵀ (no product, scaling or sum tensors apart)
                y = torch.addmm(y.reshape(-1, self.out_features), t.reshape(-1, self.rank), self.lora_B.T,
                                alpha=self.scaling).view(y.shape)
            else:
                y = y + (F.linear(t, self.lora_B) * self.scaling).to(y.dtype)
        return self._add_bias(y)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    # -- merging --------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, importance: torch.Tensor | None = None) -> float:
        """Fold ``scaling * B A`` into the base; return the relative Frobenius error it adds,
        ``||W_merged - (W_base + scaling B A)|| / ||W_base + scaling B A||`` (also logged).
        ``importance`` (per input channel) weights the re-quantization of a quantized base."""
        if self.merged:
            logger.warning("QuantLoRALinear already merged; nothing to do")
            return 0.0
        if not self.rank:
            return 0.0
        target = self.dequantized_weight(torch.float32) + self.delta_weight()
        if self.bits == DENSE_BITS:
            self.weight.copy_(target.to(torch.float16))
            merged = self.weight.float()
        else:
            quantizer = get_backend(self.backend_name)
            self.load_quantized(quantizer.quantize(target, self.spec, importance=importance))
            merged = self.dequantized_weight(torch.float32)
        error = float((merged - target).norm() / target.norm().clamp_min(1e-30))
        self.merged = True
        logger.info(
            "merged adapter (bits=%d, rank=%d): relative weight error added %.3e", self.bits, self.rank, error
        )
        return error

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (16-bit bases only: a re-quantized base cannot be unmerged)."""
        if not self.merged:
            logger.warning("QuantLoRALinear is not merged; nothing to do")
            return
        if self.bits != DENSE_BITS:
            raise MergeError(
                f"cannot unmerge a {self.bits}-bit base: merging re-quantized it; "
                "keep a copy of the state dict before merge() to go back"
            )
        self.weight.copy_((self.weight.float() - self.delta_weight()).to(torch.float16))
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"rank={self.rank}, group_size={self.group_size}, backend={self.backend_name!r}, "
            f"scaling={self.scaling:g}, bias={self.bias is not None}, merged={self.merged}"
        )

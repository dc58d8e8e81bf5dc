"""Error-compensating rounding (GPTQ-style) for the ``packed`` format.

Plain rounding treats every weight on its own. With the layer's input second-moment matrix
``H = E[x xᵀ]`` (collected by the calibration pass), the output error of a quantized weight is
``tr(E H Eᵀ)`` for ``E = W − deq(Q)``; quantizing the columns one by one and spreading each
column's rounding error over the columns not yet quantized — weighted by the inverse Hessian's
Cholesky factor — minimizes it far better than rounding alone (the GPTQ algorithm, Frantar et al.
2022, re-derived here). Each group's fp16 (scale, zero) is fitted when the sweep enters the group,
on the already error-compensated weights, by the packed backend's MSE grid (importance = diag H).

The result is an ordinary `QuantizedWeight` of the packed format: storage, bytes and the forward
are unchanged; only the codes and scales are better.
"""

from __future__ import annotations

import math

import torch

from autoqra.errors import QuantizationError
from autoqra.quant.base import QuantizedWeight, QuantSpec, check_weight
from autoqra.quant.pack import pack
from autoqra.quant.packed import PackedBackend, fit_scale_zero, round_codes

#: columns updated together before the lazy trailing update (a multiple of every group size used)
BLOCK = 128


def damped_cholesky(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Lower Cholesky factor L of ``H + damp·mean(diag H)·I`` (float64): ‖E L‖² = tr(E H Eᵀ)."""
    h = h.double().clone()
    mean = float(torch.diagonal(h).mean()) or 1.0
    h.diagonal().add_(damp * mean)
    for attempt in range(6):
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            return chol
        h.diagonal().add_(damp * mean * (10**attempt))
    raise QuantizationError("the calibration Hessian is not positive definite even after dampening")


def prepare_hessian(h: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of H⁻¹, dead-column mask) after dampening ``H`` by ``damp·mean(diag)``."""
    h = h.double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    mean = float(torch.diagonal(h).mean())
    h.diagonal().add_(damp * mean)
    for attempt in range(6):
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        h.diagonal().add_(damp * mean * (10**attempt))
    else:
        raise QuantizationError("the calibration Hessian is not positive definite even after dampening")
    hinv = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(hinv, upper=True), dead


def gptq_quantize(
    weight: torch.Tensor,
    spec: QuantSpec,
    hessian: torch.Tensor,
    *,
    damp: float = 0.01,
    backend: PackedBackend | None = None,
    name: str | None = None,
) -> QuantizedWeight:
    """Quantize ``weight [out, in]`` with error compensation under ``hessian [in, in]``."""
    w = check_weight(weight, name).float().clone()
    out_f, in_f = w.shape
    if tuple(hessian.shape) != (in_f, in_f):
        raise QuantizationError(f"hessian for {name or 'layer'} must be [{in_f}, {in_f}], got {tuple(hessian.shape)}")
    backend = backend or PackedBackend()
    g = spec.group_size
    n_groups = math.ceil(in_f / g)
    pad = n_groups * g - in_f
    h = hessian.double()
    if pad:  # padding columns: zero weights, unit curvature, no coupling
        w = torch.nn.functional.pad(w, (0, pad))
        h = torch.nn.functional.pad(h, (0, pad, 0, pad))
        h[in_f:, in_f:] = torch.eye(pad, dtype=h.dtype)
    hinv_u, dead = prepare_hessian(h, damp)
    hinv_u = hinv_u.float()
    w[:, dead] = 0.0
    importance = torch.diagonal(h).float().clamp_min(0)
    qmax = (1 << spec.bits) - 1
    codes = torch.zeros(out_f, n_groups * g, dtype=torch.uint8)
    scales = torch.zeros(out_f, n_groups)
    zeros = torch.zeros(out_f, n_groups)
    cols = n_groups * g
    block = max(g, (BLOCK // g) * g)
    valid = torch.ones(1, 1, g, dtype=torch.bool)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        w1 = w[:, b0:b1].clone()
        err1 = torch.zeros_like(w1)
        hb = hinv_u[b0:b1, b0:b1]
        s = z = None
        for i in range(b1 - b0):
            col = b0 + i
            if col % g == 0:
                gi = col // g
                grp = w1[:, i : i + g].reshape(out_f, 1, g)
                imp = importance[col : col + g].reshape(1, 1, g)
                if col + g > in_f:  # the padded tail of the last group takes no part in the fit
                    valid = (torch.arange(g) + col < in_f).reshape(1, 1, g)
                s, z = fit_scale_zero(grp, imp * valid, spec.bits, method=backend.method, grid=backend.grid,
                                      min_shrink=backend.min_shrink, refit_iters=backend.refit_iters, valid=valid)
                s, z = s.reshape(out_f), z.reshape(out_f)
                scales[:, gi], zeros[:, gi] = s, z
            col_w = w1[:, i]
            q = round_codes(col_w.unsqueeze(-1), s, z, qmax).squeeze(-1)
            codes[:, col] = q.to(torch.uint8)
            deq = (q - z) * s
            e = (col_w - deq) / hb[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hb[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, b1:] -= err1 @ hinv_u[b0:b1, b1:]
    return QuantizedWeight(
        packed=pack(codes, spec.bits),
        scale=scales.to(torch.float16),
        zero=zeros.to(torch.float16),
        shape=(out_f, in_f),
        bits=spec.bits,
        group_size=g,
        backend="packed",
    )

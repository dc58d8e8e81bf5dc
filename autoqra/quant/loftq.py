"""LoftQ-style initialization: a quantized base plus a rank-r adapter that absorbs its error.

Alternates, ``iters`` times, starting from ``B A = 0``::

    Q      = quant(W - B A)                       # the backend, at this layer's own bits
    (B, A) = best rank-r factors of W - deq(Q)     # truncated SVD

so that ``deq(Q) + B A`` approximates ``W``. With calibration statistics the SVD is taken in
the norm the loss feels (see BENCHMARKS.md: 207 -> 54 ppl on SmolLM2 at uniform 3-bit r8):
``d`` = per-input-channel RMS of the layer's inputs, ``g`` = per-output-channel RMS of the loss
gradient w.r.t. its output; both are clamped below at ``1e-3 * mean``. Then::

    U S V^T = SVD_r(diag(g) (W - deq(Q)) diag(d))
    B = diag(1/g) U S^(1/2),    A = S^(1/2) V^T diag(1/d)

and the quantizer gets ``importance = d**2`` (it minimizes the same input-weighted error).
Small matrices use ``torch.linalg.svd``; when ``min(out, in) > 1024``, ``torch.svd_lowrank``
(seeded, so the result is deterministic).

The first iteration does not depend on the rank (the weight's own rounding and the eigen-decomposition
of its residual's Gram matrix; only how many of its directions are kept does). Inside
``with share_first_iteration():`` the last one is kept, so inits of one weight at the same bits and
several ranks built one after the other decompose it once (bit-identical factors: the same tensors
are sliced); the measured selection builds its candidates' layers sorted by (layer, bits, rank).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import replace
from typing import Any

import torch

from autoqra.errors import ConfigError, QuantizationError
from autoqra.quant.base import QuantBackend, QuantizedWeight, QuantSpec, check_weight, get_backend
from autoqra.quant.memo import active_memo, quantize_memo

__all__ = ["loftq_init", "lowrank_factors", "clamp_stat", "input_importance", "share_first_iteration"]

logger = logging.getLogger(__name__)

#: above this smallest dimension the randomized SVD is used
_EXACT_SVD_MAX_DIM = 1024


def clamp_stat(
    stat: torch.Tensor | None, length: int, what: str, name: str | None = None
) -> torch.Tensor | None:
    """Validate a per-channel statistic and clamp it below at ``1e-3 * mean`` (``None`` passes)."""
    if stat is None:
        return None
    where = f" for layer {name!r}" if name else ""
    s = stat.detach().to(torch.float32).reshape(-1)
    if s.numel() != length:
        raise QuantizationError(f"{what}{where} must have {length} entries, got {s.numel()}")
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise QuantizationError(f"{what}{where} must be finite and >= 0")
    mean = float(s.mean())
    if mean <= 0.0:
        logger.warning("%s%s is all zeros; using the unweighted init", what, where)
        return None
    return s.clamp_min(1e-3 * mean)


def input_importance(d: torch.Tensor | None, in_features: int, name: str | None = None) -> torch.Tensor | None:
    """The quantizer's per-input-channel importance from the input RMS ``d``: ``clamp_stat(d)**2`` in
    float32. The one definition shared by the sensitivity pass, LoftQ and rank-0 builds, so that they
    round a weight identically (and `autoqra.quant.memo` can answer one from another)."""
    d = clamp_stat(d, in_features, "d (input RMS)", name)
    return None if d is None else d * d


#: the last first-iteration decomposition inside `share_first_iteration` (None outside it)
_SHARED: ContextVar[list[Any] | None] = ContextVar("autoqra_loftq_first_iteration", default=None)


@contextlib.contextmanager
def share_first_iteration() -> Iterator[None]:
    """While entered, `loftq_init` reuses the previous call's first iteration when it is of the same
    weight (same tensor, unchanged), bits, backend and statistics (see the module docstring)."""
    token = _SHARED.set([])
    try:
        yield
    finally:
        _SHARED.reset(token)


def _gram_eigh(m: torch.Tensor) -> tuple[torch.Tensor, bool, torch.Tensor, torch.Tensor]:
    """``(m in float64, wide, eigenvalues, eigenvectors)`` of ``m``'s smaller Gram matrix, largest first."""
    m64 = m.double()
    wide = m64.shape[0] <= m64.shape[1]
    gram = m64 @ m64.T if wide else m64.T @ m64
    evals, evecs = torch.linalg.eigh(gram)
    return m64, wide, evals.flip(0), evecs.flip(1)


def _top_svd_gram(m: torch.Tensor, rank: int, decomposition: tuple | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of ``m`` from the eigen-decomposition of its smaller Gram
    matrix in float64 (several times faster than a full SVD for the tall/wide layers of LLMs; the
    top singular values are accurate to float32 precision); ``decomposition``: `_gram_eigh` (m) already made."""
    m64, wide, evals, evecs = decomposition if decomposition is not None else _gram_eigh(m)
    evals, evecs = evals[:rank].clamp_min(0.0), evecs[:, :rank]
    s = evals.sqrt()
    inv = torch.where(s > s.max() * 1e-12, 1.0 / s, torch.zeros_like(s)) if rank else s
    if wide:
        u = evecs
        vh = (m64.T @ u * inv).T
    else:
        vh = evecs.T
        u = m64 @ evecs * inv
    return u.to(m.dtype), s.to(m.dtype), vh.to(m.dtype)


def lowrank_factors(m: torch.Tensor, rank: int, decomposition: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B [out, r], A [r, in])`` with ``B A`` the best rank-r approximation of ``m``; the singular
    values are split evenly (``B = U S^1/2``, ``A = S^1/2 V^T``). ``decomposition``: `_gram_eigh` (m)."""
    if decomposition is not None:
        u, s, vh = _top_svd_gram(m, rank, decomposition)
    elif min(m.shape) > _EXACT_SVD_MAX_DIM:
        q = min(rank + 10, min(m.shape))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(m, q=q, niter=2)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].T
    else:
        u, s, vh = _top_svd_gram(m, rank)
    root = s.sqrt()
    return u * root, root.unsqueeze(1) * vh


def _same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
    return (x is None and y is None) or (x is not None and y is not None and x.shape == y.shape and torch.equal(x, y))


def _shared_first(shared: list[Any], weight: torch.Tensor, quantizer: QuantBackend, spec: QuantSpec,
                  d: torch.Tensor | None, g: torch.Tensor | None) -> tuple | None:
    """The kept first iteration ``(weight, Q, residual, decomposition)`` if it is of this weight (the same
    memory, not modified since), backend, spec and (clamped) statistics; else None."""
    if not shared:
        return None
    where, backend, spec0, d0, g0, first = shared[0]
    if where == _where(weight) and backend == repr(quantizer) and spec0 == spec and _same(d0, d) and _same(g0, g):
        return first
    return None


def _where(weight: torch.Tensor) -> tuple:
    """Which memory ``weight`` is (any view of it: the layer's ``weight.detach()`` differs per call) and
    its version counter (shared by views; it moves when the weight is modified in place). The kept entry
    holds the residual computed from it, which keeps the storage alive, so its address cannot be reused."""
    return (weight.untyped_storage().data_ptr(), weight.storage_offset(), tuple(weight.shape), weight.stride(),
            weight.dtype, weight.device, weight._version)


def loftq_init(
    weight: torch.Tensor,
    bits: int,
    rank: int,
    backend: str | QuantBackend = "packed",
    spec: QuantSpec | None = None,
    *,
    iters: int = 2,
    d: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
    name: str | None = None,
    hessian: torch.Tensor | None = None,
) -> tuple[QuantizedWeight, torch.Tensor, torch.Tensor]:
    """Quantize ``weight [out, in]`` and return ``(Q, A [r, in], B [out, r])`` with
    ``deq(Q) + B @ A ~= weight`` (float32 factors; see the module docstring).

    ``spec`` defaults to ``QuantSpec(bits=bits)`` (group size 64); when given, its bits must
    equal ``bits``. A rank above ``min(out, in)`` is clamped (logged warning).

    ``hessian`` (the inputs' second-moment matrix ``[in, in]``, packed backend only): quantize
    with error compensation (`autoqra.quant.gptq`) and take the SVD in the exact output-error
    norm ``diag(g)·R·L`` (``H = L Lᵀ``) instead of ``diag(g)·R·diag(d)``; ``A`` is unscaled by ``L⁻¹``.
    """
    if spec is None:
        spec = QuantSpec(bits=bits)
    elif spec.bits != bits:
        raise ConfigError(f"loftq_init: bits={bits} disagrees with spec.bits={spec.bits}")
    if not isinstance(iters, int) or iters < 1:
        raise ConfigError(f"loftq_init: iters must be an int >= 1, got {iters!r}")
    if not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"loftq_init: rank must be an int >= 0, got {rank!r}")
    quantizer = get_backend(backend)
    w = check_weight(weight, name)
    out_f, in_f = w.shape
    if rank > min(out_f, in_f):
        logger.warning(
            "layer %s: rank %d exceeds min(out, in) = %d; clamped", name or "?", rank, min(out_f, in_f)
        )
        rank = min(out_f, in_f)
    importance = input_importance(d, in_f, name)
    d = clamp_stat(d, in_f, "d (input RMS)", name)
    g = clamp_stat(g, out_f, "g (output-gradient RMS)", name)

    chol = None
    if hessian is not None:
        from autoqra.quant.gptq import damped_cholesky, gptq_quantize

        if quantizer.name != "packed":
            raise ConfigError(f"error-compensating rounding (hessian=...) needs the packed backend, not {quantizer.name!r}")
        chol = damped_cholesky(hessian).float()

        def quant(x: torch.Tensor) -> QuantizedWeight:
            return gptq_quantize(x, spec, hessian, backend=quantizer, name=name)
    else:

        def quant(x: torch.Tensor) -> QuantizedWeight:
            return quantizer.quantize(x, spec, importance=importance, name=name)

    memo = active_memo()
    init_key = None
    if memo is not None and memo.inits and chol is None and w.device.type == "cpu":
        init_key = memo.init_key(quantizer, spec, rank, iters, w, d, g)
        hit = memo.get(init_key)
        if hit is not None:
            return hit  # type: ignore[return-value]
    a = w.new_zeros(rank, in_f)
    b = w.new_zeros(out_f, rank)
    # the first iteration is shared inside `share_first_iteration`, for the exact-SVD path only (the randomized
    # one depends on the rank) and without error-compensating rounding
    shared = _SHARED.get() if chol is None and min(out_f, in_f) <= _EXACT_SVD_MAX_DIM else None
    first = _shared_first(shared, weight, quantizer, spec, d, g) if shared is not None else None
    if first is not None:  # a copy, as the memo gives: modules never share their packed tensors
        qw = replace(first[1], packed=first[1].packed.clone(), scale=first[1].scale.clone(),
                     zero=first[1].zero.clone())
    else:  # the first rounding is of the weight itself: the sensitivity pass (or another candidate) may have done it
        qw = quant(w) if chol is not None else quantize_memo(quantizer, w, spec, importance=importance, name=name)
    for step in range(iters):
        if step:
            qw = quant(w - b @ a)
        if rank == 0:
            break
        if step == 0 and first is not None:
            residual, decomposition = first[2], first[3]
        else:
            residual = w - quantizer.dequantize(qw).to(w.device)
            if g is not None:
                residual = residual * g.unsqueeze(1)
            if chol is not None:
                residual = residual @ chol
            elif d is not None:
                residual = residual * d.unsqueeze(0)
            decomposition = None
            if step == 0 and shared is not None:
                decomposition = _gram_eigh(residual)
                shared[:] = [(_where(weight), repr(quantizer), spec, d, g, (weight, qw, residual, decomposition))]
        b, a = lowrank_factors(residual, rank, decomposition)
        if g is not None:
            b = b / g.unsqueeze(1)
        if chol is not None:
            a = torch.linalg.solve_triangular(chol, a, upper=False, left=False)
        elif d is not None:
            a = a / d.unsqueeze(0)
    result = (qw, a.contiguous(), b.contiguous())
    if init_key is not None:
        memo.put(init_key, result)
    return result

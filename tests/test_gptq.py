"""Error-compensating rounding: lower output error than rounding alone; LoftQ in the H-norm."""

from __future__ import annotations

import pytest
import torch

from autoqra.errors import ConfigError
from autoqra.quant.base import QuantSpec, get_backend
from autoqra.quant.gptq import damped_cholesky, gptq_quantize
from autoqra.quant.loftq import loftq_init


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = torch.randn(3000, 100) @ torch.randn(100, 100) * 0.3 + torch.randn(3000, 100)
    x[:, 5] *= 10
    h = x.T @ x / x.shape[0]
    w = torch.randn(48, 100)
    return w, h


def out_err(e: torch.Tensor, h: torch.Tensor) -> float:
    return float(torch.trace(e @ h @ e.T))


@pytest.mark.parametrize(("bits", "max_ratio"), [(2, 0.85), (3, 0.85), (4, 0.85)])
def test_gptq_beats_weighted_rounding(problem, bits, max_ratio):
    w, h = problem
    backend = get_backend("packed")
    spec = QuantSpec(bits=bits, group_size=64)  # in=100: the second group is padded
    rtn = w - backend.dequantize(backend.quantize(w, spec, importance=torch.diagonal(h)))
    qw = gptq_quantize(w, spec, h)
    gptq = w - backend.dequantize(qw)
    assert out_err(gptq, h) < max_ratio * out_err(rtn, h)
    assert qw.packed.numel() * 8 >= 48 * 128 * bits  # same storage format, padding included


def test_gptq_rejects_wrong_hessian(problem):
    w, _ = problem
    with pytest.raises(Exception, match="hessian"):
        gptq_quantize(w, QuantSpec(bits=4), torch.eye(7))


def test_damped_cholesky_reproduces_norm(problem):
    w, h = problem
    chol = damped_cholesky(h, damp=0.0).float()
    e = torch.randn_like(w)
    assert float((e @ chol).pow(2).sum()) == pytest.approx(out_err(e, h), rel=1e-4)


@pytest.mark.parametrize("bits", [2, 3])
def test_loftq_with_hessian_error_falls_with_rank(problem, bits):
    w, h = problem
    errors = []
    for rank in (0, 4, 16):
        qw, a, b = loftq_init(w, bits, rank, "packed", QuantSpec(bits=bits), hessian=h)
        approx = get_backend("packed").dequantize(qw) + b @ a
        errors.append(out_err(w - approx, h))
    assert errors[0] > errors[1] > errors[2]


def test_hessian_needs_packed_backend(problem):
    w, h = problem
    with pytest.raises(ConfigError, match="packed"):
        loftq_init(w, 4, 4, "hqq", QuantSpec(bits=4), hessian=h)

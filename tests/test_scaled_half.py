"""ScaledHalf: float16 codes × one scale hold the calibration's weight-gradient sums at half the bytes."""

from __future__ import annotations

import math

import pytest
import torch

from autoqra.scaled_half import ScaledHalf


def _parts(magnitudes: list[float], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(48, 40, generator=gen) * m for m in magnitudes]


@pytest.mark.parametrize(
    "magnitudes",
    [
        [1.0] * 8,  # a plain sum
        [1e-3, 1.0, 1e3, 1e6],  # growing past float16's range: rescaled, never inf
        [1e6, 1e-2, 1e-2],  # small additions to a large sum: lost only below its precision
        [1e-9, 1e-9, 1e-9],  # below float16's smallest normal: kept by the scale
        [5.0, -5.0],  # cancellation
    ],
)
def test_sum_matches_float32_to_half_precision(magnitudes: list[float]) -> None:
    parts = _parts(magnitudes)
    acc = ScaledHalf(parts[0].shape)
    exact = torch.zeros_like(parts[0], dtype=torch.float64)
    largest = 0.0  # the largest element any partial sum (or addend) had
    for i, p in enumerate(parts, 1):
        acc.add_(p)
        exact += p.double()
        largest = max(largest, float(exact.abs().max()), float(p.abs().max()))
        # each add (and each rescale) rounds every element once, to 11 significant bits of at most that size
        assert torch.isfinite(acc.codes).all()
        assert float((acc.float().double() - exact).abs().max()) <= 2 * i * 2**-11 * largest
    assert acc.nbytes == parts[0].numel() * 2


def test_precision_beats_bfloat16_on_a_running_sum() -> None:
    parts = _parts([1.0] * 16, seed=1)
    acc, bf = ScaledHalf(parts[0].shape), torch.zeros_like(parts[0], dtype=torch.bfloat16)
    exact = sum(p.double() for p in parts)
    for p in parts:
        acc.add_(p)
        bf += p.to(torch.bfloat16)
    err_half = float((acc.float().double() - exact).norm() / exact.norm())
    err_bf16 = float((bf.double() - exact).norm() / exact.norm())
    assert err_half < err_bf16 / 4


def test_zero_nan_shape_and_determinism() -> None:
    acc = ScaledHalf((3, 4))
    acc.add_(torch.zeros(3, 4))
    assert acc.scale == 0.0 and torch.equal(acc.float(), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="shape"):
        acc.add_(torch.ones(4, 3))
    bad = torch.ones(3, 4)
    bad[1, 2] = math.nan
    acc.add_(bad).add_(torch.ones(3, 4) * 1e5)
    assert torch.isnan(acc.float()[1, 2]) and torch.isfinite(acc.float()[0]).all()  # NaN stays visible
    a, b = ScaledHalf((48, 40)), ScaledHalf((48, 40))
    for p in _parts([1.0, 1e3, 2.0], seed=3):
        a.add_(p)
        b.add_(p.clone())
    assert torch.equal(a.codes, b.codes) and a.scale == b.scale
    assert a.to("cpu") is a
    same = ScaledHalf.from_float(a.float())
    torch.testing.assert_close(same.float(), a.float(), rtol=1e-3, atol=1e-3 * float(a.float().abs().max()))

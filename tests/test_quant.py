"""Bit-packing, the packed backend's rounding quality, and the backend registry."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoqra.errors import ConfigError, MissingDependencyError, QuantizationError, UnknownNameError
from autoqra.ir.cost import CostModel, packed_nbytes
from autoqra.quant.base import QuantSpec, available_backends, get_backend
from autoqra.quant.pack import pack, unpack
from autoqra.quant.packed import PackedBackend

BITS = (2, 3, 4, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return 10 * math.log10(float(w.pow(2).sum() / (w - w_hat).pow(2).sum()))


def gaussian(out_f: int = 128, in_f: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


def heavy_tailed(out_f: int = 128, in_f: int = 256, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g) / torch.rand(out_f, in_f, generator=g).clamp_min(0.05).sqrt()


# -- packing -------------------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(bits=st.sampled_from(BITS), n=st.integers(0, 3000), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits: int, n: int, seed: int) -> None:
    q = torch.randint(0, 1 << bits, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = pack(q, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(n, bits)
    assert torch.equal(unpack(packed, bits, n), q)


@pytest.mark.parametrize("bits", BITS)
def test_pack_accepts_any_shape_and_integer_dtype(bits: int) -> None:
    q = torch.randint(0, 1 << bits, (7, 24), dtype=torch.int64)
    assert torch.equal(unpack(pack(q, bits), bits, q.numel()), q.reshape(-1).to(torch.uint8))


def test_three_bit_layout_is_a_little_endian_24_bit_word() -> None:
    q = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    b = pack(q, 3).tolist()
    word = b[0] | b[1] << 8 | b[2] << 16
    assert [(word >> (3 * j)) & 7 for j in range(8)] == q.tolist()


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ConfigError):
        pack(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ConfigError):
        pack(torch.tensor([0.0]), 4)
    with pytest.raises(ConfigError):
        pack(torch.tensor([0], dtype=torch.uint8), 5)
    with pytest.raises(ConfigError):
        unpack(torch.zeros(2, dtype=torch.uint8), 4, 5)


# -- rounding quality ------------------------------------------------------------------------------
#: measured SQNR of the default (mse) rounding on gaussian(128x256), group 64: 2-bit 9.8 dB,
#: 3-bit 15.5, 4-bit 21.6, 8-bit 45.8 (min/max: 6.9 / 14.3 / 20.9 / 45.6). Thresholds sit below.
SQNR_MIN_DB = {2: 9.3, 3: 15.0, 4: 21.0, 8: 45.0}


@pytest.mark.parametrize("bits", BITS)
def test_sqnr_thresholds(bits: int) -> None:
    w = gaussian()
    qw = get_backend("packed").quantize(w, QuantSpec(bits=bits))
    assert sqnr_db(w, qw.dequantize()) > SQNR_MIN_DB[bits]


@pytest.mark.parametrize("method", ["mse", "minmax"])
def test_error_decreases_with_bits(method: str) -> None:
    w = heavy_tailed()
    backend = PackedBackend(method=method)
    errors = [float((w - backend.quantize(w, QuantSpec(bits=b)).dequantize()).norm()) for b in BITS]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 50


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("make", [gaussian, heavy_tailed])
def test_mse_grid_beats_minmax(bits: int, make) -> None:
    w = make()
    spec = QuantSpec(bits=bits)
    err_mse = float((w - PackedBackend().quantize(w, spec).dequantize()).pow(2).sum())
    err_minmax = float((w - PackedBackend(method="minmax").quantize(w, spec).dequantize()).pow(2).sum())
    assert err_mse < 0.97 * err_minmax


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_importance_lowers_the_weighted_error(bits: int) -> None:
    w = heavy_tailed()
    importance = torch.linspace(0.01, 1.0, w.shape[1]) ** 4
    spec = QuantSpec(bits=bits)

    def weighted(qw) -> float:
        return float(((w - qw.dequantize()).pow(2) * importance).sum())

    backend = PackedBackend()
    assert weighted(backend.quantize(w, spec, importance=importance)) < weighted(backend.quantize(w, spec))


@pytest.mark.parametrize("method", ["mse", "minmax"])
@pytest.mark.parametrize("bits", BITS)
def test_constant_groups_are_exact_and_finite(method: str, bits: int) -> None:
    w = torch.zeros(4, 128)
    w[1] = 0.37
    w[2] = -2.5
    w[3, :64] = 1e-9
    qw = PackedBackend(method=method).quantize(w, QuantSpec(bits=bits))
    w_hat = qw.dequantize()
    assert torch.isfinite(qw.scale).all() and torch.isfinite(qw.zero).all()
    assert torch.isfinite(w_hat).all()
    torch.testing.assert_close(w_hat, w, atol=2e-3 * 2.5, rtol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_raises_typed_error_naming_the_layer(bad: float) -> None:
    w = gaussian(8, 64)
    w[3, 5] = bad
    with pytest.raises(QuantizationError, match="model.layers.0.q_proj"):
        get_backend("packed").quantize(w, QuantSpec(bits=4), name="model.layers.0.q_proj")


def test_huge_weight_raises_typed_error() -> None:
    w = torch.full((2, 64), 1e9)
    w[:, 0] = -1e9
    with pytest.raises(QuantizationError, match="fp16"):
        get_backend("packed").quantize(w, QuantSpec(bits=4))


def test_bad_importance_raises_typed_error() -> None:
    with pytest.raises(QuantizationError):
        get_backend("packed").quantize(gaussian(8, 64), QuantSpec(bits=4), importance=torch.ones(63))
    with pytest.raises(QuantizationError):
        get_backend("packed").quantize(gaussian(8, 64), QuantSpec(bits=4), importance=-torch.ones(64))


@pytest.mark.parametrize("bits", BITS)
def test_in_features_not_divisible_by_group_size(bits: int) -> None:
    w = gaussian(24, 100)
    qw = get_backend("packed").quantize(w, QuantSpec(bits=bits, group_size=64))
    w_hat = qw.dequantize()
    assert w_hat.shape == (24, 100) and torch.isfinite(w_hat).all()
    cost = CostModel(group_size=64)
    assert qw.packed.numel() == cost.weight_bytes(100, 24, bits)
    assert qw.nbytes == cost.weight_bytes(100, 24, bits) + cost.metadata_bytes(100, 24, bits)
    assert sqnr_db(w, w_hat) > SQNR_MIN_DB[bits] - 1.5


@settings(max_examples=25, deadline=None)
@given(
    out_f=st.integers(1, 12),
    in_f=st.integers(1, 150),
    bits=st.sampled_from(BITS),
    group_size=st.sampled_from([8, 32, 64]),
)
def test_real_bytes_match_the_cost_model(out_f: int, in_f: int, bits: int, group_size: int) -> None:
    w = gaussian(out_f, in_f)
    qw = PackedBackend(method="minmax").quantize(w, QuantSpec(bits=bits, group_size=group_size))
    cost = CostModel(group_size=group_size)
    assert qw.nbytes == cost.weight_bytes(in_f, out_f, bits) + cost.metadata_bytes(in_f, out_f, bits)
    assert qw.dequantize().shape == (out_f, in_f)


def test_quantize_is_deterministic() -> None:
    w = heavy_tailed()
    a = get_backend("packed").quantize(w, QuantSpec(bits=3))
    b = get_backend("packed").quantize(w, QuantSpec(bits=3))
    assert torch.equal(a.packed, b.packed) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)


# -- specs and registry ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs", [{"bits": 5}, {"bits": 16}, {"bits": 4, "group_size": 60}, {"bits": 4, "group_size": 0}]
)
def test_quant_spec_validation(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        QuantSpec(**kwargs)


def test_unknown_backend_lists_available_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        get_backend("gptq-magic")
    for name in ("packed", "hqq", "bnb"):
        assert name in str(info.value)
    assert {"packed", "hqq", "bnb"} <= set(available_backends())


def test_bad_backend_options_raise_config_error() -> None:
    with pytest.raises(ConfigError):
        get_backend("packed", method="bogus")
    with pytest.raises(ConfigError):
        get_backend("packed", no_such_option=1)


def test_unsupported_bits_are_reported() -> None:
    support = get_backend("bnb").supports(64, 64, QuantSpec(bits=3))
    assert not support.ok and "bits" in support.reason


def test_missing_optional_package_names_the_pip_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = get_backend("hqq")
    monkeypatch.setattr(type(backend), "is_available", classmethod(lambda cls: False))
    support = backend.supports(64, 64, QuantSpec(bits=4))
    assert not support.ok and "pip install autoqra[hqq]" in support.reason
    with pytest.raises(MissingDependencyError, match=r"pip install autoqra\[hqq\]"):
        backend.quantize(gaussian(8, 64), QuantSpec(bits=4))


def _fit_one_by_one(w, h, bits, *, grid=20, min_shrink=0.4, refit_iters=2, valid=None):  # noqa: ANN001, ANN202
    """The MSE fit with every candidate tried one at a time (the reference the stacked fit must equal)."""
    from autoqra.quant.packed import _GroupStats, _minmax_params, _to_fp16_grid, round_codes

    qmax = (1 << bits) - 1
    if valid is None:
        lo, hi = w.amin(-1), w.amax(-1)
    else:
        big = torch.finfo(w.dtype).max
        lo, hi = torch.where(valid, w, big).amin(-1), torch.where(valid, w, -big).amax(-1)
    best_s, best_z = _to_fp16_grid(*_minmax_params(lo, hi, qmax))[:2]
    best_err = torch.full(w.shape[:-1], math.inf, dtype=torch.float64)
    stats = _GroupStats(w, h)

    def consider(s, z, sums):  # noqa: ANN001, ANN202
        nonlocal best_s, best_z, best_err
        s16, z16, ok = _to_fp16_grid(s, z)
        err = stats.error(sums, s16, -s16 * z16)
        better = ok & (err < best_err)
        best_err, best_s, best_z = (torch.where(better, err, best_err), torch.where(better, s16, best_s),
                                    torch.where(better, z16, best_z))

    for shrink in torch.linspace(1.0, min_shrink, grid).tolist():
        s16, z16 = _to_fp16_grid(*_minmax_params(lo * shrink, hi * shrink, qmax))[:2]
        sums = stats.code_sums(round_codes(w, s16, z16, qmax))
        consider(s16, z16, sums)
        consider(*stats.refit(sums), sums)
    for _ in range(refit_iters):
        sums = stats.code_sums(round_codes(w, best_s, best_z, qmax))
        consider(best_s, best_z, sums)
        consider(*stats.refit(sums), sums)
    return best_s, best_z


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(
    "case", ["plain", "weighted", "zero and constant groups", "outliers", "padding", "ties", "tiny"]
)
def test_stacked_mse_fit_equals_trying_candidates_one_by_one(bits, case) -> None:
    from autoqra.quant.packed import fit_scale_zero

    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(7, 5, 64, generator=gen)
    h = valid = None
    if case == "weighted":
        h = torch.rand(1, 5, 64, generator=gen) ** 3
    elif case == "zero and constant groups":
        w[0, 0] = 0.0
        w[1, 2] = 0.25
    elif case == "outliers":
        w[:, 1, :3] *= 1e3
    elif case == "padding":
        valid = torch.ones(1, 5, 64, dtype=torch.bool)
        valid[..., -9:] = False
        w = w * valid
        h = valid.float()
    elif case == "ties":  # codes that fit several shrinks exactly: equal errors, the first must win
        w = torch.randint(0, 4, (7, 5, 64), generator=gen).float() * 0.5
    elif case == "tiny":
        w = w * 1e-6
    got = fit_scale_zero(w, h, bits, valid=valid)
    want = _fit_one_by_one(w, h, bits, valid=valid)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_shared_first_iteration_gives_bit_identical_inits(monkeypatch) -> None:
    """Inside `share_first_iteration` consecutive inits of one weight reuse its first rounding and
    decomposition: every (bits, rank, iters) gives exactly what a fresh init gives; another weight, other
    statistics or an in-place change to the weight are never answered from the kept one."""
    from autoqra.quant import loftq
    from autoqra.quant.loftq import loftq_init, share_first_iteration

    calls = {"n": 0}
    real = loftq._gram_eigh

    def counted(m):  # noqa: ANN001, ANN202
        calls["n"] += 1
        return real(m)

    monkeypatch.setattr(loftq, "_gram_eigh", counted)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=gen)
    d = torch.rand(96, generator=gen) + 0.1
    g = torch.rand(48, generator=gen) + 0.1
    cases = [(3, 0, 2), (3, 4, 2), (3, 8, 2), (3, 8, 1), (2, 4, 2), (2, 16, 1)]
    fresh = [loftq_init(w, b, r, iters=i, d=d, g=g) for b, r, i in cases]
    fresh_calls, calls["n"] = calls["n"], 0
    with share_first_iteration():
        shared = [loftq_init(w.detach(), b, r, iters=i, d=d, g=g) for b, r, i in cases]
        assert calls["n"] == fresh_calls - 3  # 3-bit: ranks 8, 8 reuse rank 4's; 2-bit: rank 16 reuses rank 4's
        first = shared[3][0]  # iters=1: the kept first rounding itself, copied out
        again = loftq_init(w, 3, 8, iters=1, d=d, g=g)[0]
        assert again.packed.data_ptr() != first.packed.data_ptr()
        other_stats = loftq_init(w, 2, 16, iters=1, d=d * 2, g=g)
        assert not torch.equal(other_stats[1], shared[-1][1])
        w.add_(0.5)  # modified in place: the kept iteration is stale
        moved = loftq_init(w, 2, 16, iters=1, d=d, g=g)
        assert not torch.equal(moved[0].packed, shared[-1][0].packed) or not torch.equal(moved[1], shared[-1][1])
    for (qa, aa, ba), (qb, ab, bb) in zip(fresh, shared, strict=True):
        assert torch.equal(qa.packed, qb.packed) and torch.equal(qa.scale, qb.scale) and torch.equal(qa.zero, qb.zero)
        assert torch.equal(aa, ab) and torch.equal(ba, bb)

"""LoftQ init, QuantLoRALinear (bytes, gradients, fast paths, merging), and the backend contract."""

from __future__ import annotations

import logging

import pytest
import torch
from layer_checks import check_bf16_autocast
from torch import nn

from autoqra.errors import ConfigError, MergeError, QuantizationError, UnsupportedLayerError
from autoqra.ir.cost import CostModel
from autoqra.modules.quant_lora_linear import KERNEL_MAX_ROWS, QuantLoRALinear
from autoqra.quant.base import QuantSpec, available_backends, get_backend
from autoqra.quant.loftq import loftq_init

pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def problem() -> dict[str, torch.Tensor]:
    """A 96x160 layer with a structured weight and calibration inputs of uneven channel scales."""
    g = _gen(0)
    out_f, in_f = 96, 160
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w += 0.02 * torch.randn(out_f, 4, generator=g) @ torch.randn(4, in_f, generator=g)
    x = torch.randn(512, in_f, generator=g) * torch.logspace(-1, 0.7, in_f)
    d = x.pow(2).mean(0).sqrt()
    grad_rms = torch.logspace(-1, 0.5, out_f)[torch.randperm(out_f, generator=g)]
    return {"w": w, "x": x, "d": d, "g": grad_rms}


def _two_sided_error(p: dict[str, torch.Tensor], w_hat: torch.Tensor) -> float:
    return float((p["g"][:, None] * (p["w"] - w_hat) * p["d"][None, :]).norm())


def _output_error(p: dict[str, torch.Tensor], w_hat: torch.Tensor) -> float:
    y = p["x"] @ p["w"].T
    return float((p["x"] @ w_hat.T - y).norm() / y.norm())


# -- LoftQ ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_loftq_error_falls_with_rank_unweighted(problem, bits: int) -> None:
    errors = []
    for rank in (0, 4, 16):
        qw, a, b = loftq_init(problem["w"], bits, rank)
        assert a.shape == (rank, 160) and b.shape == (96, rank)
        errors.append(float((problem["w"] - qw.dequantize() - b @ a).norm()))
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_loftq_weighted_error_falls_with_rank_and_beats_unweighted(problem, bits: int) -> None:
    weighted = []
    for rank in (0, 4, 16):
        qw, a, b = loftq_init(problem["w"], bits, rank, d=problem["d"], g=problem["g"])
        weighted.append(_two_sided_error(problem, qw.dequantize() + b @ a))
    assert weighted[0] > weighted[1] > weighted[2]
    qw, a, b = loftq_init(problem["w"], bits, 16)
    assert weighted[2] < _two_sided_error(problem, qw.dequantize() + b @ a)


def test_loftq_activation_weighted_lowers_output_error(problem) -> None:
    qw, a, b = loftq_init(problem["w"], 3, 8, d=problem["d"])
    weighted = _output_error(problem, qw.dequantize() + b @ a)
    qw, a, b = loftq_init(problem["w"], 3, 8)
    assert weighted < _output_error(problem, qw.dequantize() + b @ a)


def test_loftq_clamps_rank_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    w = torch.randn(8, 64, generator=_gen(1))
    with caplog.at_level(logging.WARNING):
        _, a, b = loftq_init(w, 4, 32, name="tiny")
    assert a.shape == (8, 64) and b.shape == (8, 8)
    assert "clamped" in caplog.text and "tiny" in caplog.text


def test_loftq_uses_randomized_svd_for_big_layers() -> None:
    w = torch.randn(1100, 1040, generator=_gen(2)) * 0.02
    qw, a, b = loftq_init(w, 2, 4, iters=1, backend=get_backend("packed", method="minmax"))
    residual = w - qw.dequantize()
    assert float((residual - b @ a).norm()) < float(residual.norm())


def test_loftq_validates_inputs() -> None:
    w = torch.randn(16, 64, generator=_gen(3))
    with pytest.raises(ConfigError):
        loftq_init(w, 4, 2, spec=QuantSpec(bits=3))
    with pytest.raises(ConfigError):
        loftq_init(w, 4, 2, iters=0)
    with pytest.raises(QuantizationError):
        loftq_init(w, 4, 2, d=torch.ones(63))


# -- QuantLoRALinear -----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("weighted", [False, True])
def test_module_output_error_falls_with_rank(problem, bits: int, weighted: bool) -> None:
    lin = nn.Linear(160, 96)
    with torch.no_grad():
        lin.weight.copy_(problem["w"])
    y = lin(problem["x"]).detach()
    stats = {"d": problem["d"], "g": problem["g"]} if weighted else {}
    errors = []
    for rank in (0, 4, 16):
        m = QuantLoRALinear.from_linear(lin, bits, rank, **stats)
        with torch.no_grad():
            errors.append(float((m(problem["x"]) - y).norm() / y.norm()))
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_only_adapters_train_and_input_gradient_is_right(bits: int) -> None:
    lin = nn.Linear(64, 32)
    m = QuantLoRALinear.from_linear(lin, bits, 4, alpha=8.0)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert m.adapter_parameters() == [m.lora_A, m.lora_B]
    x = torch.randn(5, 64, requires_grad=True)
    m(x).square().sum().backward()
    assert m.lora_A.grad is not None and m.lora_B.grad is not None
    assert m.bias.grad is None
    for buf in m.buffers():
        assert buf.grad is None and not buf.requires_grad
    # reference input gradient through the dense effective weight
    w_eff = (m.dequantized_weight() + m.delta_weight()).detach()
    x_ref = x.detach().clone().requires_grad_(True)
    (x_ref @ w_eff.T + m.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=2e-2, atol=2e-2 * float(x_ref.grad.abs().max()))


@pytest.mark.parametrize(
    ("in_f", "out_f", "bits", "rank", "group_size"),
    [(64, 32, 4, 8, 64), (100, 24, 3, 4, 64), (100, 24, 2, 0, 32), (130, 17, 8, 16, 64), (48, 40, 16, 8, 64)],
)
def test_state_bytes_equal_the_cost_model(
    in_f: int, out_f: int, bits: int, rank: int, group_size: int
) -> None:
    m = QuantLoRALinear.from_linear(nn.Linear(in_f, out_f), bits, rank, group_size=group_size, loftq_iters=1)
    cost = CostModel(group_size=group_size)
    assert m.state_nbytes() == cost.layer_bytes(in_f, out_f, bits, rank)
    state = m.state_dict()
    base_keys = ("weight",) if bits == 16 else ("qweight", "scale", "zero")
    base_bytes = sum(state[k].numel() * state[k].element_size() for k in base_keys)
    assert base_bytes == cost.weight_bytes(in_f, out_f, bits) + cost.metadata_bytes(in_f, out_f, bits)
    adapter_params = sum(state[k].numel() for k in ("lora_A", "lora_B") if k in state)
    assert adapter_params * cost.adapter_bytes == cost.adapter_bytes_for(in_f, out_f, rank)
    assert set(state) == set(base_keys) | {"bias"} | ({"lora_A", "lora_B"} if rank else set())


def test_hf_conv1d_is_supported() -> None:
    conv1d_cls = pytest.importorskip("transformers.pytorch_utils").Conv1D
    conv = conv1d_cls(48, 64)  # nf=48 outputs, nx=64 inputs; weight stored [64, 48]
    x = torch.randn(3, 7, 64)
    m = QuantLoRALinear.from_linear(conv, 8, 4, name="h.0.attn.c_attn")
    assert (m.in_features, m.out_features) == (64, 48)
    y = conv(x).detach()
    with torch.no_grad():
        assert float((m(x) - y).norm() / y.norm()) < 1e-2


def test_unsupported_module_raises_typed_error() -> None:
    with pytest.raises(UnsupportedLayerError, match="Conv2d"):
        QuantLoRALinear.from_linear(nn.Conv2d(3, 3, 1), 4, 4)


def test_from_linear_clamps_rank_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        m = QuantLoRALinear.from_linear(nn.Linear(64, 8), 4, 32)
    assert m.rank == 8 and "clamped" in caplog.text


@pytest.mark.parametrize(
    "kwargs", [{"bits": 5}, {"rank": -1}, {"rank": 99}, {"dropout": 1.0}, {"alpha": 0.0}]
)
def test_constructor_validation(kwargs: dict) -> None:
    args = {"in_features": 64, "out_features": 32, "bits": 4, "rank": 4} | kwargs
    with pytest.raises(ConfigError):
        QuantLoRALinear(**args)


@pytest.mark.parametrize(
    ("bits", "out", "kernel_cache", "layout", "cached"),
    [
        (2, 128, False, "packed", False),  # default: memory first, chunked dequantization
        (3, 128, False, "packed", False),
        (2, 128, True, "packed", True),  # opt-in speed: a 4-bit kernel copy beside the codes
        (3, 80, True, "packed", True),
        (4, 128, False, "int4_cpu", False),  # 4 bits: the kernel layout IS the storage
        (4, 128, True, "int4_cpu", True),  # opt-in speed: the bf16 scale/offset pairs kept
        (4, 80, False, "packed", False),  # out not a multiple of the layout block (64 AVX-512, 32 AVX2)
        (4, 80, True, "packed", True),
        (8, 128, True, "packed", False),  # no int4 kernel at 8 bits
    ],
)
def test_fast_paths_match_the_reference(bits: int, out: int, kernel_cache: bool, layout: str, cached: bool) -> None:
    lin = nn.Linear(200, out)  # 200 = 3 groups of 64 + padding
    m = QuantLoRALinear.from_linear(lin, bits, 4, kernel_cache=kernel_cache)
    assert m.layout == layout
    x = torch.randn(2, 5, 200)
    with torch.no_grad():
        ref = nn.functional.linear(x, m.dequantized_weight() + m.delta_weight(), m.bias)
        fast = m(x)
        assert (m._kernel_cache is not None) == cached
        m.fast_path = False
        assert m.layout == "packed"
        chunked = m(x)
    torch.testing.assert_close(chunked, ref, rtol=1e-4, atol=1e-5)
    rel = float((fast - ref).norm() / ref.norm())
    assert rel < (1e-2 if layout == "int4_cpu" or cached else 1e-5)


def test_torch_export_uses_the_plain_dequantized_path() -> None:
    m = QuantLoRALinear.from_linear(nn.Linear(128, 64), 4, 8)
    x = torch.randn(2, 128)
    exported = torch.export.export(m, (x,), strict=False).module()
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not any("int4pack" in t for t in targets)
    m.fast_path = False
    with torch.no_grad():
        torch.testing.assert_close(exported(x), m(x), rtol=1e-4, atol=1e-5)


def test_state_dict_round_trip_and_kernel_cache_refresh() -> None:
    src = QuantLoRALinear.from_linear(nn.Linear(128, 64), 4, 8)
    dst = QuantLoRALinear(128, 64, 4, 8)
    x = torch.randn(3, 128)
    with torch.no_grad():
        dst(x)  # builds the kernel cache from the zero-initialized buffers
        dst.load_state_dict(src.state_dict())
        torch.testing.assert_close(dst(x), src(x))


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_dtype_cast_keeps_the_stored_format(bits: int) -> None:
    m = QuantLoRALinear.from_linear(nn.Linear(128, 64), bits, 4)
    x = torch.randn(3, 128)
    with torch.no_grad():
        y = m(x)
        m.to(torch.bfloat16)
        y_bf16 = m(x.to(torch.bfloat16))
    formats = {k: v.dtype for k, v in m.state_dict().items() if k in ("scale", "zero", "weight")}
    assert set(formats.values()) == {torch.float16}
    assert m.lora_A.dtype == torch.bfloat16
    assert m.state_nbytes() == CostModel(adapter_bytes=2).layer_bytes(128, 64, bits, 4)
    assert float((y_bf16.float() - y).norm() / y.norm()) < 2e-2


def test_works_when_built_and_run_in_inference_mode() -> None:
    with torch.inference_mode():
        m = QuantLoRALinear.from_linear(nn.Linear(64, 32), 4, 4)
        assert m(torch.randn(2, 64)).shape == (2, 32)
        assert m(torch.randn(0, 64)).shape == (0, 32)


def test_merge_on_quantized_base_reports_error_and_forbids_unmerge(caplog: pytest.LogCaptureFixture) -> None:
    m = QuantLoRALinear.from_linear(nn.Linear(128, 64), 4, 8)
    with torch.no_grad():
        m.lora_B.add_(0.05 * torch.randn_like(m.lora_B))
        x = torch.randn(16, 128)
        before = m(x)
        with caplog.at_level(logging.INFO):
            error = m.merge()
        after = m(x)
    assert m.merged and 0.0 < error < 0.2
    assert "relative weight error" in caplog.text
    assert float((after - before).norm() / before.norm()) < 0.2
    with pytest.raises(MergeError):
        m.unmerge()


def test_merge_unmerge_at_16_bits() -> None:
    m = QuantLoRALinear.from_linear(nn.Linear(64, 32), 16, 4)
    with torch.no_grad():
        m.lora_B.normal_(0, 0.1)
        x = torch.randn(4, 64)
        before = m(x)
        error = m.merge()
        merged = m(x)
        m.unmerge()
        after = m(x)
    assert error < 1e-3
    torch.testing.assert_close(merged, before, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(after, before, rtol=1e-2, atol=1e-2)
    assert not m.merged


def test_extra_repr_names_the_choice() -> None:
    text = repr(QuantLoRALinear(64, 32, 3, 4, alpha=8.0))
    for part in ("bits=3", "rank=4", "backend='packed'", "scaling=2"):
        assert part in text


# -- backend contract ----------------------------------------------------------------------------
def _usable_backends() -> list[str]:
    names = []
    for name in available_backends():
        backend = get_backend(name)
        if any(backend.supports(128, 64, QuantSpec(bits=b)).ok for b in backend.supported_bits):
            names.append(name)
    return names


@pytest.mark.parametrize("name", _usable_backends())
class TestBackendContract:
    """Every backend usable on this machine honours the same interface."""

    def test_round_trip_shape_bytes_and_finite_error(self, name: str) -> None:
        backend = get_backend(name)
        w = torch.randn(64, 100, generator=_gen(5))
        for bits in backend.supported_bits:
            spec = QuantSpec(bits=bits)
            if not backend.supports(100, 64, spec).ok:
                continue
            qw = backend.quantize(w, spec)
            w_hat = backend.dequantize(qw)
            assert w_hat.shape == w.shape and torch.isfinite(w_hat).all()
            assert qw.nbytes == backend.storage_nbytes(100, 64, spec)
            assert float((w - w_hat).norm() / w.norm()) < 0.7

    def test_error_decreases_with_bits(self, name: str) -> None:
        backend = get_backend(name)
        w = torch.randn(64, 128, generator=_gen(6))
        bits = [b for b in backend.supported_bits if backend.supports(128, 64, QuantSpec(bits=b)).ok]
        errors = [
            float((w - backend.dequantize(backend.quantize(w, QuantSpec(bits=b)))).norm()) for b in bits
        ]
        assert errors == sorted(errors, reverse=True)

    def test_module_runs_with_the_backend(self, name: str) -> None:
        backend = get_backend(name)
        bits = max(b for b in backend.supported_bits if backend.supports(128, 64, QuantSpec(bits=b)).ok)
        lin = nn.Linear(128, 64)
        m = QuantLoRALinear.from_linear(lin, bits, 4, backend=name)
        assert m.state_nbytes() == CostModel().layer_bytes(128, 64, bits, 4)
        x = torch.randn(4, 128)
        with torch.no_grad():
            y, y_ref = m(x), lin(x)
        assert float((y - y_ref).norm() / y_ref.norm()) < 0.2


@pytest.mark.parametrize("rows", [1, KERNEL_MAX_ROWS - 1, KERNEL_MAX_ROWS, 2 * KERNEL_MAX_ROWS])
def test_int4_layout_forward_matches_the_dequantized_weight_on_both_sides_of_the_row_threshold(rows: int) -> None:
    lin = torch.nn.Linear(128, 64, bias=False)
    torch.nn.init.normal_(lin.weight, std=0.05, generator=torch.Generator().manual_seed(0))
    layer = QuantLoRALinear.from_linear(lin, 4, 0)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(1))
    ref = x @ layer.dequantized_weight(torch.float32).T
    with torch.no_grad():
        y = layer(x)
    # the int4 kernel runs with bf16 activations (few rows); the chunked path is the float reference itself
    tol = 1e-2 if rows < KERNEL_MAX_ROWS and layer.layout == "int4_cpu" else 1e-5
    assert float((y - ref).norm() / ref.norm()) < tol


@pytest.mark.parametrize("chunk_elements", [1 << 24, 2 * 256, 3 * 256])  # one piece; 2 rows; 3 rows (a short tail)
@pytest.mark.parametrize(("bits", "fast_path"), [(3, True), (4, True), (4, False), (2, True)])
def test_row_chunks_forward_and_input_gradient(monkeypatch: pytest.MonkeyPatch, chunk_elements: int, bits: int,
                                               fast_path: bool) -> None:
    """Many input rows take the dequantized path, in one piece or in row chunks: the same product and
    input gradient as the dense weight, whatever the chunking."""
    import autoqra.modules.quant_lora_linear as qll

    monkeypatch.setattr(qll, "_CHUNK_ELEMENTS", chunk_elements)
    m = QuantLoRALinear.from_linear(nn.Linear(200, 128), bits, 4)
    m.fast_path = fast_path
    n_chunks = len(m._row_chunks())
    assert (n_chunks == 1) == (chunk_elements == 1 << 24)
    x = torch.randn(qll.KERNEL_MAX_ROWS + 7, 200, requires_grad=True)  # enough rows for the float path
    m(x).square().sum().backward()
    w = (m.dequantized_weight() + m.delta_weight()).detach()
    x_ref = x.detach().clone().requires_grad_(True)
    ref = nn.functional.linear(x_ref, w, m.bias)
    ref.square().sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-3)


def test_bf16_autocast_on_cpu_runs_the_base_in_bf16_with_fp32_adapters() -> None:
    check_bf16_autocast("cpu")


@pytest.mark.parametrize(("bits", "out_features", "available", "want"), [
    (4, 128, True, "int4_cuda"),
    (4, 128, False, "packed"),   # the layout check failed on this GPU (logged): dequantizing path
    (3, 128, True, "packed"),    # 2/3/8 bits keep the packed codes
    (4, 100, True, "packed"),    # not whole 8-row tiles
])
def test_device_selects_the_layout(monkeypatch, bits, out_features, available, want) -> None:
    from autoqra.quant import int4_cuda

    layer = QuantLoRALinear.from_linear(torch.nn.Linear(256, out_features), bits, 4)
    monkeypatch.setattr(int4_cuda, "available", lambda device, k: available)
    assert layer._resident_layout(torch.device("cuda")) == want
    assert layer._resident_layout(torch.device("meta")) == "packed"


def test_cuda_int4_layout_is_unavailable_without_a_gpu() -> None:
    from autoqra.quant import int4_cuda

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: tests/test_cuda.py covers the layout there")
    assert not int4_cuda.available(torch.device("cuda"), 256)
    assert int4_cuda.inner_k_tiles(576) == 4 and int4_cuda.inner_k_tiles(1536) == 8 and int4_cuda.inner_k_tiles(48) is None


def test_pickling_stores_packed_codes_and_lays_them_out_again(monkeypatch) -> None:
    import pickle

    layer = QuantLoRALinear.from_linear(nn.Linear(200, 128), 4, 8)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    assert layer.layout == "int4_cpu"
    state = layer.__getstate__()
    assert state["layout"] == "packed" and torch.equal(state["_buffers"]["qweight"], layer.packed_qweight())
    assert layer.layout == "int4_cpu"  # pickling leaves the original alone
    back = pickle.loads(pickle.dumps(layer))
    assert back.layout == "int4_cpu" and torch.equal(back.qweight, layer.qweight)
    x = torch.randn(3, 200)
    with torch.no_grad():
        torch.testing.assert_close(back(x), layer(x), rtol=0, atol=0)
    # another machine's layout: the packed codes are laid out for the loader, whatever made the pickle
    monkeypatch.setattr(QuantLoRALinear, "_resident_layout", lambda self, device=None: "packed")
    moved = pickle.loads(pickle.dumps(layer))
    assert moved.layout == "packed" and torch.equal(moved.qweight, layer.packed_qweight())


def test_deepcopy_keeps_the_layout_without_repacking(monkeypatch) -> None:
    import copy

    layer = QuantLoRALinear.from_linear(nn.Linear(200, 128), 4, 8)
    monkeypatch.setattr(QuantLoRALinear, "packed_qweight", lambda self: pytest.fail("deepcopy repacked"))
    twin = copy.deepcopy(layer)
    assert twin.layout == "int4_cpu" and torch.equal(twin.qweight, layer.qweight)
    assert twin.qweight.data_ptr() != layer.qweight.data_ptr() and twin.lora_A is not layer.lora_A
    twin.lora_A.data.zero_()
    assert layer.lora_A.abs().sum() > 0


@pytest.mark.parametrize(("dtype", "autocast"), [(torch.float32, False), (torch.bfloat16, False),
                                                  (torch.float32, True)])
def test_dense_base_keeps_its_fp16_weight_for_the_backward_not_a_cast_copy(dtype, autocast) -> None:
    """A 16-bit layer's backward reads the held fp16 weight (cast again there), not a copy cast in the forward
    (fp32: twice the layer's bytes kept per 16-bit layer until the backward); output and input gradient are
    the plain ops'."""
    torch.manual_seed(0)
    layer = QuantLoRALinear.from_linear(nn.Linear(96, 64), 16, 0)
    x = torch.randn(5, 96, dtype=dtype, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
    assert not [t for t in saved if t.shape == (64, 96) and t.dtype != torch.float16]
    assert any(t.data_ptr() == layer.weight.data_ptr() for t in saved)
    xr = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        reference = nn.functional.linear(xr, layer.weight.to(dtype))
        reference = reference + layer.bias.to(reference.dtype)
    assert y.dtype == reference.dtype
    torch.testing.assert_close(y, reference, rtol=0, atol=0)
    y.float().square().sum().backward()
    reference.float().square().sum().backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=0)

"""The CUDA path (run by scripts/gpu_check.sh on a machine with a GPU; skipped elsewhere, where no CUDA
device exists to run them): the packed layer, calibration, compile and fine-tuning on the GPU agree with
the CPU within float tolerance, and the model keeps its device."""

from __future__ import annotations

import copy

import pytest
import torch
from layer_checks import (
    check_bf16_adapter_keeps_the_input,
    check_bf16_autocast,
    check_compiled_layer_keeps_the_int4_kernel,
)
from tiny_models import tiny_llama

import autoqra
from autoqra.api import calibrate
from autoqra.footprint import held_bytes
from autoqra.ir.cost import CostModel
from autoqra.modules.quant_lora_linear import CUDA_KERNEL_MAX_ROWS, QuantLoRALinear
from autoqra.quant import int4_cuda

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]

CALIB = torch.randint(3, 128, (3, 32), generator=torch.Generator().manual_seed(0))
TOKENS = torch.randint(3, 128, (1600,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_layer_on_cuda_matches_cpu(bits, dtype) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    layer = QuantLoRALinear.from_linear(linear, bits, 8)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    gpu = copy.deepcopy(layer).cuda()
    x = torch.randn(5, 7, 256)
    xc, xg = x.clone().requires_grad_(), x.cuda().to(dtype).requires_grad_()
    yc, yg = layer(xc), gpu(xg)
    # 4 bits: both devices run an int4 kernel with bf16 activations on these 35 rows (CPU and tinygemm)
    tol = 1e-4 if dtype is torch.float32 and bits != 4 else 3e-2
    torch.testing.assert_close(yg.float().cpu(), yc, rtol=tol, atol=tol * yc.abs().max().item())
    yc.square().mean().backward()
    yg.float().square().mean().backward()
    torch.testing.assert_close(xg.grad.float().cpu(), xc.grad, rtol=10 * tol, atol=10 * tol * xc.grad.abs().max().item())
    torch.testing.assert_close(gpu.lora_B.grad.cpu(), layer.lora_B.grad, rtol=10 * tol,
                               atol=10 * tol * layer.lora_B.grad.abs().max().item())
    assert gpu.qweight.device.type == "cuda" and gpu.lora_A.dtype == torch.float32


def test_calibration_on_cuda_matches_cpu() -> None:
    cpu = calibrate(tiny_llama(), CALIB, weight_gradients=True, progress=False)
    gpu = calibrate(tiny_llama().cuda(), CALIB, weight_gradients=True, progress=False)
    for name, st in cpu.stats.items():
        other = gpu.stats[name]
        assert other.x2_sum.device.type == "cpu"  # moved once at the end
        torch.testing.assert_close(other.d, st.d, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(other.g, st.g, rtol=1e-3, atol=1e-8)


def test_compile_and_finetune_on_cuda_keep_the_device() -> None:
    model = tiny_llama().cuda()
    result = autoqra.compile(model, "5bits", calib=CALIB, cache_dir=None, progress=False)
    assert all(p.device.type == "cuda" for p in result.model.parameters())
    assert all(b.device.type == "cuda" for b in result.model.buffers())
    run = autoqra.finetune(result.model, TOKENS, steps=3, seq_len=32, batch_size=4, progress=False)
    assert run.steps == 3 and run.losses[-1] < run.losses[0] + 1.0


@pytest.mark.parametrize("shape", [(8, 32), (16, 64), (1536, 576), (576, 1536), (4096, 4096)])
def test_int4_cuda_layout_round_trips(shape) -> None:
    n, k = shape
    codes = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(n + k)).cuda()
    layout = int4_cuda.encode(codes)
    assert layout.numel() * layout.element_size() == n * k // 2  # the packed form's bytes
    assert torch.equal(int4_cuda.decode(layout, k), codes)
    assert torch.equal(int4_cuda.decode(layout.cpu(), k), codes.cpu())
    if n >= 16:
        assert torch.equal(int4_cuda.decode(layout, k, 8, 16), codes[8:16])


def test_four_bit_layer_holds_the_cuda_kernel_layout_and_agrees_with_its_chunks() -> None:
    torch.manual_seed(0)
    layer = QuantLoRALinear.from_linear(torch.nn.Linear(576, 1536), 4, 8)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    gpu = copy.deepcopy(layer).cuda()
    assert gpu.layout == "int4_cuda"
    bytes_ = CostModel(group_size=64, adapter_bytes=4).layer_bytes(576, 1536, 4, 8)
    assert gpu.state_nbytes() == bytes_ and held_bytes(gpu, skip=("bias",)) == bytes_
    cpu_state, gpu_state = layer.state_dict(), gpu.state_dict()
    for key, value in cpu_state.items():  # the saved form is the packed one on either device
        assert torch.equal(gpu_state[key].cpu(), value), key
    x = torch.randn(CUDA_KERNEL_MAX_ROWS + 40, 576, device="cuda")
    chunks = gpu(x)  # many rows: dequantized once, cuBLAS
    kernel = torch.cat([gpu(x[i : i + 8]) for i in range(0, x.shape[0], 8)])  # few rows: tinygemm
    torch.testing.assert_close(kernel, chunks, rtol=2e-2, atol=2e-2 * chunks.abs().max().item())
    back = gpu.cpu()
    assert torch.equal(back.packed_qweight(), layer.packed_qweight())


def test_bf16_autocast_runs_the_base_in_bf16_with_fp32_adapters() -> None:
    check_bf16_autocast("cuda")


def test_load_onto_a_cuda_base_keeps_the_layers_there(tmp_path) -> None:
    model = tiny_llama()
    autoqra.compile(model, "5bits", calib=CALIB, cache_dir=None, progress=False)
    autoqra.save(model, tmp_path / "saved")
    on_cpu = autoqra.load(tmp_path / "saved", tiny_llama())
    on_gpu = autoqra.load(tmp_path / "saved", tiny_llama().cuda())
    assert all(t.device.type == "cuda" for t in list(on_gpu.parameters()) + list(on_gpu.buffers()))
    ids = CALIB[:1]
    with torch.no_grad():
        ref, got = on_cpu(ids).logits, on_gpu(ids.cuda()).logits.cpu()
    torch.testing.assert_close(got, ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


def test_bf16_input_adapter_keeps_the_input_on_cuda() -> None:
    check_bf16_adapter_keeps_the_input("cuda")


def test_storage_peak_counts_cuda_storages_under_the_current_device() -> None:
    from autoqra.peak_memory import StoragePeak

    with StoragePeak() as tracker:
        a = torch.empty(2**18, device="cuda")  # 1 MiB
        del a
    assert tracker.peak_bytes("cuda") == tracker.peak_bytes(f"cuda:{torch.cuda.current_device()}") == 2**20
    assert tracker.peak_bytes("cpu") == 0


def test_compiled_layers_keep_the_int4_kernel_under_cuda_graphs() -> None:
    """``torch.compile(mode="reduce-overhead")``: CUDA graphs replay the int4 kernel (the batch-1 layer is
    launch-bound in eager mode), bit-equal to eager."""
    torch._dynamo.reset()
    check_compiled_layer_keeps_the_int4_kernel("cuda", torch.bfloat16, mode="reduce-overhead")

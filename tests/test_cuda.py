"""The CUDA path (run by scripts/gpu_check.sh on a machine with a GPU; skipped elsewhere, where no CUDA
device exists to run them): the packed layer, calibration, compile and fine-tuning on the GPU agree with
the CPU within float tolerance, and the model keeps its device."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_llama

import autoqra
from autoqra.api import calibrate
from autoqra.modules.quant_lora_linear import QuantLoRALinear

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
    tol = 1e-4 if dtype is torch.float32 else 3e-2
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

"""Checks shared by the CPU and the CUDA tests of ``QuantLoRALinear`` (the same contract on each device)."""

from __future__ import annotations

import torch

from autoqra.modules.quant_lora_linear import QuantLoRALinear


def check_bf16_autocast(device: str) -> None:
    """Under ``torch.autocast(device, bfloat16)`` the layer's output is bf16 and close to the fp32 one, and
    the fp32 adapters and the fp32 input get fp32 gradients."""
    torch.manual_seed(0)
    layer = QuantLoRALinear.from_linear(torch.nn.Linear(256, 128), 3, 8).to(device)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    x = torch.randn(300, 256, device=device, requires_grad=True)
    reference = layer(x)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference, rtol=3e-2, atol=3e-2 * reference.abs().max().item())
    y.float().square().mean().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and x.grad is not None and x.grad.dtype == torch.float32

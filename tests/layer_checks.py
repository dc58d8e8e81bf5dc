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


def check_bf16_adapter_keeps_the_input(device: str) -> None:
    """A bf16 input through a layer with fp32 adapters: the output and the gradients equal the plain ops' (the
    input cast to fp32 first) and the backward keeps the input itself, no fp32 copy of it."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    layer = QuantLoRALinear.from_linear(torch.nn.Linear(64, 96), bits=4, rank=8, group_size=32, loftq_iters=0)
    layer = layer.to(device)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.bias.data = layer.bias.data.to(torch.bfloat16)
    x = torch.randn(2, 5, 64, device=device).to(torch.bfloat16).requires_grad_(True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y.float().square().sum().backward()
    xr = x.detach().requires_grad_(True)
    a = layer.lora_A.detach().requires_grad_(True)
    b = layer.lora_B.detach().requires_grad_(True)
    base = layer._base_forward(xr)
    ref = base + (F.linear(F.linear(xr.float(), a), b) * layer.scaling).to(base.dtype) + layer.bias
    ref.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)
    assert torch.allclose(x.grad.float(), xr.grad.float(), rtol=1e-2, atol=1e-2)
    assert torch.allclose(layer.lora_A.grad, a.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(layer.lora_B.grad, b.grad, rtol=1e-5, atol=1e-5)
    copies = [t for t in saved if t.dtype == torch.float32 and t.numel() == x.numel()
              and not isinstance(t, torch.nn.Parameter)]
    assert copies == []
    assert any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved)


def check_compiled_layer_keeps_the_int4_kernel(device: str, dtype: torch.dtype, **compile_kwargs) -> None:
    """``torch.compile`` (inductor) of two 4-bit layers in the int4 layout, grad off, few rows: the output
    equals eager mode's bit for bit, on the first call and on a replay (the same int4 kernel ran, through
    ``autoqra::int4_mm``; the dequantized weight's product differs in the last bits)."""
    torch.manual_seed(0)
    stack = torch.nn.Sequential(*[QuantLoRALinear.from_linear(torch.nn.Linear(256, 256), 4, 8) for _ in range(2)])
    stack = stack.to(device=device, dtype=dtype)
    with torch.no_grad():
        for layer in stack:
            layer.lora_B.normal_(0, 0.02)
    assert {layer.layout for layer in stack} == {"int4_cuda" if device.startswith("cuda") else "int4_cpu"}
    compiled = torch.compile(stack, **compile_kwargs)
    x = torch.randn(1, 3, 256, device=device, dtype=dtype)
    with torch.no_grad():
        eager = stack(x)
        first = compiled(x).clone()
        second = compiled(x)
    assert torch.equal(first, eager) and torch.equal(second, eager)

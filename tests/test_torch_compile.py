"""``torch.compile`` of compiled layers: grad-free decoding-sized inputs keep the int4 kernel (as the opaque
op ``autoqra::int4_mm``), everything else traces the plain dequantized product, and export never sees
the kernel."""

from __future__ import annotations

import pytest
import torch
from layer_checks import check_compiled_layer_keeps_the_int4_kernel
from torch import nn

from autoqra.modules.quant_lora_linear import KERNEL_MAX_ROWS, QuantLoRALinear
from autoqra.quant import int4_layout

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not int4_layout.kernel_available(), reason="this torch has no CPU int4 kernel"),
]


def _graph_targets(module: nn.Module, x: torch.Tensor, grad: bool) -> tuple[set[str], torch.Tensor]:
    """The call targets of the graph dynamo captures for ``module(x)`` (run by aot_eager), and its output."""
    targets: set[str] = set()

    def record(gm: torch.fx.GraphModule, example_inputs):  # noqa: ANN001, ANN202
        targets.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        y = torch.compile(module, backend=record, fullgraph=True)(x)
    return targets, y


# (bits, rows, grad, input requires grad, whether the int4 kernel is in the graph)
CASES = [
    (4, 1, False, False, True),  # decoding: the kernel
    (4, KERNEL_MAX_ROWS - 1, False, False, True),
    (4, KERNEL_MAX_ROWS, False, False, False),  # prefill-sized: dequantize, one matmul
    (4, 1, True, False, True),  # grad on, but nothing asks for the input's gradient
    (4, 1, True, True, False),  # training: the differentiable plain product
    (3, 1, False, False, False),  # packed 3-bit codes: no kernel layout
]


@pytest.mark.parametrize(("bits", "rows", "grad", "requires_grad", "kernel"), CASES)
def test_compiled_graph_keeps_the_kernel_only_where_eager_would_use_it(bits, rows, grad, requires_grad,
                                                                       kernel) -> None:
    torch.manual_seed(0)
    layer = QuantLoRALinear.from_linear(nn.Linear(128, 64), bits, 8)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    x = torch.randn(rows, 128, requires_grad=requires_grad)
    targets, y = _graph_targets(layer, x, grad)
    assert any("int4_mm" in t for t in targets) == kernel, targets
    assert not any("int4pack" in t for t in targets)  # torch's kernel only inside autoqra's opaque op
    with torch.no_grad():
        if kernel:  # the same kernel as eager mode: bit-equal
            torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
        reference = nn.functional.linear(x, layer.dequantized_weight() + layer.delta_weight(), layer.bias)
    torch.testing.assert_close(y.detach(), reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())


def test_kernel_cache_is_not_read_while_compiling() -> None:
    """The cache's key (storage addresses) cannot be traced: under compile the pairs are derived in the graph."""
    layer = QuantLoRALinear.from_linear(nn.Linear(128, 64), 4, 8, kernel_cache=True)
    x = torch.randn(1, 128)
    targets, y = _graph_targets(layer, x, grad=False)
    assert any("int4_mm" in t for t in targets)
    with torch.no_grad():
        torch.testing.assert_close(y, layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_compiles_the_kernel_path(dtype) -> None:
    """inductor's own lowering of torch's CPU int4 kernel fails on a derived scale/offset tensor; the
    opaque op compiles, and the result is eager mode's, bit for bit."""
    torch._dynamo.reset()
    check_compiled_layer_keeps_the_int4_kernel("cpu", dtype)


def _saved_for_backward(module: nn.Module, x: torch.Tensor) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of what AOTAutograd's default partitioner (inductor's) keeps from the compiled
    forward for the backward of ``module(x).sum()``; the backward runs too."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    kept: list[tuple[tuple[int, ...], torch.dtype]] = []

    def forward_compiler(gm: torch.fx.GraphModule, example_inputs):  # noqa: ANN001, ANN202
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        kept.extend((tuple(a.meta["val"].shape), a.meta["val"].dtype) for a in outputs[1:])  # [0]: the output
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                           partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    torch.compile(module, backend=backend, fullgraph=True)(x).sum().backward()
    return kept


@pytest.mark.parametrize(("bits", "layout"), [(4, "int4_cpu"), (3, "packed"), (8, "packed"), (2, "packed"),
                                            (16, "packed")])
def test_compiled_training_recomputes_the_weight_instead_of_saving_it(bits, layout) -> None:
    """As in eager mode, the backward dequantizes again: no float copy of the base weight is kept between the
    forward and the backward (a compiled step would otherwise hold one per layer, 8× a 4-bit base in fp32),
    and the gradients are eager mode's."""
    torch.manual_seed(0)
    layer = QuantLoRALinear.from_linear(nn.Linear(512, 256), bits, 8)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    assert layer.layout == layout
    x = torch.randn(300, 512, requires_grad=True)
    kept = _saved_for_backward(layer, x)
    # (a 16-bit layer's own fp16 weight is a graph input: saving it costs nothing)
    assert not [k for k in kept if k[0] in ((256, 512), (512, 256)) and k[1] in (torch.float32, torch.bfloat16)], kept
    compiled_grads = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
    for t in (x, layer.lora_A, layer.lora_B):
        t.grad = None
    layer(x).sum().backward()
    for got, want in zip(compiled_grads, (x.grad, layer.lora_A.grad, layer.lora_B.grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_inductor_trains_a_layer_like_eager_mode() -> None:
    """A compiled training step through inductor (the checkpointed dequantization included) gives eager mode's
    gradients."""
    torch.manual_seed(0)
    layer = QuantLoRALinear.from_linear(nn.Linear(256, 128), 3, 8)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    x = torch.randn(2, 40, 256, requires_grad=True)
    torch._dynamo.reset()
    torch.compile(layer)(x).square().mean().backward()
    compiled_grads = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
    for t in (x, layer.lora_A, layer.lora_B):
        t.grad = None
    layer(x).square().mean().backward()
    for got, want in zip(compiled_grads, (x.grad, layer.lora_A.grad, layer.lora_B.grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_finetune_trains_a_compiled_model_in_one_graph() -> None:
    """``autoqra.finetune(torch.compile(model, fullgraph=True))``: nothing of finetune's own breaks the graph (its
    per-block heap trim traces to nothing), and the losses follow eager mode's (the compiled base product is
    the fp32 dequantized one, eager's few-row product the bf16 int4 kernel: close, not equal)."""
    import copy

    from tiny_models import tiny_llama

    import autoqra

    torch.manual_seed(0)
    model = tiny_llama()
    autoqra.compile(model, "16bits", bits=(4,), ranks=(8,), cache_dir=None, progress=False)
    eager = copy.deepcopy(model)
    tokens = torch.randint(3, 128, (4096,), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = autoqra.finetune(compiled, tokens, steps=3, seq_len=32, progress=False).losses
    want = autoqra.finetune(eager, tokens, steps=3, seq_len=32, progress=False).losses
    assert len(got) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-2, atol=0)

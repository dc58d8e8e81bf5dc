"""Calibration with each block's activations recomputed in the backward (`autoqra.recompute`): the
same statistics, bit for bit, as with the whole graph held; blocks found; the model left as it was."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_gemma3, tiny_gpt2, tiny_llama, tiny_opt
from torch import nn

from autoqra.ir.capture import capture
from autoqra.passes import BuildLayerGraphPass, PassManager
from autoqra.passes.calibrate import CalibratePass
from autoqra.recompute import Recompute, find_blocks


def _stats(model: nn.Module, batches: list[torch.Tensor], recompute: bool) -> dict:
    program = capture(model)
    PassManager([BuildLayerGraphPass(), CalibratePass(batches, weight_gradients=True, progress=False,
                                                      recompute=recompute)]).run(program)
    return program.state["stats"]


def tiny_gemma2() -> nn.Module:
    """Final-logit soft-capping: the loss runs on full logits (the model's own forward, cache off)."""
    from test_architectures import _make

    return _make("gemma2")


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3, tiny_gemma2, tiny_gpt2, tiny_opt],
                         ids=lambda f: f.__name__)
def test_recomputed_calibration_equals_the_held_graph(make) -> None:
    batches = list(torch.randint(3, 128, (2, 1, 24), generator=torch.Generator().manual_seed(0)))
    model = make()
    held, recomputed = _stats(model, batches, False), _stats(model, batches, True)
    assert held.keys() == recomputed.keys() and held
    for name, a in held.items():
        b = recomputed[name]
        assert (a.x_count, a.g_count) == (b.x_count, b.g_count) and a.g_count > 0, name
        assert torch.equal(a.x2_sum, b.x2_sum) and torch.equal(a.g2_sum, b.g2_sum), name
        assert a.grad_sum.scale == b.grad_sum.scale and torch.equal(a.grad_sum.codes, b.grad_sum.codes), name
    assert all("forward" not in m.__dict__ for m in model.modules())  # every wrapper removed


def test_blocks_are_the_outermost_list_children_holding_a_target() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block() for _ in range(3)])
            self.heads = nn.ModuleList([nn.Linear(4, 4)])  # holds no target: not a block
            self.out = nn.Linear(4, 4)

    net = Net()
    targets = [net.layers[0].proj, net.layers[1].experts[1], net.out]
    assert find_blocks(net, targets) == [net.layers[0], net.layers[1]]
    assert find_blocks(net, [net.out]) == []


def test_recompute_wraps_only_while_entered_and_flags_the_recomputation() -> None:
    model = tiny_llama()
    blocks = find_blocks(model, [model.model.layers[0].mlp.down_proj])
    assert blocks == [model.model.layers[0]]
    seen: list[bool] = []
    after: list[int] = []
    recompute = Recompute(blocks, after_block=lambda: after.append(1))
    handle = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: seen.append(recompute.active))
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_())
    with recompute():
        assert "forward" in blocks[0].__dict__
        model(input_ids=ids, use_cache=False).logits.sum().backward()
    handle.remove()
    assert "forward" not in blocks[0].__dict__
    # the first forward, then the recomputation in the backward (which stops early, once it has what the
    # backward needs: layers at the block's end may not run again)
    assert seen == [False, True]
    assert len(after) == 2  # after the block's forward and after its recomputation
    with recompute(), torch.no_grad():  # without grad nothing is checkpointed
        model(input_ids=ids, use_cache=False)
    assert seen == [False, True] and len(after) == 2

"""Collectives run on the device their backend reduces on (NCCL: CUDA tensors only), checked before
torch.distributed sees them; calibration keeps its sums on the model's device until it ends."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tiny_models import tiny_llama

import autoqra.distributed as adist
from autoqra.api import calibrate
from autoqra.errors import CollectiveDeviceError

CALIB = torch.randint(3, 128, (3, 16), generator=torch.Generator().manual_seed(0))
PACKAGE = Path(adist.__file__).parent


@pytest.mark.parametrize(("backend", "device"), [
    ("gloo", "cpu"),
    ("nccl", "cuda:0"),
    ("cpu:gloo,cuda:nccl", "cuda:0"),  # a mixed group: NCCL for the CUDA tensors
    ("mpi", "cpu"),
])
def test_collective_device_follows_the_backend(monkeypatch, backend, device) -> None:
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert adist.collective_device() == torch.device(device)


def test_a_cpu_tensor_for_nccl_is_refused_with_the_fix(monkeypatch) -> None:
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(CollectiveDeviceError, match="cpu tensor was handed to a nccl collective.*all_reduce_sum"):
        adist.check_collective(torch.zeros(3))
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    t = torch.zeros(3)
    assert adist.check_collective(t) is t


def test_sharded_calibration_hands_every_collective_a_checked_tensor(monkeypatch) -> None:
    """A one-rank 'distributed' calibration (collectives faked as identities): every tensor reaches
    dist.all_reduce on the backend's device, and the statistics equal the plain run's."""
    model = tiny_llama()
    plain = calibrate(copy.deepcopy(model), CALIB, weight_gradients=True, progress=False)
    seen: list[torch.device] = []

    def fake_all_reduce(tensor, op=None, group=None):  # noqa: ANN001, ANN202
        adist.check_collective(tensor, group)
        seen.append(tensor.device)

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(adist, "is_distributed", lambda: True)
    monkeypatch.setattr(adist, "rank_and_world", lambda: (0, 1))
    import autoqra.passes.calibrate as cal_pass

    monkeypatch.setattr(cal_pass, "is_distributed", lambda: True)
    sharded = calibrate(copy.deepcopy(model), CALIB, weight_gradients=True, progress=False)
    assert seen and all(d.type == "cpu" for d in seen)
    assert sharded.tokens == plain.tokens
    for name, st in plain.stats.items():
        other = sharded.stats[name]
        for field in ("x2_sum", "g2_sum"):
            assert torch.equal(getattr(st, field), getattr(other, field)), (name, field)
            assert getattr(other, field).device.type == "cpu"
        # weight gradients are reduced in float32 and re-encoded in float16 with the sum's own scale
        torch.testing.assert_close(other.grad_sum.float(), st.grad_sum.float(), rtol=2e-3,
                                   atol=2e-3 * float(st.grad_sum.float().abs().max()))
        assert other.grad_sum.device.type == "cpu"


def _collective_calls(tree: ast.AST) -> list[ast.Call]:
    names = {"all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce"}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr in names and isinstance(n.func.value, ast.Name) and n.func.value.id == "dist"]


def test_every_tensor_collective_in_the_package_is_checked() -> None:
    """Guard against a direct ``dist.all_reduce(t)`` whose tensor may sit on the wrong device."""
    calls = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        for call in _collective_calls(ast.parse(path.read_text())):
            calls += 1
            arg = call.args[0] if call.args else None
            assert (isinstance(arg, ast.Call) and getattr(arg.func, "id", None) == "check_collective"), (
                f"{path.relative_to(PACKAGE)}:{call.lineno}: pass the tensor through check_collective()")
    assert calls >= 4  # distributed.py (2) and train.py (3)

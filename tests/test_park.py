"""Parking the original weights on disk while the selection's short fine-tunes run (`autoqra.park`)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import autoqra.api as api
from autoqra import compile
from autoqra.errors import ConfigError
from autoqra.park import default_park_dir, is_memory_backed, park_on_disk
from autoqra.passes.select import SelectConfig
from tests.tiny_models import tiny_llama

CALIB = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))


def _mapping_of(t: torch.Tensor) -> str:
    """The /proc/self/maps path of the mapping holding ``t``'s data ('' for anonymous memory)."""
    addr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= addr < hi:
            return parts[5] if len(parts) > 5 else ""
    return ""


def test_parked_parameters_keep_values_identity_and_flags(tmp_path: Path) -> None:
    if is_memory_backed(tmp_path):
        pytest.skip("the temporary directory is memory-backed (tmpfs): parking is refused there")
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(33, 17, generator=gen)),
              nn.Parameter(torch.randn(5, 7, generator=gen).to(torch.bfloat16), requires_grad=False),
              nn.Parameter(torch.randn(8, 9, generator=gen).t()),  # not contiguous
              nn.Parameter(torch.randn(3, generator=gen).half())]
    before = [p.detach().clone() for p in params]
    ids = [id(p) for p in params]
    nbytes = park_on_disk([*params, params[0]], tmp_path)  # a repeated parameter is parked once
    assert nbytes >= sum(p.numel() * p.element_size() for p in params)
    assert [id(p) for p in params] == ids and list(tmp_path.iterdir()) == []  # the file is unlinked at once
    for p, b in zip(params, before, strict=True):
        assert p.dtype == b.dtype and p.shape == b.shape and torch.equal(p.detach(), b)
        assert "autoqra-parked-" in _mapping_of(p)  # file-backed now, not anonymous memory
    assert params[0].requires_grad and not params[1].requires_grad
    with torch.no_grad():  # copy-on-write: writable, the neighbours unchanged
        params[0][0, 0] = 42.0
    assert params[0][0, 0] == 42.0 and torch.equal(params[1].detach(), before[1])
    (params[0] * 2).sum().backward()
    assert torch.equal(params[0].grad, torch.full_like(params[0], 2.0))


def test_memory_backed_and_full_directories_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\ntmpfs {tmp_path} tmpfs rw 0 0\n")
    assert is_memory_backed(tmp_path / "x", str(mounts)) and not is_memory_backed("/usr", str(mounts))
    assert not is_memory_backed(tmp_path, str(tmp_path / "missing"))  # unknown: assumed disk
    monkeypatch.setattr("autoqra.park.is_memory_backed", lambda d, *a: True)
    with pytest.raises(ConfigError, match="memory-backed"):
        park_on_disk([nn.Parameter(torch.ones(4))], tmp_path)
    with caplog.at_level(logging.INFO, logger="autoqra.park"):
        assert default_park_dir(tmp_path) is None
    assert "stay in memory" in caplog.text
    monkeypatch.setattr("autoqra.park.is_memory_backed", lambda d, *a: False)
    assert default_park_dir(tmp_path) == tmp_path / "parked" and default_park_dir(None) is not None

    class Usage:
        free = 10

    monkeypatch.setattr("autoqra.park.shutil.disk_usage", lambda d: Usage())
    p = nn.Parameter(torch.ones(4))
    with caplog.at_level(logging.WARNING, logger="autoqra.park"):
        assert park_on_disk([p], tmp_path) == 0
    assert "free" in caplog.text and "autoqra-parked-" not in _mapping_of(p)
    assert park_on_disk([], tmp_path) == 0


def test_selection_parks_the_weights_and_chooses_the_same(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The short fine-tunes read the candidates' layers only: parked or not, the same scores and plan,
    and the model keeps its weights bit for bit."""
    disk = not is_memory_backed(tmp_path)
    kwargs = dict(calib=CALIB, materialize=False, progress=False, ranks=(0, 4, 8),
                  select=SelectConfig(score_steps=2, max_finetuned=3))
    model = tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    parked = compile(model, "4bits", cache_dir=tmp_path / "a", **kwargs)
    assert (parked.report["selection"]["parked_bytes"] > 0) == disk
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    if disk:
        assert "autoqra-parked-" in _mapping_of(model.model.layers[0].self_attn.q_proj.weight)
    monkeypatch.setattr(api, "default_park_dir", lambda cache: None)
    kept = compile(tiny_llama(), "4bits", cache_dir=tmp_path / "b", **kwargs)
    assert kept.report["selection"]["parked_bytes"] == 0
    assert kept.plan.layers == parked.plan.layers
    assert [c["loss_ft"] for c in kept.report["selection"]["candidates"]] == \
        [c["loss_ft"] for c in parked.report["selection"]["candidates"]]

"""`autoqra.memory`: size parsing, bad values, and that fixing glibc's mmap threshold really
returns freed activation-sized blocks to the OS (in a subprocess: the setting is process-wide)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from autoqra.errors import ConfigError
from autoqra.memory import parse_bytes, set_malloc_mmap_threshold


@pytest.mark.parametrize("text,expected", [("1MiB", 2**20), ("512KiB", 512 * 1024), ("65536", 65536),
                                           ("2MB", 2_000_000), (" 1.5 mib ", 3 * 2**19), (4096, 4096)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "1 GiB", "lots", "-1", "1e6"])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ConfigError, match="1MiB"):
        parse_bytes(bad)


def test_threshold_out_of_range():
    with pytest.raises(ConfigError, match="32 MiB"):
        set_malloc_mmap_threshold("64MiB")


PROBE = textwrap.dedent("""
    import json, re, sys
    from pathlib import Path
    import torch
    if sys.argv[1] == "fixed":
        from autoqra.memory import set_malloc_mmap_threshold
        set_malloc_mmap_threshold("1MiB")
    rss = lambda: int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    big = torch.ones(7 * 2**20)  # freeing a 28 MiB block raises glibc's dynamic threshold to it
    del big
    before = rss()
    keep, tmp = [], []
    for i in range(200):  # 2 MiB activations freed between small long-lived tensors
        tmp.append(torch.ones(2**19))
        keep.append(torch.ones(16))
    del tmp
    if sys.argv[1] == "trim":
        from autoqra.memory import trim_heap
        assert trim_heap()
    print(json.dumps({"retained_mib": rss() - before}))
""")


def _retained(mode: str) -> float:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["retained_mib"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc are Linux facilities")
def test_fixed_threshold_returns_freed_blocks():
    default, fixed = _retained("default"), _retained("fixed")
    assert default > 200  # the 400 MiB of freed 2 MiB blocks stay in the heap
    assert fixed < 50, (default, fixed)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc are Linux facilities")
def test_trim_heap_returns_the_free_blocks_between_live_ones():
    """The pass manager's `trim_heap` after each pass: the freed blocks go back to the system although
    small live tensors sit between them (what free() alone keeps)."""
    assert _retained("trim") < 50


def test_the_pass_manager_trims_the_heap_after_every_pass(monkeypatch):
    import torch
    from tiny_models import tiny_llama

    import autoqra
    import autoqra.passes.base as base

    calls: list[int] = []
    monkeypatch.setattr(base, "trim_heap", lambda: calls.append(1) or True)
    result = autoqra.compile(tiny_llama(), "8bits", calib=torch.randint(3, 100, (2, 16)), cache_dir=None,
                             progress=False, select=False)
    assert len(calls) == len(result.report["timings"]) > 3


def test_calibration_trims_the_heap_after_every_batch_and_block(monkeypatch):
    import torch
    from tiny_models import tiny_llama

    import autoqra
    import autoqra.passes.calibrate as calibrate

    calls: list[int] = []
    monkeypatch.setattr(calibrate, "trim_heap", lambda: calls.append(1) or True)
    autoqra.calibrate(tiny_llama(), torch.randint(3, 100, (5, 16)), holdout=0.0, progress=False)
    # per batch: once at its end, and after each of the 2 blocks' forward and its recomputation
    assert len(calls) == 5 * (1 + 2 * 2)


def test_find_jemalloc_explicit_and_missing(tmp_path, monkeypatch):
    from autoqra import memory
    from autoqra.errors import UnsupportedPlatformError

    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    monkeypatch.setenv("AUTOQRA_JEMALLOC", str(lib))
    assert memory.find_jemalloc() == str(lib)
    monkeypatch.setenv("AUTOQRA_JEMALLOC", str(tmp_path / "nope.so"))
    with pytest.raises(UnsupportedPlatformError, match="not a file"):
        memory.find_jemalloc()
    monkeypatch.delenv("AUTOQRA_JEMALLOC")
    monkeypatch.setattr(memory, "_JEMALLOC_GLOBS", (str(tmp_path / "none" / "*.so"),))
    with pytest.raises(UnsupportedPlatformError, match="apt install libjemalloc2"):
        memory.find_jemalloc()


def test_finetune_jemalloc_reexecs_the_same_command(monkeypatch):
    import os

    from autoqra import cli, memory

    calls = []
    monkeypatch.setattr(memory, "jemalloc_loaded", lambda: False)
    monkeypatch.setattr(memory, "find_jemalloc", lambda: "/opt/libjemalloc.so.2")
    monkeypatch.delenv("AUTOQRA_REEXEC", raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/opt/other.so")
    monkeypatch.setattr(os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
    argv = ["finetune", "out/model", "--steps", "3", "--jemalloc", "--out", "ft"]
    cli._reexec_with_jemalloc(argv)
    (exe, new_argv, env), = calls
    assert exe == sys.executable and new_argv == [sys.executable, "-m", "autoqra", *argv]
    assert env["LD_PRELOAD"] == "/opt/libjemalloc.so.2 /opt/other.so" and env["AUTOQRA_REEXEC"] == "1"
    monkeypatch.setattr(memory, "jemalloc_loaded", lambda: True)  # already loaded: no re-exec
    cli._reexec_with_jemalloc(argv)
    assert len(calls) == 1


def _installed_jemalloc():
    from autoqra.errors import UnsupportedPlatformError
    from autoqra.memory import find_jemalloc

    try:
        return find_jemalloc()
    except UnsupportedPlatformError:
        return None


@pytest.mark.skipif(_installed_jemalloc() is None, reason="jemalloc is not installed on this machine")
def test_preloaded_jemalloc_is_detected():
    code = "from autoqra.memory import jemalloc_loaded; print(jemalloc_loaded())"
    env = {**__import__("os").environ, "LD_PRELOAD": _installed_jemalloc()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "True", out.stderr[-2000:]
    plain_env = {k: v for k, v in __import__("os").environ.items() if k != "LD_PRELOAD"}
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=plain_env, timeout=60)
    assert plain.stdout.strip() == "False"


def test_reexec_that_did_not_load_jemalloc_stops_instead_of_looping(monkeypatch):
    from autoqra import cli, memory
    from autoqra.errors import UnsupportedPlatformError

    monkeypatch.setattr(memory, "jemalloc_loaded", lambda: False)
    monkeypatch.setattr(memory, "find_jemalloc", lambda: "/opt/libjemalloc.so.2")
    monkeypatch.setenv("AUTOQRA_REEXEC", "1")
    with pytest.raises(UnsupportedPlatformError, match="preloaded but is not loaded"):
        cli._reexec_with_jemalloc(["finetune", "m", "--jemalloc", "--out", "o"])


def test_sensitivity_trims_the_heap_after_every_layer(monkeypatch):
    import torch
    from tiny_models import tiny_llama

    import autoqra
    import autoqra.passes.sensitivity as sensitivity

    calls: list[int] = []
    monkeypatch.setattr(sensitivity, "trim_heap", lambda: calls.append(1) or True)
    result = autoqra.compile(tiny_llama(), "4bits", calib=torch.randint(3, 100, (4, 16)), select=False,
                             materialize=False, cache_dir=None, progress=False)
    assert len(calls) == result.report["layers"] == 2 * 7

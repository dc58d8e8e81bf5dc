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

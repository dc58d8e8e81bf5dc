"""Process memory knobs for CPU fine-tuning: glibc's mmap threshold.

PyTorch's CPU tensors come from ``malloc``. glibc serves blocks below its *mmap threshold* from the
heap and, by default, raises that threshold (up to 32 MiB) every time a larger mmapped block is
freed. A training step allocates and frees thousands of 1–30 MiB activations, so after the first
few they all come from the heap, where freed blocks are kept by the process, interleaved with
long-lived ones: the resident set (RSS) grows far above the live tensors. Measured on SmolLM2-135M
(LoRA r8, batch 4 × 256, activation checkpointing, chunked loss; benchmarks/RESULTS.md): the
compiled model's peak RSS is 2.7–3.0 GiB with the default behaviour and 1.1–1.2 GiB with the
threshold fixed at 1 MiB, for 60–70% more time per step (every large tensor is a fresh ``mmap``
whose pages fault in).

The better cure is another allocator: with jemalloc preloaded (``LD_PRELOAD``; Debian/Ubuntu
``apt install libjemalloc2``) the same run peaked at 0.96–1.0 GiB at full speed. `find_jemalloc`
locates the library; ``autoqra finetune --jemalloc`` re-executes itself with it preloaded.

`trim_heap` hands the heap's free pages back to the system (glibc's ``malloc_trim``; a no-op with
other allocators). The pass manager calls it after every pass and the selection before its short
fine-tunes: what calibration freed (its activations and weight gradients) is then not held as free
heap while the fine-tunes allocate theirs (measured on SmolLM2, see benchmarks/RESULTS.md).

`set_malloc_mmap_threshold` fixes the threshold (which also switches the dynamic adjustment off)
for the current process, like starting it with ``MALLOC_MMAP_THRESHOLD_=<bytes>``. It is a
process-wide setting, so the library never calls it on its own: ``autoqra finetune
--malloc-mmap-threshold 1MiB`` does, and so can a training script at its start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import logging
import os
import re
from pathlib import Path
from typing import Any

from autoqra.errors import ConfigError, UnsupportedPlatformError

__all__ = ["find_jemalloc", "jemalloc_loaded", "parse_bytes", "set_malloc_mmap_threshold", "trim_heap"]

logger = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
#: glibc caps the threshold at HEAP_MAX/2 (32 MiB on 64-bit) and refuses larger values
MAX_THRESHOLD = 32 * 2**20
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20}


def parse_bytes(text: str | int) -> int:
    """``"1MiB"`` → 1048576, ``"512KiB"``, ``"65536"``, ``"2MB"`` (decimal), or an int as is."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"expected a size like 1MiB, 512KiB or 1048576, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def set_malloc_mmap_threshold(nbytes: int | str) -> int:
    """Fix glibc's mmap threshold for this process (see the module docstring); returns the bytes.

    Raises:
        ConfigError: not a size in [0, 32 MiB].
        UnsupportedPlatformError: the C library is not glibc (no ``mallopt``).
    """
    value = parse_bytes(nbytes)
    if not 0 <= value <= MAX_THRESHOLD:
        raise ConfigError(f"the malloc mmap threshold must lie in [0, 32 MiB], got {value} bytes (e.g. 1MiB)")
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError) as exc:
        raise UnsupportedPlatformError(
            f"set_malloc_mmap_threshold needs glibc's mallopt, which {name} lacks ({exc}); use your allocator's "
            "own settings (e.g. jemalloc's MALLOC_CONF) instead"
        ) from exc
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, value) != 1:
        raise UnsupportedPlatformError(f"mallopt(M_MMAP_THRESHOLD, {value}) was refused by {name}")
    logger.info("malloc mmap threshold fixed at %d bytes for this process", value)
    return value


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, looked up once; None without it or when jemalloc is loaded."""
    if jemalloc_loaded():
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim_heap() -> bool:
    """Return the heap's free pages to the system (glibc ``malloc_trim(0)``); False (nothing done)
    when the C library has no ``malloc_trim`` or another allocator (jemalloc) is loaded."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


#: where distributions put jemalloc (Debian/Ubuntu multiarch, Fedora/RHEL, conda, Homebrew)
_JEMALLOC_GLOBS = (
    "/usr/lib/*-linux-gnu/libjemalloc.so*", "/usr/lib64/libjemalloc.so*", "/usr/lib/libjemalloc.so*",
    "/usr/local/lib/libjemalloc.so*", "{prefix}/lib/libjemalloc.so*",
)


def find_jemalloc() -> str:
    """Path of a jemalloc shared library to preload; ``$AUTOQRA_JEMALLOC`` wins when set.

    Raises:
        UnsupportedPlatformError: none found (the message says how to install it).
    """
    explicit = os.environ.get("AUTOQRA_JEMALLOC")
    if explicit:
        if not Path(explicit).is_file():
            raise UnsupportedPlatformError(f"AUTOQRA_JEMALLOC={explicit} is not a file")
        return explicit
    prefix = os.environ.get("CONDA_PREFIX", "/nonexistent")
    for pattern in _JEMALLOC_GLOBS:
        found = sorted(glob.glob(pattern.format(prefix=prefix)))
        if found:
            return found[0]
    raise UnsupportedPlatformError(
        "jemalloc not found: install it (Debian/Ubuntu: apt install libjemalloc2; Fedora: dnf install jemalloc; "
        "conda: conda install jemalloc) or set AUTOQRA_JEMALLOC to its .so file"
    )


def jemalloc_loaded() -> bool:
    """Whether jemalloc is mapped into this process (preloaded or linked)."""
    try:
        return "jemalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False

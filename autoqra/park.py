"""Parking weights on disk while nothing reads them (the selection's short fine-tunes).

While the selection fine-tunes its candidate plans, each candidate's quantized layers stand in
for the model's original linear layers: their fp32 weights (as large as the model: 405 MiB for
SmolLM2-135M, 28 GB for a 7B model) are only kept to be put back. `park_on_disk` writes them to
one file on a disk-backed directory, maps the file privately (copy-on-write) and points every
parameter at its slice of the mapping; the file is unlinked at once (the mapping keeps it alive
until the last parameter is gone). The values, dtypes, shapes, ``requires_grad`` flags and
``Parameter`` objects stay the same; the pages come back from the page cache or the disk when
something reads them (the rewrite drops them unread), and the kernel can reclaim them meanwhile.

A memory-backed directory (tmpfs, ramfs) would only move the bytes from the process to the page
cache, so it is refused; so is one with too little free space. Only CPU tensors are parked.

A model that transformers loaded from safetensors holds its weights in a private mapping of the
checkpoint file; that mapping goes (with all its resident pages) only once no tensor points into it,
so the selection parks every parameter and buffer of the model, not only the layers it replaces.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from autoqra.errors import ConfigError

__all__ = ["default_park_dir", "is_memory_backed", "park_on_disk"]

logger = logging.getLogger(__name__)

_ALIGN = 64  # bytes: every parameter starts at a cache-line boundary of the mapping
_MEMORY_FS = {"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"}


def is_memory_backed(directory: str | os.PathLike[str], mounts_file: str = "/proc/mounts") -> bool:
    """Whether ``directory`` lies on a file system held in memory (from ``/proc/mounts``; False when unknown)."""
    path = os.path.realpath(directory)
    best, fstype = "", ""
    try:
        with open(mounts_file) as mounts:
            for line in mounts:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) > len(best):
                    best, fstype = mount, parts[2]
    except OSError:
        return False
    return fstype in _MEMORY_FS


def default_park_dir(cache_dir: Path | None) -> Path | None:
    """Where compile parks weights: ``cache_dir/parked`` when the cache is on, else the system temporary
    directory; None (with a log line) when that is memory-backed."""
    directory = cache_dir / "parked" if cache_dir is not None else Path(tempfile.gettempdir())
    probe = directory if directory.exists() else directory.parent
    if is_memory_backed(probe):
        logger.info("%s is memory-backed: the fp32 weights stay in memory during the short fine-tunes "
                    "(pass cache_dir= on a disk to park them)", directory)
        return None
    return directory


def park_on_disk(params: Iterable[torch.Tensor], directory: str | os.PathLike[str]) -> int:
    """Move the storage of every distinct CPU tensor in ``params`` (parameters or buffers) to a private
    mapping of a file in ``directory`` (see the module docstring); returns the bytes parked (0 when
    nothing was, e.g. too little free space, logged)."""
    unique: dict[int, torch.Tensor] = {}
    for p in params:
        if p.device.type == "cpu" and p.numel() and id(p) not in unique:
            unique[id(p)] = p
    if not unique:
        return 0
    if os.name == "nt":  # an open mapping's file cannot be unlinked there: it would outlive the process
        logger.info("weights are not parked on Windows")
        return 0
    offsets: list[tuple[torch.Tensor, int]] = []
    total = 0
    for p in unique.values():
        offsets.append((p, total))
        total += -(-p.numel() * p.element_size() // _ALIGN) * _ALIGN
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if is_memory_backed(directory):
        raise ConfigError(f"{directory} is memory-backed (tmpfs/ramfs): parking weights there saves no memory; "
                         "pass a directory on a disk")
    free = shutil.disk_usage(directory).free
    if free < total + 2**30:
        logger.warning("not parking %.0f MiB of weights in %s: only %.0f MiB free", total / 2**20, directory,
                       free / 2**20)
        return 0
    fd, name = tempfile.mkstemp(prefix="autoqra-parked-", suffix=".bin", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            for p, offset in offsets:
                f.seek(offset)
                f.write(memoryview(p.detach().contiguous().view(-1).view(torch.uint8).numpy()))  # no copy
            f.truncate(total)
        mapped = torch.from_file(name, shared=False, size=total, dtype=torch.uint8)
    finally:
        os.unlink(name)  # the mapping keeps the file's pages alive; the name is gone whatever happens
    with torch.no_grad():
        for p, offset in offsets:
            nbytes = p.numel() * p.element_size()
            p.data = mapped[offset:offset + nbytes].view(p.dtype).view(p.shape)
    logger.info("parked %.0f MiB of weights in %s while they are not read", total / 2**20, directory)
    return total

"""`fork_map`: independent per-layer work over a few forked worker processes, one torch thread each.

Much of a compile's per-layer work (rounding a weight on the grid of scales, the eigenvalues of its
error's Gram matrix) is many small torch operations and small LAPACK calls, which a second torch thread
speeds up only ~1.45× (SmolLM2's layer shapes, 2-core VM). Two processes with one thread each run two
layers at once instead: the error tables of SmolLM2 took 37.6 s with 2 workers against 52.8 s in one
process with 2 threads (benchmarks/RESULTS.md), the same values to 2.4e-15 relative (LAPACK's
rounding depends on its thread count; the roundings themselves are bit-identical).

Workers are forked (Linux only), so they start with the caller's memory — the model, the calibration
statistics, an open `autoqra.quant.memo` — without copying or pickling it; only each item's result comes
back (pickled). Each worker runs one torch thread (a forked process must not reuse the parent's
OpenMP threads). ``workers``: `default_workers` when None — ``AUTOQRA_WORKERS`` if set, else torch's
thread count capped at `MAX_WORKERS` (each worker holds one layer's temporaries); 1 (or a platform
without ``fork``, or a `torch.distributed` run, which shards layers across its own processes) runs
everything in the calling process, in order, as before.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from autoqra.errors import ConfigError

__all__ = ["MAX_WORKERS", "default_workers", "fork_map", "can_fork"]

logger = logging.getLogger(__name__)

#: the default's cap: each worker holds one layer's temporaries (a 4096×14336 layer's are ~1 GB)
MAX_WORKERS = 4

_TASK: Callable[[int], Any] | None = None  # the function the forked workers call (inherited, never pickled)


def can_fork() -> bool:
    """Whether worker processes can be forked here (Linux; not under `torch.distributed`)."""
    from autoqra.distributed import rank_and_world

    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods() \
        and rank_and_world()[1] == 1


def default_workers() -> int:
    """``AUTOQRA_WORKERS`` when set, else ``min(torch.get_num_threads(), MAX_WORKERS)``."""
    value = os.environ.get("AUTOQRA_WORKERS")
    if value is None:
        return max(1, min(torch.get_num_threads(), MAX_WORKERS))
    try:
        workers = int(value)
    except ValueError:
        workers = 0
    if workers < 1:
        raise ConfigError(f"AUTOQRA_WORKERS must be a whole number >= 1, got {value!r}; unset it for the default")
    return workers


def _one_thread() -> None:
    torch.set_num_threads(1)


def _call(index: int) -> Any:
    assert _TASK is not None  # set by fork_map before the workers are forked
    return _TASK(index)


def fork_map(fn: Callable[[int], Any], n: int, workers: int | None = None) -> Iterator[Any]:
    """``fn(0), …, fn(n - 1)``, yielded in order as they finish; see the module docstring. ``fn`` may be a
    closure (it is inherited by the forked workers, not pickled); its results must pickle."""
    global _TASK
    workers = default_workers() if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an int >= 1, got {workers!r}")
    workers = min(workers, n)
    if workers <= 1 or not can_fork():
        for i in range(n):
            yield fn(i)
        return
    if _TASK is not None:
        raise ConfigError("fork_map cannot be nested: a worker's task cannot start workers of its own")
    _TASK = fn
    try:
        with multiprocessing.get_context("fork").Pool(workers, initializer=_one_thread) as pool:
            logger.debug("%d items over %d forked workers", n, workers)
            yield from pool.imap(_call, range(n), chunksize=1)
    finally:
        _TASK = None

"""`fork_map`: independent per-layer work over a few forked worker processes, one torch thread each.

Much of a compile's per-layer work (rounding a weight on the grid of scales, the eigenvalues of its
error's Gram matrix) is many small torch operations and small LAPACK calls, which a second torch thread
speeds up only ~1.45× (SmolLM2's layer shapes, 2-core VM). Two processes with one thread each run two
layers at once instead: `EstimateSensitivityPass` computed SmolLM2's error tables in 38.4–39.0 s with 2
workers against 49.7 s in one process with 2 threads (benchmarks/RESULTS.md); the values agree to float64
precision (LAPACK's rounding depends on its thread count; the roundings themselves are bit-identical).

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

__all__ = ["MAX_WORKERS", "can_fork", "default_workers", "effective_workers", "fork_map"]

logger = logging.getLogger(__name__)

#: the default's cap: each worker holds one layer's temporaries (a 4096×14336 layer's are ~1 GB)
MAX_WORKERS = 4

#: in a worker: the function it calls (handed over by the pool's initializer, which a fork does not pickle)
_TASK: Callable[[int], Any] | None = None


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


def effective_workers(workers: int | None, n: int) -> int:
    """The processes `fork_map(fn, n, workers)` uses: 1 means the calling process (no workers)."""
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an int >= 1, got {workers!r}")
    workers = min(workers, n)
    return workers if workers > 1 and can_fork() else 1


def _start_worker(fn: Callable[[int], Any]) -> None:
    global _TASK
    _TASK = fn
    torch.set_num_threads(1)


def _call(index: int) -> Any:
    if _TASK is None:  # only `_start_worker` runs `_call`'s pool
        raise ConfigError("autoqra.parallel._call runs only in a worker started by fork_map")
    return _TASK(index)


def fork_map(fn: Callable[[int], Any], n: int, workers: int | None = None) -> Iterator[Any]:
    """``fn(0), …, fn(n - 1)``, yielded in order as they finish; see the module docstring. ``fn`` may be a
    closure (the forked workers inherit it, nothing pickles it); its results must pickle."""
    workers = effective_workers(workers, n)
    if workers == 1:
        for i in range(n):
            yield fn(i)
        return
    if _TASK is not None:
        raise ConfigError("fork_map cannot be nested: a worker's task cannot start workers of its own")
    with multiprocessing.get_context("fork").Pool(workers, initializer=_start_worker, initargs=(fn,)) as pool:
        logger.debug("%d items over %d forked workers", n, workers)
        yield from pool.imap(_call, range(n), chunksize=1)

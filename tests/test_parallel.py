"""`autoqra.parallel.fork_map` and the error tables computed over worker processes: the same tables as
in one process, the workers' roundings handed to the parent's memo, bad settings refused."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import tiny_llama

import autoqra
import autoqra.passes.sensitivity as sensitivity
from autoqra.errors import ConfigError
from autoqra.parallel import can_fork, default_workers, fork_map
from autoqra.quant.memo import quant_memo

needs_fork = pytest.mark.skipif(not can_fork(), reason="worker processes are forked (Linux only)")


@needs_fork
def test_fork_map_runs_closures_in_workers_in_order() -> None:
    data = torch.arange(10.0)  # inherited by the forked workers, never pickled
    out = list(fork_map(lambda i: (float(data[i] ** 2), os.getpid(), torch.get_num_threads()), 10, workers=2))
    assert [v for v, _, _ in out] == [float(i * i) for i in range(10)]
    pids = {pid for _, pid, _ in out}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2  # computed in the workers
    assert {threads for _, _, threads in out} == {1}  # one torch thread each


def test_fork_map_with_one_worker_runs_here_in_order() -> None:
    out = list(fork_map(lambda i: (i, os.getpid()), 4, workers=1))
    assert out == [(i, os.getpid()) for i in range(4)]
    assert list(fork_map(lambda i: i, 0, workers=2)) == []


@needs_fork
def test_a_worker_error_reaches_the_caller() -> None:
    def fail(i: int) -> int:
        if i == 2:
            raise ValueError("bad item 2")
        return i

    with pytest.raises(ValueError, match="bad item 2"):
        list(fork_map(fail, 4, workers=2))


@pytest.mark.parametrize("value, words", [("0", ">= 1"), ("two", "whole number")])
def test_bad_worker_settings_are_refused(monkeypatch, value: str, words: str) -> None:
    monkeypatch.setenv("AUTOQRA_WORKERS", value)
    with pytest.raises(ConfigError, match=words):
        default_workers()
    with pytest.raises(ConfigError, match="int >= 1"):
        list(fork_map(lambda i: i, 2, workers=0))


def test_default_workers(monkeypatch) -> None:
    monkeypatch.setenv("AUTOQRA_WORKERS", "3")
    assert default_workers() == 3
    monkeypatch.delenv("AUTOQRA_WORKERS")
    assert 1 <= default_workers() <= min(torch.get_num_threads(), 4)


@needs_fork
def test_error_tables_over_workers_equal_one_process_and_fill_the_memo(monkeypatch) -> None:
    monkeypatch.setattr(sensitivity, "PARALLEL_MIN_WEIGHTS", 0)  # a tiny model: workers even so
    calib = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    results = {}
    for workers in ("1", "2"):
        monkeypatch.setenv("AUTOQRA_WORKERS", workers)
        with quant_memo(inits=False) as memo:
            result = autoqra.compile(tiny_llama(), "5bits", calib=calib, select=False, materialize=False,
                                     cache_dir=None, progress=False)
            results[workers] = (result, memo.stats())
    one, two = results["1"][0], results["2"][0]
    def workers_used(result) -> int:  # noqa: ANN001
        return next(t["info"]["workers"] for t in result.report["timings"] if t["pass"] == "EstimateSensitivityPass")

    assert workers_used(two) == 2 and workers_used(one) == 1
    graph_one, graph_two = one.program.graph, two.program.graph
    for name in graph_one.order():
        a, b = graph_one.annotation(name).error, graph_two.annotation(name).error
        assert a.keys() == b.keys()
        for key in a:  # LAPACK rounds by its thread count: equal to float64 precision
            assert b[key] == pytest.approx(a[key], rel=1e-10, abs=1e-12)
    assert one.plan.layers == two.plan.layers
    # every rounding a worker made is in the parent's memo, as if made here (same entries, same counts)
    assert results["2"][1]["entries"] == results["1"][1]["entries"] > 0
    assert results["2"][1]["misses"] == results["1"][1]["misses"]

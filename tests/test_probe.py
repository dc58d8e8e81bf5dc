"""The error tables calibrated block by block against measured held-back loss (`autoqra.passes.probe`)."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import tiny_llama

import autoqra
from autoqra.errors import AutoQRAError, ConfigError
from autoqra.ir.program import Program
from autoqra.passes import probe as probe_module
from autoqra.passes.probe import ProbeBlocksPass, ProbeConfig
from autoqra.passes.select import SelectConfig
from autoqra.passes.sensitivity import rounded_weight, weight_matrix

CALIB = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
FAST = dict(cache_dir=None, progress=False, materialize=False)
SMALL = SelectConfig(score_steps=2, max_finetuned=3)
UNPROBED = SelectConfig(score_steps=2, max_finetuned=3, probe=None)


def _tables(result) -> dict[str, dict[tuple[int, int], float]]:  # noqa: ANN001
    graph = result.program.require_graph()
    return {n: dict(graph.annotation(n).error) for n in graph.order()}


def test_each_block_s_errors_are_scaled_by_its_measured_factor() -> None:
    probed = autoqra.compile(tiny_llama(layers=3), "5bits", calib=CALIB, select=SMALL, **FAST)
    raw = _tables(autoqra.compile(tiny_llama(layers=3), "5bits", calib=CALIB, select=UNPROBED, **FAST))
    info = probed.report["error_probe"]
    assert info["bits"] == [2, 3] and info["blocks"] == 3 and info["cached"] is False
    assert probed.report["selection"] is not None
    graph = probed.program.require_graph()
    factors = info["factors"]
    # the reference is the median ratio at 3 bits: one block sits exactly on it
    assert sorted(f["3"] for f in factors.values())[1] == pytest.approx(1.0)
    for name, table in _tables(probed).items():
        block = str(graph.annotation(name).block)
        for (bits, rank), value in table.items():
            expected = 1.0 if bits == 16 else factors[block]["2" if bits == 2 else "3"]
            assert value == pytest.approx(raw[name][(bits, rank)] * expected, rel=1e-12), (name, bits, rank)
    # each measured ratio, normalized, is the factor (none clipped on this model)
    ratio = {(b, p): info["measured"][b][p] / info["predicted"][b][p] for b in factors for p in ("2", "3")}
    reference = sorted(info["measured"][b]["3"] / info["predicted"][b]["3"] for b in factors)[1]
    for b in factors:
        for p in ("2", "3"):
            assert factors[b][p] == pytest.approx(min(max(ratio[b, p] / reference, 1 / 8), 8))


def test_predicted_error_of_a_block_is_the_tables_rank0_entries() -> None:
    """`rounded_weight` rounds and weighs exactly as the tables did: the probe's prediction is their sum."""
    result = autoqra.compile(tiny_llama(), "5bits", calib=CALIB, select=UNPROBED, **FAST)
    program = result.program
    graph = program.require_graph()
    modules = dict(program.model.named_modules())
    settings = program.state["error_settings"]
    for name in graph.order():
        for bits in (2, 3, 4):
            deq, error = rounded_weight(settings, weight_matrix(modules[name], graph.layer(name)),
                                        program.state["stats"].get(name), bits)
            assert deq.shape == weight_matrix(modules[name], graph.layer(name)).shape
            assert error == pytest.approx(graph.annotation(name).error[(bits, 0)], rel=1e-12)


@pytest.mark.parametrize(
    ("bits", "probed", "expected"),
    [(2, (2, 3), "f2"), (3, (2, 3), "f3"), (4, (2, 3), "f3"), (8, (2, 3), "f3"), (16, (2, 3), "one"),
     (2, (3,), "f3"), (4, (3,), "f3"), (2, (2,), "f2"), (8, (2,), "f2")],
)
def test_which_probed_bit_width_scales_an_entry(bits, probed, expected) -> None:
    factors = {2: 0.5, 3: 2.0}
    value = ProbeBlocksPass._factor({p: factors[p] for p in probed}, bits, probed)
    assert value == {"f2": 0.5, "f3": 2.0, "one": 1.0}[expected]


@pytest.mark.parametrize(
    ("measured", "predicted", "expected"),
    [
        # the reference is the median 3-bit ratio (0.2); 2-bit ratios are read against it too
        ({0: {2: 1.0, 3: 0.1}, 1: {2: 0.4, 3: 0.2}, 2: {2: 0.6, 3: 0.6}},
         {0: {2: 1.0, 3: 1.0}, 1: {2: 1.0, 3: 1.0}, 2: {2: 1.0, 3: 1.0}},
         {0: {2: 5.0, 3: 0.5}, 1: {2: 2.0, 3: 1.0}, 2: {2: 3.0, 3: 3.0}}),
        # a loss that fell and a ratio far above the median are clipped; no prediction: factor 1
        ({0: {2: -0.1, 3: 0.1}, 1: {2: 100.0, 3: 0.1}, 2: {2: 0.5, 3: 0.1}},
         {0: {2: 1.0, 3: 1.0}, 1: {2: 1.0, 3: 1.0}, 2: {2: 0.0, 3: 1.0}},
         {0: {2: 1 / 8, 3: 1.0}, 1: {2: 8.0, 3: 1.0}, 2: {2: 1.0, 3: 1.0}}),
        # nothing measurable at the reference bit-width: the tables stay as predicted
        ({0: {2: 1.0, 3: -0.1}, 1: {2: 1.0, 3: 0.0}},
         {0: {2: 1.0, 3: 1.0}, 1: {2: 1.0, 3: 1.0}}, None),
    ],
)
def test_block_factors(measured, predicted, expected) -> None:
    factors = ProbeBlocksPass(ProbeConfig(), holdout=[])._factors(measured, predicted, (2, 3))
    if expected is None:
        assert factors is None
        return
    assert factors.keys() == expected.keys()
    for b in expected:
        for p in expected[b]:
            assert factors[b][p] == pytest.approx(expected[b][p])


def test_the_model_is_unchanged_after_the_probe_and_after_a_failure_inside_it(monkeypatch) -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    autoqra.compile(model, "5bits", calib=CALIB, select=SMALL, **FAST)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    calls = {"n": 0}
    real = probe_module.holdout_loss

    def failing(model, batches):  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] == 3:  # the fp loss, one block at 2 bits, then the next probe fails mid-way
            raise RuntimeError("out of memory (simulated)")
        return real(model, batches)

    monkeypatch.setattr(probe_module, "holdout_loss", failing)
    model = tiny_llama()
    with pytest.raises(AutoQRAError, match="out of memory"):
        autoqra.compile(model, "5bits", calib=CALIB, select=SMALL, **FAST)
    assert calls["n"] == 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "skipped"),
    [
        ({"bits": (4, 8, 16)}, "no probed bit-width in the search space"),
        ({"bits": (3,), "ranks": (8,)}, "one choice per layer: nothing to choose"),
        ({"model": "one block"}, "fewer than two repeated blocks"),
    ],
)
def test_the_probe_says_why_it_did_not_run(kwargs, skipped) -> None:
    model = tiny_llama(layers=1) if kwargs.pop("model", None) else tiny_llama()
    result = autoqra.compile(model, "12bits", calib=CALIB, select=SMALL, **FAST, **kwargs)
    assert result.report["error_probe"] == {"skipped": skipped}


def test_without_measured_loss_the_tables_stay_as_predicted(monkeypatch, caplog) -> None:
    monkeypatch.setattr(probe_module, "holdout_loss", lambda model, batches: 1.0)  # nothing ever changes
    raw = _tables(autoqra.compile(tiny_llama(), "5bits", calib=CALIB, select=UNPROBED, **FAST))
    with caplog.at_level(logging.WARNING, logger="autoqra.passes.probe"):
        result = autoqra.compile(tiny_llama(), "5bits", calib=CALIB, select=SMALL, **FAST)
    assert "no block lost measurably" in caplog.text
    assert result.report["error_probe"]["skipped"] == "no measurable loss increase at 3 bits"
    assert _tables(result) == raw


def test_probe_measurements_are_cached_with_the_selection(tmp_path, monkeypatch) -> None:
    first = autoqra.compile(tiny_llama(), "5bits", calib=CALIB, select=SMALL, cache_dir=tmp_path, progress=False,
                            materialize=False)
    assert list((tmp_path / "selection").glob("probe-*.json"))

    def no_measuring(self, *args):  # noqa: ANN001
        raise AssertionError("a cached probe measured")

    monkeypatch.setattr(ProbeBlocksPass, "_measure", no_measuring)
    again = autoqra.compile(tiny_llama(), "5bits", calib=CALIB, select=SMALL, cache_dir=tmp_path, progress=False,
                            materialize=False)
    assert again.report["error_probe"]["cached"] is True
    assert again.report["error_probe"]["factors"] == first.report["error_probe"]["factors"]
    assert again.plan.to_json() == first.plan.to_json()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ProbeConfig(bits=(16,)), "ProbeConfig.bits"),
        (lambda: ProbeConfig(bits=[2, 3]), "ProbeConfig.bits"),
        (lambda: ProbeConfig(bits=(True,)), "ProbeConfig.bits"),
        (lambda: ProbeConfig(clip=0.5), "ProbeConfig.clip"),
        (lambda: ProbeConfig(clip=float("inf")), "ProbeConfig.clip"),
        (lambda: SelectConfig(probe="yes"), "SelectConfig.probe"),
    ],
)
def test_bad_probe_settings(build, message) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


def test_probe_is_off_without_the_measured_selection() -> None:
    result = autoqra.compile(tiny_llama(), "5bits", calib=CALIB, select=False, **FAST)
    assert result.report["error_probe"] is None
    assert isinstance(result.program, Program)


@pytest.mark.parametrize(
    ("probe", "expected"),
    [
        (None, "error tables as predicted (no probe)"),
        ({"skipped": "fewer than two repeated blocks"},
         "error tables as predicted: probe skipped (fewer than two repeated blocks)"),
        ({"bits": [2, 3], "blocks": 30, "tokens": 1024, "seconds": 61.4, "cached": False,
          "factors": {"0": {"2": 0.5, "3": 1.0}, "1": {"2": 2.25, "3": 0.125}}},
         "error tables calibrated by measured loss: 30 blocks × 2/3 bits on 1,024 held-back tokens (61 s); "
         "block factors 0.12–2.25"),
        ({"bits": [2], "blocks": 2, "tokens": 64, "seconds": 0.1, "cached": True, "factors": {"0": {"2": 1.0}}},
         "error tables calibrated by measured loss: 2 blocks × 2 bits on 64 held-back tokens (from the cache); "
         "block factors 1.00–1.00"),
    ],
)
def test_probe_summary(probe, expected) -> None:
    from autoqra.report import probe_summary

    assert probe_summary(probe) == expected


@pytest.mark.parametrize("make", [lambda: tiny_llama(layers=3), "gpt2"])
def test_replaying_the_earlier_blocks_measures_the_same_as_whole_forwards(make) -> None:
    """The blocks before the probed one replay the fp forward's outputs: the same losses, to the bit."""
    if make == "gpt2":
        from tiny_models import tiny_gpt2

        def build():  # noqa: ANN202
            return tiny_gpt2()
    else:
        build = make
    result = autoqra.compile(build(), "5bits", calib=CALIB, select=UNPROBED, **FAST)
    program = result.program
    graph = program.require_graph()
    blocks: dict[int, list[str]] = {}
    for name in graph.order():
        blocks.setdefault(graph.annotation(name).block, []).append(name)
    blocks.pop(None, None)
    held = [CALIB[-2:]]
    settings = program.state["error_settings"]
    fast = ProbeBlocksPass(ProbeConfig(), holdout=held)._measure(program, settings, (2, 3), blocks)
    slow = ProbeBlocksPass(ProbeConfig(), holdout=held, prefix_cache=False)._measure(program, settings, (2, 3),
                                                                                      blocks)
    assert fast == slow
    assert len(blocks) >= 2 and all(fast[1][b][2] != 0 for b in blocks)
    # the model is as it was: no replaying forward left behind
    assert not any("forward" in vars(m) for m in program.model.modules())

"""Calibration, estimators, the search pass and `compile` (planning only; materialization is
tested with the quantized layers)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from tiny_models import MLP, tiny_gpt2, tiny_llama

from autoqra.api import compile, pareto
from autoqra.errors import BudgetInfeasibleError, ConfigError, DataError, UnknownNameError
from autoqra.ir.capture import capture
from autoqra.passes import BuildLayerGraphPass, PassManager
from autoqra.passes.calibrate import CalibratePass
from autoqra.plan import Plan
from autoqra.search.estimators import get_estimator

PLAN = dict(materialize=False, cache_dir=None, progress=False)


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def test_calibration_statistics_match_manual_mlp():
    model = MLP()
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    program = capture(model, (x[:2],))
    PassManager([BuildLayerGraphPass(), CalibratePass([x[:32], x[32:]], gradients=False, progress=False)]).run(program)
    stats = program.state["stats"]
    torch.testing.assert_close(stats["fc1"].d, x.double().pow(2).mean(0).sqrt())
    h = torch.relu(model.fc1(x)).double()
    torch.testing.assert_close(stats["fc2"].d, h.pow(2).mean(0).sqrt(), rtol=1e-5, atol=1e-6)
    assert stats["fc1"].g is None


def test_calibration_gradients_match_autograd(calib):
    model = tiny_llama()
    program = capture(model)
    PassManager([BuildLayerGraphPass(), CalibratePass(calib[:1], progress=False)]).run(program)
    name = "model.layers.1.mlp.down_proj"
    grads = {}
    mod = model.get_submodule(name)

    def keep_grad(_module, _args, out):
        out.register_hook(lambda g: grads.setdefault("g", g))

    handle = mod.register_forward_hook(keep_grad)
    model.zero_grad()
    logits = model(input_ids=calib[:1]).logits
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], calib[0, 1:], reduction="sum")
    loss.backward()
    handle.remove()
    expected = grads["g"].double().reshape(-1, 64).pow(2).mean(0).sqrt()
    torch.testing.assert_close(program.state["stats"][name].g, expected, rtol=1e-4, atol=1e-8)


def test_calibration_holds_one_half_precision_copy_per_distinct_layer_input(calib, monkeypatch):
    """q/k/v read one tensor and gate/up another: a llama block holds 4 inputs until backward, not 7,
    each as float16 codes × one scale."""
    from autoqra.scaled_half import ScaledHalf

    made: list[torch.Size] = []
    original = ScaledHalf.from_float.__func__

    def counting(cls, tensor):
        made.append(tensor.shape)
        return original(cls, tensor)

    monkeypatch.setattr(ScaledHalf, "from_float", classmethod(counting))
    model = tiny_llama()
    program = capture(model)
    PassManager([BuildLayerGraphPass(), CalibratePass(calib[:1], weight_gradients=True, progress=False)]).run(program)
    layers = len(program.graph.order())
    assert layers == 2 * 7 and len(made) == 2 * 4
    assert all(st.grad_sum is not None for st in program.state["stats"].values())


def test_calibration_weight_gradient_and_its_spectrum_match_autograd(calib):
    model = tiny_llama()
    program = capture(model)
    PassManager([BuildLayerGraphPass(), CalibratePass(calib[:2], weight_gradients=True, progress=False)]).run(program)
    name = "model.layers.1.mlp.down_proj"
    model.zero_grad()
    for row in calib[:2]:
        logits = model(input_ids=row[None]).logits
        torch.nn.functional.cross_entropy(logits[0, :-1], row[1:], reduction="sum").backward()
    st = program.state["stats"][name]
    expected = model.get_submodule(name).weight.grad / st.g_count  # the per-token mean
    scale = float(expected.abs().max())
    # float16 codes × one scale: each of the two adds rounds to 11 significant bits of the largest element
    # (the held layer inputs are float16 × scale as well: their rounding averages out over the tokens)
    torch.testing.assert_close(st.grad, expected, rtol=0, atol=2 * 2 * 2**-11 * scale)
    sv2 = st.grad_spectrum()
    torch.testing.assert_close(sv2, torch.linalg.svdvals(expected.double()) ** 2, rtol=2e-3, atol=1e-3 * float(sv2[0]))
    assert st.grad_sum is None and st.grad is None and st.grad_spectrum() is sv2  # reduced once, sum dropped


@pytest.mark.parametrize("bad", [torch.empty(0, 8, dtype=torch.long), torch.ones(3, 1, dtype=torch.long), [], "text", [torch.ones(2, 2, 2)]])
def test_bad_calibration_data(bad):
    with pytest.raises(DataError):
        CalibratePass(bad)


def test_calibration_int32_tokens_are_accepted(calib):
    result = compile(tiny_llama(), "4bits", calib=calib.to(torch.int32), **PLAN)
    # a quarter of the batches is held back to score candidate plans, the rest makes the statistics
    assert result.report["calibration_tokens"] + result.report["holdout_tokens"] == calib.numel()


def test_lora_residual_matches_svd():
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))

    def fake_quant(x, bits, importance):
        return torch.round(x * bits) / bits

    table = get_estimator("lora_residual").table(w, (2, 4, 16), (0, 4, 8), fake_quant, None, None)
    for b in (2, 4):
        s = torch.linalg.svdvals((w - fake_quant(w, b, None)).double())
        for r in (0, 4, 8):
            assert table[(b, r)] == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-6)
    assert table[(16, 0)] == 0.0 and table[(2, 0)] > table[(2, 4)] > table[(2, 8)]


@pytest.mark.parametrize("estimator", ["lora_residual", "activation_weighted", "fisher_weighted"])
def test_error_tables_decrease_with_bits_and_rank(estimator, calib):
    result = compile(tiny_llama(), "4bits", calib=calib, estimator=estimator, **PLAN)
    graph = result.program.graph
    for name in graph.order():
        err = graph.annotation(name).error
        assert err[(2, 0)] > err[(3, 0)] > err[(4, 0)] > err[(8, 0)] > err[(16, 0)] == 0.0
        assert err[(3, 0)] > err[(3, 4)] > err[(3, 8)] > err[(3, 16)]
    assert result.plan.settings["estimator"] == estimator


def test_default_estimator_depends_on_calibration(calib):
    assert compile(tiny_llama(), "4bits", **PLAN).plan.settings["estimator"] == "lora_residual"
    assert compile(tiny_llama(), "4bits", calib=calib, **PLAN).plan.settings["estimator"] == "fisher_weighted"
    with pytest.raises(ConfigError, match="calib"):
        compile(tiny_llama(), "4bits", estimator="fisher_weighted", **PLAN)


def test_plan_is_deterministic_and_round_trips(calib):
    a = compile(tiny_llama(), "3.3bits", calib=calib, **PLAN).plan
    b = compile(tiny_llama(), "3.3bits", calib=calib, **PLAN).plan
    assert a.to_json() == b.to_json()
    assert Plan.from_json(a.to_json()) == a
    assert a.total_bytes <= a.budget_bytes
    assert a.total_bytes == sum(a.layer_bytes.values())


def test_plan_from_newer_version_is_rejected(calib):
    data = compile(tiny_llama(), "4bits", **PLAN).plan.to_dict()
    data["format_version"] = 99
    with pytest.raises(ConfigError, match="newer"):
        Plan.from_dict(data)


def test_fusion_groups_share_choices(calib):
    plan = compile(tiny_llama(), "3.2bits", calib=calib, **PLAN).plan
    for i in range(2):
        p = f"model.layers.{i}."
        assert len({plan.layers[p + f"self_attn.{x}_proj"] for x in "qkv"}) == 1
        assert plan.layers[p + "mlp.gate_proj"] == plan.layers[p + "mlp.up_proj"]


def test_joint_beats_bits_only_and_rank_only(calib):
    model = tiny_llama()
    # budget: uniform 3-bit rank 4
    base = compile(model, "3bits", calib=calib, **PLAN).program.graph
    budget = sum(base.annotation(n).cost[(3, 4)] for n in base.order())
    joint = compile(model, budget, calib=calib, **PLAN).plan
    bits_only = compile(model, budget, calib=calib, ranks=(4,), **PLAN).plan
    rank_only = compile(model, budget, calib=calib, bits=(3,), **PLAN).plan
    uniform = sum(base.annotation(n).error[(3, 4)] for n in base.order())
    assert joint.predicted_error < bits_only.predicted_error <= uniform
    assert joint.predicted_error < rank_only.predicted_error <= uniform


@pytest.mark.parametrize("solver", ["exact", "greedy", "differentiable"])
def test_every_solver_plans_within_budget(solver, calib):
    plan = compile(tiny_llama(), "3.5bits", calib=calib, solver=solver, **PLAN).plan
    assert plan.total_bytes <= plan.budget_bytes
    assert plan.settings["solver"] == solver


def test_infeasible_budget_names_smallest():
    with pytest.raises(BudgetInfeasibleError, match="at least") as info:
        compile(tiny_llama(), 1000, **PLAN)
    assert info.value.min_bytes > 1000


def test_budget_above_fp16_warns_and_keeps_16_bits(caplog):
    with caplog.at_level(logging.WARNING):
        plan = compile(tiny_llama(), "1GB", **PLAN).plan
    assert {b for b, _ in plan.layers.values()} == {16}
    assert {r for _, r in plan.layers.values()} == {0}
    assert any("nothing needs compressing" in r.message for r in caplog.records)


def test_patterns_pin_and_unmatched_warn(caplog):
    with caplog.at_level(logging.WARNING):
        plan = compile(
            tiny_llama(), "6bits", patterns={r"layers\.0\.mlp": {"bits": 8}, r"down_proj": {"rank": 0}, "nothing_here": {"rank": 4}},
            **PLAN,
        ).plan
    assert plan.layers["model.layers.0.mlp.gate_proj"][0] == 8
    assert plan.layers["model.layers.0.mlp.down_proj"] == (8, 0)
    assert plan.layers["model.layers.1.mlp.down_proj"][1] == 0
    assert any("nothing_here" in r.message for r in caplog.records)
    with pytest.raises(ConfigError, match="no \\(bits, rank\\) choice"):
        compile(tiny_llama(), "4bits", patterns={"q_proj": {"bits": 5}}, **PLAN)


def test_unknown_names_list_available():
    with pytest.raises(UnknownNameError, match="available: .*exact"):
        compile(tiny_llama(), "4bits", solver="magic", **PLAN)
    with pytest.raises(UnknownNameError, match="available: .*fisher_weighted"):
        compile(tiny_llama(), "4bits", estimator="magic", **PLAN)


def test_error_cache_skips_second_estimation(tmp_path, calib):
    first = compile(tiny_llama(), "4bits", calib=calib, materialize=False, cache_dir=tmp_path, progress=False)
    second = compile(tiny_llama(), "4bits", calib=calib, materialize=False, cache_dir=tmp_path, progress=False)
    timings = [t for t in second.program.state["timings"] if t["pass"] == "EstimateSensitivityPass"]
    assert timings
    assert first.plan.to_json() == second.plan.to_json()
    assert len(list((tmp_path / "errors").glob("*.json"))) == 14


def test_error_cache_serves_a_narrower_menu_and_grows_with_a_new_one(tmp_path, calib):
    def hits(result):
        (info,) = [t["info"] for t in result.program.state["timings"] if t["pass"] == "EstimateSensitivityPass"]
        return info["cache_hits"]

    full = compile(tiny_llama(), "4bits", calib=calib, materialize=False, cache_dir=tmp_path, progress=False)
    assert hits(full) == 0
    uniform = compile(tiny_llama(), "20bits", calib=calib, bits=(3,), ranks=(8,), materialize=False,
                      cache_dir=tmp_path, progress=False)
    assert hits(uniform) == 14  # the full table holds (3, 8): nothing estimated again
    wider = compile(tiny_llama(), "4bits", calib=calib, ranks=(0, 4, 8, 16, 32, 6), materialize=False,
                    cache_dir=tmp_path, progress=False)
    assert hits(wider) == 0  # rank 6 is new: estimated, and merged into the entries
    again = compile(tiny_llama(), "20bits", calib=calib, ranks=(6,), materialize=False, cache_dir=tmp_path,
                    progress=False)
    assert hits(again) == 14
    assert len(list((tmp_path / "errors").glob("*.json"))) == 14
    fresh = compile(tiny_llama(), "4bits", calib=calib, materialize=False, cache_dir=None, progress=False)
    assert full.plan.to_json() == fresh.plan.to_json()  # a cached table gives the same plan


def test_gpt2_conv1d_plans():
    plan = compile(tiny_gpt2(), "4bits", **PLAN).plan
    assert len(plan.layers) == 8 and plan.total_bytes <= plan.budget_bytes


def test_pareto_front_monotone(calib):
    front = pareto(tiny_llama(), calib=calib, n_points=8, cache_dir=None, progress=False)
    costs = [p.cost for p in front]
    errors = [p.error for p in front]
    assert len(front) >= 4
    assert costs == sorted(costs)
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))
    assert np.isfinite(errors).all()


def test_calibration_reuse_gives_same_plan(calib):
    cal = __import__("autoqra").calibrate(tiny_llama(), calib, progress=False)
    direct = compile(tiny_llama(), "3.3bits", calib=calib, **PLAN).plan
    reused = compile(tiny_llama(), "3.3bits", calib=cal, **PLAN).plan
    assert direct.to_json() == reused.to_json()
    with pytest.raises(DataError, match="another"):
        compile(tiny_gpt2(), "4bits", calib=cal, **PLAN)


def test_rounding_defaults_and_errors(calib):
    assert compile(tiny_llama(), "4bits", calib=calib, **PLAN).plan.settings["rounding"] == "rtn"
    assert compile(tiny_llama(), "4bits", calib=calib, rounding="auto", **PLAN).plan.settings["rounding"] == "gptq"
    assert compile(tiny_llama(), "4bits", rounding="auto", **PLAN).plan.settings["rounding"] == "rtn"
    gptq = compile(tiny_llama(), "4bits", calib=calib, rounding="gptq", **PLAN)
    assert gptq.plan.settings["rounding"] == "gptq" and gptq.plan.total_bytes <= gptq.plan.budget_bytes
    with pytest.raises(ConfigError, match="needs calibration"):
        compile(tiny_llama(), "4bits", rounding="gptq", **PLAN)
    with pytest.raises(ConfigError, match="available: auto, gptq, rtn"):
        compile(tiny_llama(), "4bits", rounding="best", **PLAN)


def test_compile_keeps_only_the_statistics_it_needs(calib):
    """Bounded memory: the [in, in] second moments are collected only for gptq rounding, and compile's
    own weight gradients are dropped once plasticity is computed."""
    from autoqra import calibrate
    from autoqra.errors import ConfigError

    rtn = compile(tiny_llama(), "4bits", calib=calib, objective="finetune", select=False, **PLAN)
    stats = rtn.program.state["stats"]
    assert all(st.xtx_sum is None and st.grad_sum is None for st in stats.values())
    assert rtn.program.state["plasticity"]  # computed before the gradients were dropped
    gptq = compile(tiny_llama(), "4bits", calib=calib, rounding="gptq", select=False, **PLAN)
    assert all(st.xtx_sum is not None for st in gptq.program.state["stats"].values())
    cal = calibrate(tiny_llama(), calib, progress=False)
    assert not cal.covariance and all(st.grad_sum is not None for st in cal.stats.values())
    with pytest.raises(ConfigError, match="covariance=True"):
        compile(tiny_llama(), "4bits", calib=cal, rounding="gptq", **PLAN)
    assert all(st.grad_sum.codes.dtype == torch.float16 for st in cal.stats.values())  # half the fp32 bytes
    uniform = compile(tiny_llama(), "16bits", calib=cal, ranks=(8,), select=False, **PLAN)
    assert uniform.plan is not None and all(st.grad_sum is not None for st in cal.stats.values())  # user's: kept
    kept = compile(tiny_llama(), "4bits", calib=cal, select=False, **PLAN)
    # the tables reduced the user's gradients to their spectra, which a later compile reads
    assert kept.plan is not None and all(st.grad_sum is None and st.grad_sv2 is not None for st in cal.stats.values())
    again = compile(tiny_llama(), "4bits", calib=cal, select=False, **PLAN)
    assert again.program.state["plasticity"] == kept.program.state["plasticity"] and again.plan == kept.plan
    assert calibrate(tiny_llama(), calib, progress=False, covariance=True).covariance

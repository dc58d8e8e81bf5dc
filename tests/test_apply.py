"""`apply_plan`: a saved plan materialized later equals what compile built; mismatches are refused."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama

import autoqra
from autoqra.modules.quant_lora_linear import QuantLoRALinear
from autoqra.passes.apply import PlanMismatchError
from autoqra.passes.select import SelectConfig

CALIB = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
FAST = dict(cache_dir=None, progress=False)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(CALIB[:2]).logits


@pytest.mark.parametrize("data", [True, False])
def test_applied_plan_equals_the_compiled_model(tmp_path, data):
    calib = CALIB if data else None
    kwargs = dict(select=SelectConfig(score_steps=1, max_finetuned=2)) if data else {}
    compiled = autoqra.compile(tiny_llama(), "5bits", calib=calib, **kwargs, **FAST)
    planned = autoqra.compile(tiny_llama(), "5bits", calib=calib, materialize=False, **kwargs, **FAST)
    assert planned.plan.to_json() == compiled.plan.to_json()
    (tmp_path / "plan.json").write_text(planned.plan.to_json())
    model = tiny_llama()
    applied = autoqra.apply_plan(model, tmp_path, calib=calib, progress=False)  # the folder holding plan.json
    assert applied.model is model and applied.plan.layers == compiled.plan.layers
    assert applied.report["held_bytes"] == compiled.plan.total_bytes
    assert {n: (m.bits, m.rank) for n, m in model.named_modules() if isinstance(m, QuantLoRALinear)} == {
        n: c for n, c in compiled.plan.layers.items()}
    assert torch.equal(_logits(model), _logits(compiled.model))  # same weights, same adapter init
    autoqra.save(model, tmp_path / "m")  # saved like a compiled model, loads back to the same logits
    assert torch.equal(_logits(autoqra.load(tmp_path / "m", tiny_llama())), _logits(model))


@pytest.fixture(scope="module")
def tiny_plan() -> autoqra.Plan:
    return autoqra.compile(tiny_llama(), "5bits", materialize=False, **FAST).plan


def _edited(plan: autoqra.Plan, **changes) -> autoqra.Plan:
    data = plan.to_dict()
    for name, choice in changes.items():
        data["layers"][name.replace("__", ".")] = {"bits": choice[0], "rank": choice[1]}
    return autoqra.Plan.from_dict(data)


def test_a_plan_that_does_not_fit_is_refused_with_every_difference_and_nothing_changes(tmp_path, tiny_plan):
    plan = tiny_plan
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    cases = [
        (tiny_gpt2(), plan, "not in the plan"),  # another architecture's layers
        (tiny_llama(), _edited(plan, **{q.replace(".", "__"): (5, 4)}), "is not in its menu"),
        (tiny_llama(), _edited(plan, **{q.replace(".", "__"): (2, 0), k.replace(".", "__"): (8, 0)}),
         "different choices"),
    ]
    for model, bad, message in cases:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(PlanMismatchError, match=message):
            autoqra.apply_plan(model, bad, progress=False)
        assert not any(isinstance(m, QuantLoRALinear) for m in model.modules())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(autoqra.AutoQRAError, match="not a readable autoqra plan"):
        autoqra.apply_plan(tiny_llama(), tmp_path / "bad.json")
    with pytest.raises(autoqra.AutoQRAError, match="no plan file"):
        autoqra.apply_plan(tiny_llama(), tmp_path / "missing.json")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.update(extra=1), "unknown plan keys"),
    (lambda d: d.pop("layers"), "lacks"),
    (lambda d: d["layers"].update({"x": {"bits": "4", "rank": 0}}), "bad"),
    (lambda d: d["layers"].update({"x": {"bits": 4}}), "bad"),
    (lambda d: d.update(format_version=99), "newer"),
])
def test_a_malformed_plan_file_is_refused_by_name(edit, message, tiny_plan):
    data = tiny_plan.to_dict()
    edit(data)
    with pytest.raises(autoqra.AutoQRAError, match=message):
        autoqra.Plan.from_dict(data)


def test_pareto_honours_include_and_exclude():
    full = autoqra.pareto(tiny_llama(), n_points=3, **FAST)
    no_mlp = autoqra.pareto(tiny_llama(), n_points=3, exclude=(r"mlp",), **FAST)
    assert max(p.cost for p in no_mlp) < max(p.cost for p in full)

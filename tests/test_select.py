"""Objective, plasticity and the measured selection of plans (no regret)."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_llama

import autoqra
from autoqra.errors import AutoQRAError, ConfigError, NonFiniteLossError
from autoqra.modules.quant_lora_linear import QuantLoRALinear
from autoqra.passes.select import Candidate, SelectConfig, SelectPlanPass
from autoqra.search.plasticity import plasticity_table

CALIB = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
FAST = dict(cache_dir=None, progress=False)
SMALL = SelectConfig(score_steps=2, max_finetuned=3)


def _scores(report: dict, finetuned: bool = True) -> dict[str, float]:
    key = "loss_ft" if finetuned else "loss0"
    return {c["label"]: c[key] for c in report["selection"]["candidates"] if c[key] is not None}


def test_plasticity_is_the_gradient_energy_of_the_top_ranks() -> None:
    g = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    table = plasticity_table(g, (0, 1, 4, 64))
    sv = torch.linalg.svdvals(g.double())
    assert table[0] == 0.0
    assert table[1] == pytest.approx(float(sv[0] ** 2))
    assert table[4] == pytest.approx(float((sv[:4] ** 2).sum()))
    assert table[64] == pytest.approx(float(g.double().pow(2).sum()))  # a rank above min(out, in): all of it
    with pytest.raises(ConfigError):
        plasticity_table(torch.randn(3), (1,))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"objective": "train"}, "objective must be one of"),
        ({"objective": 3}, "objective must be one of"),
        ({"lambda_": -1.0}, "lambda_ must be"),
        ({"lambda_": "big"}, "lambda_ must be"),
        ({"lambda_": float("nan")}, "lambda_ must be"),
        ({"select": False, "lambda_": 0.5}, "drop select=False"),
        ({"select": "yes"}, "select must be"),
        ({"solver": "magic"}, "available: differentiable"),
    ],
)
def test_bad_objective_arguments_fail_before_any_work(kwargs, message) -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AutoQRAError, match=message):
        autoqra.compile(model, "5bits", calib=CALIB, **FAST, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, QuantLoRALinear) for m in model.modules())


def test_finetune_objective_needs_data_and_data_free_defaults_to_deploy() -> None:
    with pytest.raises(ConfigError, match="needs calibration data"):
        autoqra.compile(tiny_llama(), "5bits", objective="finetune", **FAST)
    result = autoqra.compile(tiny_llama(), "5bits", **FAST)
    assert result.plan.settings["objective"] == "deploy"
    assert result.report["selection"] is None


def test_selection_never_loses_to_the_uniform_plans_and_reports_the_scores() -> None:
    result = autoqra.compile(tiny_llama(), "5bits", calib=CALIB, select=SMALL, **FAST)
    selection = result.report["selection"]
    labels = [c["label"] for c in selection["candidates"]]
    assert any(label.startswith("uniform") for label in labels)
    assert any(label.startswith("finetune λ=") for label in labels) or any("also finetune" in c["note"]
                                                                         for c in selection["candidates"])
    scores = _scores(result.report)
    winner = selection["winner"]
    assert scores[winner] == min(scores.values())
    best_uniform = min(v for k, v in scores.items() if k.startswith("uniform"))
    assert scores[winner] <= best_uniform
    assert result.plan.settings["objective"] == "finetune"
    assert result.plan.total_bytes <= result.plan.budget_bytes


def test_a_dominating_channel_does_not_make_the_plan_worse_than_uniform() -> None:
    """One channel of one layer scaled up: the proxy is dominated by it; the measured choice still
    scores no worse than the best uniform plan (at step 0 for deploy, after the short fine-tune else)."""
    for objective in ("deploy", "finetune"):
        model = tiny_llama()
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[:, 3] *= 40.0
        cfg = SelectConfig(objective=objective, score_steps=2, max_finetuned=3)
        result = autoqra.compile(model, "4.5bits", calib=CALIB, objective=objective, select=cfg, **FAST)
        scores = _scores(result.report, finetuned=objective == "finetune")
        winner = result.report["selection"]["winner"]
        uniform = [v for k, v in scores.items() if k.startswith("uniform")]
        assert uniform and scores[winner] <= min(uniform)


def test_a_diverging_candidate_is_infeasible_and_the_search_goes_on(monkeypatch) -> None:
    import autoqra.train as train

    real = train.finetune
    calls = {"n": 0, "nan": 0}

    def flaky(model, data, **kwargs):  # the first short fine-tune raises, the next that trains ends in NaN
        calls["n"] += 1
        if calls["n"] == 1:
            raise NonFiniteLossError("the loss is nan at step 1", step=1, restored_step=0)
        result = real(model, data, **kwargs)
        if not calls["nan"]:
            calls["nan"] += 1
            result.losses[-1] = math.nan
        return result

    monkeypatch.setattr(train, "finetune", flaky)
    result = autoqra.compile(tiny_llama(), "5bits", calib=CALIB, select=SMALL, **FAST)
    rows = result.report["selection"]["candidates"]
    diverged = [c for c in rows if "diverged" in c["note"]]
    assert len(diverged) == 2 and all(c["loss_ft"] == math.inf for c in diverged)
    assert result.report["selection"]["winner"] not in {c["label"] for c in diverged}


def test_plan_only_selection_leaves_the_model_unchanged_and_is_deterministic() -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    a = autoqra.compile(model, "5bits", calib=CALIB, select=SMALL, materialize=False, **FAST)
    assert not any(isinstance(m, QuantLoRALinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == {k: p.requires_grad for k, p in model.named_parameters()}
    b = autoqra.compile(tiny_llama(), "5bits", calib=CALIB, select=SMALL, materialize=False, **FAST)
    assert a.plan.to_json() == b.plan.to_json()


def test_tightest_budget_has_one_plan_and_reused_calibration_scores_on_its_holdout() -> None:
    cal = autoqra.calibrate(tiny_llama(), CALIB, progress=False)
    assert cal.holdout and cal.batches and len(cal.holdout) + len(cal.batches) == CALIB.shape[0]
    result = autoqra.compile(tiny_llama(), "2.5bits", calib=cal, bits=(2,), ranks=(0,), select=SMALL, **FAST)
    assert set(result.plan.layers.values()) == {(2, 0)}
    assert result.report["selection"]["candidates"][0]["note"] == "only candidate: not measured"
    result = autoqra.compile(tiny_llama(), "5bits", calib=cal, select=SMALL, **FAST)
    assert len(result.report["selection"]["candidates"]) > 1


def test_evolutionary_front_joins_the_measured_candidates() -> None:
    result = autoqra.compile(tiny_llama(), "5bits", calib=CALIB, solver="evolutionary",
                             select=SelectConfig(score_steps=1, max_finetuned=2, lambdas=(0.5,)), **FAST)
    rows = result.report["selection"]["candidates"]
    labels = [c["label"] for c in rows] + [c["note"] for c in rows]
    assert any("front #" in text for text in labels)
    assert result.plan.settings["solver"] == "evolutionary"
    scores = _scores(result.report)
    assert scores[result.report["selection"]["winner"]] == min(scores.values())


def _cand(label: str, loss0: float, family: str = "", uniform: bool = False) -> Candidate:
    return Candidate(label=label, choices=(), bytes=0, proxy=0.0, uniform=uniform, loss0=loss0, family=family)


@pytest.mark.parametrize("cands, limit, expected", [
    # one candidate per proposal (the exact solver): the best by step-0 loss, as before
    ([_cand("u3", 4.0, uniform=True), _cand("deploy", 3.0), _cand("λ=0.5", 3.2), _cand("λ=1", 3.4)], 3, [1, 2, 0]),
    # an evolutionary λ's front points cannot crowd the other λ out: the best of each proposal first
    ([_cand("u3", 4.0, uniform=True), _cand("deploy", 3.0, "deploy"), _cand("deploy #2", 3.01, "deploy"),
      _cand("deploy #3", 3.02, "deploy"), _cand("λ=0.5", 3.3, "λ=0.5"), _cand("λ=0.5 #2", 3.31, "λ=0.5")],
     3, [1, 4, 0]),
    # spare slots go to the next best, whatever their proposal
    ([_cand("u3", 4.0, uniform=True), _cand("deploy", 3.0, "deploy"), _cand("deploy #2", 3.01, "deploy"),
      _cand("λ=0.5", 3.3, "λ=0.5")], 4, [1, 2, 3, 0]),
    # the best uniform plan always gets a slot
    ([_cand("u3", 4.0, uniform=True), _cand("u2", 5.0, uniform=True), _cand("a", 3.0), _cand("b", 3.1)], 2, [2, 0]),
    # the default (no limit): every λ value's plan, however far down step 0 ranks it (step-0 loss rises with
    # λ by construction), + the best uniform plan; the worse uniform plan and extra front points are left out
    ([_cand("u3", 3.8, uniform=True), _cand("u2", 5.4, uniform=True), _cand("deploy", 3.60, "deploy"),
      _cand("λ=0.25", 3.63, "λ=0.25"), _cand("λ=0.5", 3.62, "λ=0.5"), _cand("λ=1", 3.64, "λ=1"),
      _cand("λ=2", 3.66, "λ=2"), _cand("λ=2 #2", 3.61, "λ=2")], None, [2, 7, 4, 3, 5, 0]),
    # no uniform plan fits: the λ plans only
    ([_cand("deploy", 3.0), _cand("λ=1", 3.5)], None, [0, 1]),
])
def test_finetune_choice_takes_the_best_of_each_proposal_first(cands, limit, expected) -> None:
    assert SelectPlanPass.finetune_choice(cands, limit) == expected


def test_selection_scores_are_cached_by_model_data_and_settings(tmp_path, monkeypatch) -> None:
    from autoqra.passes.select import SelectPlanPass

    first = autoqra.compile(tiny_llama(), "5bits", calib=CALIB, select=SMALL, cache_dir=tmp_path, progress=False)
    assert first.report["selection"]["cached"] is False
    assert list((tmp_path / "selection").glob("selection-*.json"))

    def no_measuring(self, model):  # noqa: ANN001
        raise AssertionError("a cached selection measured a candidate")

    monkeypatch.setattr(SelectPlanPass, "_holdout_loss", no_measuring)
    model = tiny_llama()
    again = autoqra.compile(model, "5bits", calib=CALIB, select=SMALL, cache_dir=tmp_path, progress=False)
    assert again.report["selection"]["cached"] is True
    assert again.plan.to_json() == first.plan.to_json()
    assert again.report["selection"]["candidates"] == first.report["selection"]["candidates"]
    x = CALIB[:2]
    with torch.no_grad():
        assert torch.equal(model(x).logits, first.model(x).logits)  # the winner, built as when measured
    monkeypatch.undo()
    # another weight, other data, another λ or another budget: measured again
    changed = tiny_llama()
    with torch.no_grad():
        changed.model.norm.weight[0] += 1e-3
    other_calib = CALIB.flip(0)
    for model, kwargs in ((changed, {}), (tiny_llama(), {"calib": other_calib}),
                          (tiny_llama(), {"lambda_": 0.75}), (tiny_llama(), {"budget": "5.5bits"})):
        args = {"calib": CALIB, "select": None if "lambda_" in kwargs else SMALL, **kwargs}
        budget = args.pop("budget", "5bits")
        result = autoqra.compile(model, budget, cache_dir=tmp_path, progress=False, **args)
        assert result.report["selection"]["cached"] is False, kwargs


def test_one_rank_per_layer_skips_the_plasticity_svds() -> None:
    result = autoqra.compile(tiny_llama(), "20bits", calib=CALIB, bits=(3, 4), ranks=(8,), select=SMALL, **FAST)
    (info,) = [t["info"] for t in result.program.state["timings"] if t["pass"] == "EstimatePlasticityPass"]
    assert info["skipped"] == "one rank per layer"
    assert set(result.plan.layers.values()) <= {(3, 8), (4, 8)}
    assert result.report["selection"]["winner"]  # candidates still measured (the bits differ)


def test_scored_adapters_are_each_short_fine_tune_and_reproduce_its_score() -> None:
    """`CompileResult.scored_adapters` holds every fine-tuned candidate's adapters: loaded into the
    compiled winner they give its held-back score; `short_finetune` from the init reproduces them."""
    from autoqra.api import HOLDOUT_FRACTION, split_holdout
    from autoqra.evaluate import window_nll
    from autoqra.passes.select import short_finetune
    from autoqra.train import adapter_state, load_adapter_state

    result = autoqra.compile(tiny_llama(), "7bits", calib=CALIB, ranks=(4, 8), select=SMALL, **FAST)
    rows = {c["label"]: c for c in result.report["selection"]["candidates"]}
    tuned = {label for label, c in rows.items() if c["loss_ft"] is not None and math.isfinite(c["loss_ft"])}
    assert tuned and set(result.scored_adapters) <= tuned
    winner = result.report["selection"]["winner"]
    assert winner in result.scored_adapters
    train, held = split_holdout(CALIB, HOLDOUT_FRACTION)
    init = adapter_state(result.model)
    scored = result.scored_adapters[winner]
    assert set(scored) == set(init) and any(not torch.equal(scored[n]["lora_B"], init[n]["lora_B"]) for n in init)

    def held_loss() -> float:
        with torch.no_grad():
            nll = [window_nll(result.model.eval(), b) for b in held]
        return sum(n for n, _ in nll) / sum(c for _, c in nll)

    load_adapter_state(result.model, scored)
    assert held_loss() == pytest.approx(rows[winner]["loss_ft"], rel=1e-6)
    load_adapter_state(result.model, init)
    short_finetune(result.model, train, SMALL)
    again = adapter_state(result.model)
    assert all(torch.equal(again[n][k], scored[n][k]) for n in scored for k in ("lora_A", "lora_B"))


def test_load_adapter_state_refuses_another_plans_state_before_copying() -> None:
    from autoqra.train import adapter_state, load_adapter_state

    model = autoqra.compile(tiny_llama(), "12bits", bits=(4,), ranks=(4,), **FAST).model
    before = adapter_state(model)
    name = next(iter(before))
    other = {n: dict(v) for n, v in before.items()}
    other[name] = {"lora_A": torch.zeros(8, before[name]["lora_A"].shape[1]), "lora_B": before[name]["lora_B"]}
    fewer = {n: v for n, v in before.items() if n != name}
    for state, message in ((other, "same ranks"), (fewer, "does not match")):
        bumped = {n: {k: t + 1 for k, t in v.items()} for n, v in state.items()}
        with pytest.raises(ConfigError, match=message):
            load_adapter_state(model, bumped)
        assert all(torch.equal(adapter_state(model)[n]["lora_A"], before[n]["lora_A"]) for n in before)


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        ([(1, 32), (1, 32)], [(2, 32)]),
        ([(1, 32), (2, 16), (1, 16), (1, 32)], [(1, 32), (3, 16), (1, 32)]),
        ([(64, 32), (64, 32), (1, 32)], [(128, 32), (1, 32)]),  # 4096 tokens at most per forward
        ([(32,)], [(1, 32)]),
    ],
)
def test_held_back_windows_are_scored_in_as_few_forwards_as_fit(shapes, expected) -> None:
    held = [torch.randint(3, 100, s) for s in shapes]
    select = SelectPlanPass(None, None, SMALL, train=[], holdout=held)  # type: ignore[arg-type]
    batches = select._holdout_batches()
    assert [tuple(b.shape) for b in batches] == expected
    assert torch.equal(torch.cat([b.reshape(-1) for b in batches]), torch.cat([h.reshape(-1) for h in held]))


def test_screen_continues_the_best_and_the_best_uniform_plan_with_unchanged_scores() -> None:
    """Every fine-tuned candidate runs the screen's first steps; the best ``keep`` non-uniform plans and the
    best uniform plan continue, and their scores and adapters are those of the unscreened selection."""
    from autoqra.report import selection_table

    cfg = dict(score_steps=3, lambdas=(0.5, 1.0, 2.0))
    full = autoqra.compile(tiny_llama(), "7bits", calib=CALIB, ranks=(4, 8),
                           select=SelectConfig(screen_steps=0, **cfg), **FAST)
    screened = autoqra.compile(tiny_llama(), "7bits", calib=CALIB, ranks=(4, 8),
                               select=SelectConfig(screen_steps=1, keep=1, **cfg), **FAST)
    rows = {c["label"]: c for c in screened.report["selection"]["candidates"]}
    before = {c["label"]: c for c in full.report["selection"]["candidates"]}
    assert rows.keys() == before.keys()
    screened_rows = [c for c in rows.values() if c["loss_screen"] is not None]
    assert len(screened_rows) == len([c for c in before.values() if c["loss_ft"] is not None]) > 2
    going_on = [c for c in screened_rows if c["loss_ft"] is not None]
    assert sorted(c["uniform"] for c in going_on) == [False, True]  # keep=1 + the best uniform plan
    for c in going_on:  # continued from the pause: exactly the uninterrupted score
        assert c["loss_ft"] == before[c["label"]]["loss_ft"]
        for layer, state in screened.scored_adapters[c["label"]].items():
            assert all(torch.equal(v, full.scored_adapters[c["label"]][layer][k]) for k, v in state.items())
    stopped = [c for c in screened_rows if c["loss_ft"] is None]
    assert stopped and all("stopped after the 1-step screen" in c["note"] for c in stopped)
    best_planned = min((c for c in screened_rows if not c["uniform"]), key=lambda c: c["loss_screen"])
    assert best_planned in going_on
    assert set(screened.scored_adapters) == {c["label"] for c in going_on}
    assert screened.report["selection"]["winner"] in {c["label"] for c in going_on}
    assert "1 steps for each candidate" in screened.report["selection"]["fidelity"]
    text = selection_table(screened.report["selection"])
    assert "after 1 steps" in text and "after 3 steps" in text


@pytest.mark.parametrize("scores, keep, expected", [
    # (loss_screen, uniform) per candidate: the best `keep` non-uniform + the best uniform, in index order
    ([(3.9, True), (3.6, False), (3.5, False), (3.7, False), (4.2, True)], 2, [0, 1, 2]),
    ([(3.9, True), (3.6, False), (3.5, False), (3.7, False)], 1, [0, 2]),
    # a diverged candidate (inf) never continues, a tie goes to the earlier candidate
    ([(math.inf, True), (3.6, False), (3.6, False), (4.0, True)], 1, [1, 3]),
    # no uniform plan fits
    ([(3.6, False), (3.5, False), (3.7, False)], 2, [0, 1]),
])
def test_survivors_of_the_screen(scores, keep, expected) -> None:
    cands = [Candidate(label=f"c{i}", choices=(), bytes=0, proxy=0.0, uniform=u, loss_screen=s)
             for i, (s, u) in enumerate(scores)]
    assert SelectPlanPass.survivors(cands, list(range(len(cands))), keep) == expected


@pytest.mark.parametrize("kwargs", [{"screen_steps": -1}, {"keep": 0}, {"screen_steps": 1.5}, {"keep": True}])
def test_bad_screen_settings(kwargs) -> None:
    with pytest.raises(ConfigError, match="must be an int"):
        SelectConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "grid"),
    [
        ({}, (0.25, 0.5, 1.0, 2.0)),  # finetune: the deploy plan is not proposed (it cannot learn)
        ({"objective": "deploy"}, (0.0,)),
        ({"lambdas": (0, 1)}, (0.0, 1.0)),  # unless listed
        ({"lambda_": 0.5}, (0.5,)),
        ({"lambda_": 0.0}, (0.0,)),
    ],
)
def test_lambda_grid(kwargs, grid) -> None:
    assert SelectConfig(**kwargs).grid == grid


def test_finetune_candidates_are_the_lambda_plans_and_the_uniform_plans() -> None:
    result = autoqra.compile(tiny_llama(), "5bits", calib=CALIB, select=SMALL, **FAST, materialize=False)
    labels = [c["label"] for c in result.report["selection"]["candidates"]]
    assert not any(label.startswith("deploy") for label in labels)
    assert any(label.startswith("finetune λ=") for label in labels) and any("uniform" in label for label in labels)


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (10_000, ["uniform 2-bit r8", "uniform 3-bit r8"]),  # every rank fits: the largest common rank
        (70, ["uniform 2-bit r8", "uniform 3-bit r0"]),  # 3-bit r8 costs 80
        (59, ["uniform 2-bit r8"]),  # 3-bit r0 costs 60
        (39, ["uniform 2-bit r0"]),  # 2-bit r8 costs 40 (r16 is not offered by every group)
        (19, []),  # not even 2-bit r0 (20) fits
    ],
)
def test_uniform_candidates_take_the_largest_common_rank_that_fits(budget: int, expected: list[str]) -> None:
    from autoqra.passes.select import uniform_candidates
    from autoqra.search.problem import SearchProblem

    # two groups; the second also offers rank 16 at 2 bits, which the first does not: not a common choice
    choices = [[(2, 0), (2, 8), (3, 0), (3, 8), (16, 0)], [(2, 0), (2, 8), (2, 16), (3, 0), (3, 8), (16, 0)]]
    cost = [[10, 20, 30, 40, 160], [10, 20, 25, 30, 40, 160]]
    error = [[5.0, 4.0, 2.0, 1.0, 0.0], [5.0, 4.0, 3.5, 2.0, 1.0, 0.0]]
    problem = SearchProblem.build(["a", "b"], choices, cost, error, budget)
    got = uniform_candidates(problem)
    assert [c.label for c in got] == expected
    for cand in got:
        assert cand.uniform and cand.bytes <= budget
        assert cand.bytes == problem.evaluate([ch.index(c) for ch, c in zip(problem.choices, cand.choices, strict=True)])[0]


def _problem(budget: int):
    from autoqra.search.problem import SearchProblem

    # group "a" offers 2/3/4/8 bits, group "b" 3/4 bits only, group "c" only 16 bits (kept whatever the band)
    choices = [[(2, 0), (2, 8), (3, 0), (3, 8), (4, 0), (8, 0)], [(3, 0), (3, 8), (4, 0)], [(16, 0)]]
    cost = [[10, 20, 15, 25, 20, 40], [15, 25, 20], [50]]
    error = [[6.0, 5.0, 3.0, 2.0, 1.0, 0.1], [3.0, 2.0, 1.0], [0.0]]
    return SearchProblem.build(["a", "b", "c"], choices, cost, error, budget)


@pytest.mark.parametrize(("uniform_bits", "band"), [((), ()), ((2,), (2, 3)), ((2, 3), (3, 4)), ((4,), (4, 8)),
                                                    ((8,), (8,))])
def test_band_bits_are_the_highest_uniform_bits_and_the_next_width_up(uniform_bits, band) -> None:
    from autoqra.passes.select import band_bits

    uniform = [Candidate(label=f"uniform {b}-bit", choices=((b, 0),) * 3, bytes=0, proxy=0.0, uniform=True)
               for b in uniform_bits]
    assert band_bits(_problem(1000), uniform) == band


@pytest.mark.parametrize(("bits", "budget", "kept"), [
    ((3, 4), 1000, [[(3, 0), (3, 8), (4, 0)], [(3, 0), (3, 8), (4, 0)], [(16, 0)]]),
    ((2, 3), 1000, [[(2, 0), (2, 8), (3, 0), (3, 8)], [(3, 0), (3, 8)], [(16, 0)]]),
    ((2, 3, 4, 8), 1000, None),  # restricts nothing
    ((3, 4), 10 + 15 + 50, None),  # only a 2-bit choice of "a" fits this budget
])
def test_restrict_bits_keeps_the_band_and_the_groups_without_one(bits, budget, kept) -> None:
    from autoqra.passes.select import restrict_bits

    problem = _problem(budget)
    sub = restrict_bits(problem, bits)
    if kept is None:
        assert sub is None
        return
    assert [list(ch) for ch in sub.choices] == kept and sub.budget == budget
    for g, (ch, cost, err) in enumerate(zip(sub.choices, sub.cost, sub.error, strict=True)):
        for c, k, e in zip(ch, cost, err, strict=True):  # costs and errors follow their choice
            j = problem.choices[g].index(c)
            assert (int(k), float(e)) == (int(problem.cost[g][j]), float(problem.error[g][j]))


def test_each_lambda_also_proposes_its_band_plan_in_the_same_family() -> None:
    result = autoqra.compile(tiny_llama(), "4bits", calib=CALIB, bits=(2, 3, 4, 8), ranks=(0, 4, 8),
                             select=SMALL, **FAST)
    cands = result.report["selection"]["candidates"]
    uniform_bits = max(int(c["label"].split()[1].split("-")[0]) for c in cands if c["uniform"])
    banded = [c for c in cands if c["label"].endswith(f"{uniform_bits}–{uniform_bits + 1} bits")]
    assert banded and all(c["label"].split(",")[0] in {d["label"] for d in cands} for c in banded)
    for c in banded:
        assert {int(part.split("b×")[0]) for part in c["mix"].split(", ")} <= {uniform_bits, uniform_bits + 1}
    off = SelectConfig(score_steps=2, max_finetuned=3, band=False)
    plain = autoqra.compile(tiny_llama(), "4bits", calib=CALIB, bits=(2, 3, 4, 8), ranks=(0, 4, 8), select=off,
                            **FAST)
    assert not any("bits" in c["label"].split(",")[-1] for c in plain.report["selection"]["candidates"])
    with pytest.raises(ConfigError, match="band"):
        SelectConfig(band=1)  # type: ignore[arg-type]

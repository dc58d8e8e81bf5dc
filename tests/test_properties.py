"""Property tests (hypothesis): held bytes == cost model for random layers, every solver within budget
on random problems, plan JSON round trip; and determinism across two separate processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from autoqra.footprint import held_bytes
from autoqra.ir.cost import CostModel
from autoqra.modules.quant_lora_linear import QuantLoRALinear
from autoqra.plan import Plan
from autoqra.search import SearchProblem, available_solvers, get_solver


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    in_f=st.integers(8, 200), out_f=st.sampled_from([16, 48, 64, 128, 130]), bits=st.sampled_from([2, 3, 4, 8, 16]),
    rank=st.integers(0, 8), group=st.sampled_from([32, 64, 128]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_held_bytes_equal_the_cost_model(in_f, out_f, bits, rank, group, dtype):
    rank = min(rank, in_f, out_f)
    m = QuantLoRALinear.from_linear(nn.Linear(in_f, out_f, bias=False), bits, rank, group_size=group,
                                    adapter_dtype=dtype, loftq_iters=1)
    x = torch.randn(2, in_f, requires_grad=True)
    m(x).sum().backward()
    cost = CostModel(group_size=group, adapter_bytes=dtype.itemsize).layer_bytes(in_f, out_f, bits, rank)
    assert held_bytes(m) == cost


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), groups=st.integers(1, 12), solver=st.sampled_from(sorted(available_solvers())))
def test_every_solver_stays_within_budget(seed, groups, solver):
    rng = np.random.default_rng(seed)
    ch, co, er = [], [], []
    for _ in range(groups):
        n = int(rng.integers(1, 6))
        ch.append([(2 + i, 0) for i in range(n)])
        co.append(rng.integers(1, 500, size=n))
        er.append(rng.random(n))
    lo, hi = sum(int(k.min()) for k in co), sum(int(k.max()) for k in co)
    problem = SearchProblem.build([f"g{i}" for i in range(groups)], ch, co, er, int(lo + (hi - lo) * rng.random()))
    result = get_solver(solver)(problem, seed % 1000)
    assert result.cost <= problem.budget


@settings(max_examples=30, deadline=None)
@given(layers=st.dictionaries(st.from_regex(r"[a-z]{1,6}(\.[a-z0-9]{1,4}){0,3}", fullmatch=True),
                              st.tuples(st.sampled_from([2, 3, 4, 8, 16]), st.sampled_from([0, 4, 8, 16])),
                              min_size=1, max_size=8),
       budget=st.integers(1, 10**9))
def test_plan_json_round_trip(layers, budget):
    plan = Plan(layers=layers, total_bytes=budget // 2, budget_bytes=budget, predicted_error=0.125,
                layer_bytes={n: 1 for n in layers}, layer_error={n: 0.5 for n in layers},
                settings={"objective": "finetune", "select": {"lambdas": [0.25, 0.5]}})
    text = plan.to_json()
    assert Plan.from_json(text) == plan
    assert Plan.from_json(text).to_json() == text


_SCRIPT = """
import hashlib, sys, torch
sys.path.insert(0, {tests!r})
import autoqra
from tiny_models import tiny_llama
from autoqra.passes.select import SelectConfig
calib = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
model = tiny_llama()
result = autoqra.compile(model, "5bits", calib=calib, cache_dir=None, progress=False,
                         select=SelectConfig(score_steps=2, max_finetuned=2))
digest = hashlib.sha256()
for key, value in sorted(model.state_dict().items()):
    digest.update(key.encode()); digest.update(value.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
print(result.plan.to_json(indent=None))
print(digest.hexdigest())
"""


def test_two_processes_give_the_same_plan_and_weights(tmp_path):
    tests = str(Path(__file__).resolve().parent)
    outputs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _SCRIPT.format(tests=tests)], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(proc.stdout.strip().splitlines())
    (plan_a, *_), (plan_b, *_) = outputs
    assert json.loads(plan_a) == json.loads(plan_b) and plan_a == plan_b  # byte-identical plan JSON
    assert outputs[0][-1] == outputs[1][-1]  # identical state dicts

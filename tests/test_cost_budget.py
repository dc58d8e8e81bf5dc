"""Cost model against hand computations and property tests; Budget parsing; PassManager."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny_models import tiny_llama

from autoqra import Budget, BudgetError, CostModel, analyze, min_feasible_bytes, uniform_costs
from autoqra.config import SearchSpace
from autoqra.errors import ConfigError, PassFailedError, PassOrderError
from autoqra.ir.cost import packed_nbytes
from autoqra.passes import (
    AnnotateCostPass,
    AssignGroupsPass,
    BuildLayerGraphPass,
    PassBase,
    PassManager,
    PassResult,
)

COST_CASES = [
    # (in, out, bits, rank, g, expected)  hand-computed
    (4096, 4096, 4, 0, 64, 4096 * 4096 // 2 + 4096 * 64 * 4),
    (4096, 4096, 4, 8, 64, 4096 * 4096 // 2 + 4096 * 64 * 4 + 8 * 8192 * 4),
    (576, 576, 3, 8, 64, 576 * 576 * 3 // 8 + 576 * 9 * 4 + 8 * 1152 * 4),
    (576, 1536, 2, 0, 64, 576 * 1536 // 4 + 1536 * 9 * 4),
    (576, 192, 8, 16, 64, 576 * 192 + 192 * 9 * 4 + 16 * 768 * 4),
    (576, 576, 16, 0, 64, 576 * 576 * 2),
    (576, 576, 16, 4, 64, 576 * 576 * 2 + 4 * 1152 * 4),
    (100, 40, 4, 0, 64, 40 * 128 // 2 + 40 * 2 * 4),  # row padded to 2 groups
    (100, 40, 3, 0, 32, 40 * 128 * 3 // 8 + 40 * 4 * 4),  # 4 groups of 32
    (1536, 576, 4, 0, 128, 576 * 1536 // 2 + 576 * 12 * 4),
]


@pytest.mark.parametrize(("in_f", "out_f", "bits", "rank", "g", "expected"), COST_CASES)
def test_layer_bytes_hand_computed(in_f, out_f, bits, rank, g, expected):
    assert CostModel(group_size=g).layer_bytes(in_f, out_f, bits, rank) == expected


@given(st.integers(0, 10_000), st.sampled_from([2, 3, 4, 8]))
def test_packed_nbytes_holds_all_bits(n, bits):
    nbytes = packed_nbytes(n, bits)
    assert nbytes * 8 >= n * bits
    assert nbytes * 8 < n * bits + 24  # at most one partial 3-byte chunk of waste


@given(
    st.integers(1, 3000), st.integers(1, 3000), st.sampled_from([2, 3, 4, 8, 16]), st.integers(0, 64),
    st.sampled_from([32, 64, 128]),
)
def test_cost_monotone_in_bits_and_rank(in_f, out_f, bits, rank, g):
    cm = CostModel(group_size=g)
    cost = cm.layer_bytes(in_f, out_f, bits, rank)
    assert cost == cm.weight_bytes(in_f, out_f, bits) + cm.metadata_bytes(in_f, out_f, bits) + cm.adapter_bytes_for(in_f, out_f, rank)
    assert cm.layer_bytes(in_f, out_f, bits, rank + 1) > cost
    if bits < 8:
        assert cm.layer_bytes(in_f, out_f, {2: 3, 3: 4, 4: 8}[bits], rank) > cost
    assert cm.n_groups(in_f, out_f) == out_f * math.ceil(in_f / g)


def test_cost_table_drops_ranks_above_min_dim():
    table = CostModel().table(16, 8, (4, 16), (0, 4, 8, 16))
    assert sorted(table) == [(4, 0), (4, 4), (4, 8), (16, 0), (16, 4), (16, 8)]


@pytest.mark.parametrize("bad", [dict(group_size=0), dict(group_size=60), dict(adapter_bytes=-1)])
def test_cost_model_rejects_bad_config(bad):
    with pytest.raises(ConfigError):
        CostModel(**bad)


def test_search_space_validation():
    assert SearchSpace(bits=(4, 2, 4), ranks=(8, 0)).bits == (2, 4)
    with pytest.raises(ConfigError, match="bits"):
        SearchSpace(bits=(5,))
    with pytest.raises(ConfigError, match="ranks"):
        SearchSpace(ranks=(-1,))


BUDGETS = [
    (123456, Budget(nbytes=123456)),
    (1e6, Budget(nbytes=1_000_000)),
    ("1.5GB", Budget(nbytes=1_500_000_000)),
    ("800MiB", Budget(nbytes=800 * 2**20)),
    ("0.5 GiB", Budget(nbytes=2**29)),
    ("64kb", Budget(nbytes=64_000)),
    ("1000B", Budget(nbytes=1000)),
    ("3.25bits", Budget(bits_per_weight=3.25)),
    ("4 bit", Budget(bits_per_weight=4.0)),
    ("2e6", Budget(nbytes=2_000_000)),
]


@pytest.mark.parametrize(("text", "expected"), BUDGETS)
def test_budget_parse(text, expected):
    assert Budget.parse(text) == expected
    assert Budget.parse(Budget.parse(text)) == expected


@pytest.mark.parametrize("bad", ["", "abc", "-1GB", "0", "0bits", "1.5 parsecs", 0, -5, 1.5, True, None, [1], "nanbits"])
def test_budget_rejects_with_example(bad):
    with pytest.raises(BudgetError, match="3.25bits"):
        Budget.parse(bad)


def test_budget_resolve_bits():
    assert Budget.parse("4bits").resolve(1000) == 500
    assert Budget.parse("1MB").resolve(1000) == 10**6
    assert str(Budget.parse("3.25bits")) == "3.25 bits per weight"


def test_uniform_costs_and_min_feasible_on_llama():
    program = analyze(tiny_llama())
    graph, cm = program.graph, CostModel()
    numel = graph.total_numel()
    groups = sum(layer.out_features * math.ceil(layer.in_features / 64) for layer in graph.layers())
    assert groups == 2 * (64 + 32 + 32 + 64 + 128 + 128) + 2 * 64 * 2  # down_proj: in 128 = 2 groups/row
    (u4,) = uniform_costs(graph, cm, (4,), rank=0)
    assert u4.nbytes == numel // 2 + groups * 4
    (u16,) = uniform_costs(graph, cm, (16,), rank=0)
    assert u16.nbytes == numel * 2 and u16.bits_per_weight == 16
    assert min_feasible_bytes(graph) == uniform_costs(graph, cm, (2,), rank=0)[0].nbytes


class _Writes(PassBase):
    writes = ("stats",)

    def call(self, program):
        return PassResult()


class _ReadsStats(PassBase):
    reads = ("stats",)

    def call(self, program):
        raise RuntimeError("boom")


def test_pass_manager_checks_order_and_names_failures():
    with pytest.raises(PassOrderError, match="_ReadsStats reads"):
        PassManager([BuildLayerGraphPass(), _ReadsStats()])
    with pytest.raises(PassOrderError, match="graph"):
        PassManager([AssignGroupsPass()])
    from autoqra.ir.capture import capture

    manager = PassManager([BuildLayerGraphPass(), AssignGroupsPass(), AnnotateCostPass(), _Writes(), _ReadsStats()])
    with pytest.raises(PassFailedError, match=r"_ReadsStats failed \(passes run before it: BuildLayerGraphPass, .*_Writes\): RuntimeError: boom"):
        manager.run(capture(tiny_llama()))
    assert [t.name for t in manager.timings] == ["BuildLayerGraphPass", "AssignGroupsPass", "AnnotateCostPass", "_Writes"]


class _SneaksStats(PassBase):
    """Reads calibration statistics without declaring ``stats``."""

    reads = ("graph",)

    def call(self, program):
        program.state.get("stats")
        return PassResult()


class _WritesUndeclared(PassBase):
    reads = ("graph",)

    def call(self, program):
        program.state["plasticity"] = {}
        return PassResult()


@pytest.mark.parametrize(("bad", "words"), [(_SneaksStats, "reads program.state['stats']"),
                                            (_WritesUndeclared, "writes program.state['plasticity']")])
def test_pass_manager_enforces_declared_state(bad, words):
    from autoqra.ir.capture import capture

    with pytest.raises(PassOrderError, match=words.replace("[", r"\[").replace("]", r"\]")):
        PassManager([BuildLayerGraphPass(), bad()]).run(capture(tiny_llama()))


@pytest.mark.parametrize("tie, include, mode", [
    (False, (), "share"),            # lm_head not selected: embedding and lm_head both untouched
    (True, (), "share"),             # tied, not selected: the shared weight counts once
    (True, ("lm_head",), "keep"),    # tied lm_head quantized, kept: the embedding keeps the float weight
    (True, ("lm_head",), "share"),   # tied lm_head quantized, shared: the embedding reads its codes
    (False, ("lm_head",), "share"),  # untied lm_head quantized: its own weight is touched
])
def test_untouched_bytes_counts_each_kept_storage_once(tie, include, mode):
    from autoqra.analysis import untouched_bytes
    from autoqra.ir.capture import CaptureConfig

    model = tiny_llama(tie=tie)
    graph = analyze(model, capture_config=CaptureConfig(include=include)).graph
    modules = dict(model.named_modules())
    unique = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    total = sum(t.numel() * t.element_size() for t in unique.values())
    emb = model.model.embed_tokens.weight
    replaced = {id(modules[n].weight): modules[n].weight for n in graph.order()
                if modules[n].weight is not emb or mode == "share"}  # a weight kept for the embedding stays
    expected = total - sum(t.numel() * t.element_size() for t in replaced.values())
    assert ("lm_head" in graph.order()) is bool(include)
    assert untouched_bytes(model, graph, mode) == expected
    shared = tie and include and mode == "share"
    assert (expected >= emb.numel() * emb.element_size()) is not shared


class _NarrowGate(torch.nn.Module):
    """Two wide layers and a one-output gate read the same input (Qwen-MoE's shared expert shape)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gate_proj, self.up_proj = torch.nn.Linear(64, 128), torch.nn.Linear(64, 128)
        self.expert_gate = torch.nn.Linear(64, 1)
        self.down_proj = torch.nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h) * torch.sigmoid(self.expert_gate(x))


def test_a_narrow_layer_leaves_its_fusion_group_instead_of_limiting_it() -> None:
    import autoqra

    x = (torch.randn(2, 8, 64),)
    result = autoqra.compile(_NarrowGate(), "6bits", example_inputs=x, ranks=(0, 4, 8), objective="deploy",
                             cache_dir=None, progress=False)
    program = analyze(_NarrowGate(), x)  # capture, groups by dataflow, costs: the narrow gate split off
    assert sorted(program.graph.groups().values()) == [["down_proj"], ["expert_gate"], ["gate_proj", "up_proj"]]
    assert [t["info"]["split_from_groups"] for t in program.state["timings"]
            if t["pass"] == "AnnotateCostPass"] == [["expert_gate"]]
    chosen = result.plan.layers
    assert chosen["gate_proj"] == chosen["up_proj"] and chosen["expert_gate"][1] == 0
    program = analyze(_NarrowGate(), x, space=SearchSpace(ranks=(0, 4, 8)))
    common = set(program.graph.annotation("gate_proj").cost) & set(program.graph.annotation("up_proj").cost)
    assert {r for _, r in common} == {0, 4, 8}  # the fused wide layers keep every rank
    with pytest.raises(ConfigError, match=r"min\(in, out\) = 1.*exclude=\[.*expert_gate\$") as info:
        autoqra.compile(_NarrowGate(), "6bits", example_inputs=x, ranks=(4, 8), objective="deploy", cache_dir=None,
                        progress=False)
    assert "pinning" not in str(info.value)
    excluded = autoqra.compile(_NarrowGate(), "6bits", example_inputs=x, ranks=(4, 8), objective="deploy",
                               exclude=(r"\.?expert_gate$",), cache_dir=None, progress=False)
    assert "expert_gate" not in excluded.plan.layers and "gate_proj" in excluded.plan.layers

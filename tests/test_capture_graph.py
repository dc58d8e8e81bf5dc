"""Capture routes, layer sets, fusion groups, blocks, edges and bad inputs on tiny models."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from tiny_models import (
    MLP,
    AttentionBlock,
    DataDependent,
    NoLinear,
    OddWidth,
    SharedLayer,
    tiny_bert,
    tiny_gemma3,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_opt,
    tiny_qwen2,
)

from autoqra import CaptureConfig, LayerGraph, LayerKind, NoQuantizableLayersError, analyze
from autoqra.errors import CaptureError, UnknownNameError

GOLDEN = Path(__file__).parent / "golden" / "tiny_llama_graph.json"


def _llama_like(prefix: str = "model.layers") -> tuple[set[str], list[list[str]]]:
    layers, groups = set(), []
    for i in range(2):
        attn = [f"{prefix}.{i}.self_attn.{p}_proj" for p in "qkv"]
        mlp = [f"{prefix}.{i}.mlp.{p}_proj" for p in ("gate", "up")]
        layers |= set(attn) | set(mlp) | {f"{prefix}.{i}.self_attn.o_proj", f"{prefix}.{i}.mlp.down_proj"}
        groups += [attn, mlp]
    return layers, groups


def _gpt2() -> tuple[set[str], list[list[str]]]:
    return {f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}, []


def _opt() -> tuple[set[str], list[list[str]]]:
    layers, groups = set(), []
    for i in range(2):
        attn = [f"model.decoder.layers.{i}.self_attn.{p}_proj" for p in "qkv"]
        layers |= set(attn) | {f"model.decoder.layers.{i}.self_attn.out_proj", f"model.decoder.layers.{i}.fc1", f"model.decoder.layers.{i}.fc2"}
        groups.append(attn)
    return layers, groups


def _bert() -> tuple[set[str], list[list[str]]]:
    layers, groups = set(), []
    for i in range(2):
        p = f"encoder.layer.{i}"
        attn = [f"{p}.attention.self.{n}" for n in ("query", "key", "value")]
        layers |= set(attn) | {f"{p}.attention.output.dense", f"{p}.intermediate.dense", f"{p}.output.dense"}
        groups.append(attn)
    return layers, groups


HF_CASES = [
    ("llama", tiny_llama, _llama_like, LayerKind.LINEAR),
    ("qwen2", tiny_qwen2, _llama_like, LayerKind.LINEAR),
    ("mistral", tiny_mistral, _llama_like, LayerKind.LINEAR),
    ("gemma3", tiny_gemma3, _llama_like, LayerKind.LINEAR),
    ("gpt2", tiny_gpt2, _gpt2, LayerKind.HF_CONV1D),
    ("opt", tiny_opt, _opt, LayerKind.LINEAR),
    ("bert", tiny_bert, _bert, LayerKind.LINEAR),
]


@pytest.mark.parametrize(("name", "factory", "expected", "kind"), HF_CASES, ids=[c[0] for c in HF_CASES])
def test_hf_models_capture_with_export(name, factory, expected, kind):
    program = analyze(factory())
    graph = program.graph
    layers, groups = expected()
    assert program.route == "export"
    assert set(graph.order()) == layers
    assert {layer.kind for layer in graph.layers()} == {kind}
    fused = sorted(sorted(m) for m in graph.groups().values() if len(m) > 1)
    assert fused == sorted(sorted(g) for g in groups)
    for layer_name in graph.order():
        digits = [int(part) for part in layer_name.split(".") if part.isdigit()]
        assert graph.annotation(layer_name).block == digits[0]
    blocks = {graph.annotation(n).block for n in graph.order()}
    assert blocks == {0, 1}
    assert all(graph.layer(n).fx_node is not None for n in graph.order())
    assert graph.edges_exact


def test_block_indices_and_edges_llama():
    graph = analyze(tiny_llama()).graph
    assert graph.annotation("model.layers.0.mlp.up_proj").block == 0
    assert graph.annotation("model.layers.1.self_attn.k_proj").block == 1
    edges = set(graph.edges())
    p0 = "model.layers.0."
    for src in ("q", "k", "v"):
        assert (f"{p0}self_attn.{src}_proj", f"{p0}self_attn.o_proj") in edges
    assert (f"{p0}mlp.gate_proj", f"{p0}mlp.down_proj") in edges
    assert (f"{p0}mlp.down_proj", "model.layers.1.self_attn.q_proj") in edges
    # q does not reach down_proj without crossing o_proj / gate / up
    assert (f"{p0}self_attn.q_proj", f"{p0}mlp.down_proj") not in edges
    order = graph.order()
    assert order.index(f"{p0}self_attn.q_proj") < order.index(f"{p0}self_attn.o_proj") < order.index(f"{p0}mlp.down_proj")


@pytest.mark.parametrize("method", ["export", "fx"])
def test_plain_models_graph_routes(method):
    cfg = CaptureConfig(method=method)
    mlp = analyze(MLP(), (torch.randn(2, 32),), capture_config=cfg)
    assert mlp.route == method
    assert mlp.graph.order() == ["fc1", "fc2", "fc3"]
    assert mlp.graph.edges() == [("fc1", "fc2"), ("fc2", "fc3")]
    att = analyze(AttentionBlock(), (torch.randn(1, 4, 32),), capture_config=cfg)
    assert att.route == method
    assert att.graph.groups() == {"q+k+v": ["q", "k", "v"], "out": ["out"], "up": ["up"], "down": ["down"]}
    assert set(att.graph.edges()) == {("q", "out"), ("k", "out"), ("v", "out"), ("out", "up"), ("up", "down")}


def test_plain_model_without_inputs_uses_fx():
    program = analyze(MLP())
    assert program.route == "fx"
    assert program.attempts[0][0] == "export" and program.attempts[0][1] != "ok"


def test_untraceable_model_falls_back_to_module_tree(caplog):
    with caplog.at_level(logging.WARNING):
        program = analyze(DataDependent(), (torch.randn(2, 16),))
    assert program.route == "module_tree"
    assert [r for r, _ in program.attempts] == ["export", "fx", "module_tree"]
    assert program.graph.order() == ["a", "b", "c"]
    assert not program.graph.edges_exact
    assert any("approximate" in r.message for r in caplog.records)


def test_module_tree_groups_from_sibling_names():
    program = analyze(tiny_llama(), capture_config=CaptureConfig(method="module_tree"))
    fused = sorted(sorted(m) for m in program.graph.groups().values() if len(m) > 1)
    assert fused == sorted(sorted(g) for g in _llama_like()[1])


def test_explicit_route_failure_is_typed():
    with pytest.raises(CaptureError, match="auto"):
        analyze(DataDependent(), (torch.randn(2, 16),), capture_config=CaptureConfig(method="fx"))


def test_unknown_capture_method_lists_routes():
    with pytest.raises(UnknownNameError, match="export, fx, module_tree"):
        CaptureConfig(method="trace")


def test_no_quantizable_layer_raises():
    with pytest.raises(NoQuantizableLayersError, match="Conv2d"):
        analyze(NoLinear(), (torch.randn(1, 3, 8, 8),))


def test_only_excluded_layers_names_them():
    with pytest.raises(NoQuantizableLayersError, match="fc1"):
        analyze(MLP(), capture_config=CaptureConfig(exclude=(r"fc\d",)))


def test_shared_module_is_one_layer_called_twice():
    program = analyze(SharedLayer(), (torch.randn(2, 16),))
    assert program.graph.order() == ["inp", "shared", "out"]
    assert program.graph.layer("shared").calls == 2
    assert set(program.graph.edges()) == {("inp", "shared"), ("shared", "out")}


def test_tied_embedding_and_lm_head_are_one_weight():
    model = tiny_llama(tie=True)
    program = analyze(model, capture_config=CaptureConfig(include=("lm_head", "embed_tokens")))
    layer = program.graph.layer("model.embed_tokens")
    assert layer.tied == ("lm_head",)
    assert layer.kind is LayerKind.EMBEDDING
    assert "lm_head" not in program.graph
    # counted once: per block q (64x64), k and v (32x64 each, 2 kv heads), o (64x64), 3 MLP (64x128)
    decoder = 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 64 * 128)
    assert program.graph.total_numel() == decoder + 128 * 64
    untied = analyze(tiny_llama(tie=False), capture_config=CaptureConfig(include=("lm_head", "embed_tokens"))).graph
    assert untied.total_numel() == program.graph.total_numel() + 128 * 64


def test_lm_head_and_embeddings_excluded_by_default_includable():
    program = analyze(tiny_llama())
    assert set(program.skipped) == {"model.embed_tokens", "lm_head"}
    with_head = analyze(tiny_llama(), capture_config=CaptureConfig(include=("lm_head",)))
    assert "lm_head" in with_head.graph
    assert with_head.graph.order()[-1] == "lm_head"


def test_meta_device_model_costs_without_weights():
    with torch.device("meta"):
        model = tiny_llama()
    program = analyze(model)
    assert len(program.graph) == 14
    name = "model.layers.0.mlp.down_proj"
    assert program.graph.annotation(name).cost[(4, 8)] == 128 * 64 // 2 + 64 * 2 * 4 + 8 * (128 + 64) * 4


def test_odd_width_layer_is_padded_in_cost():
    program = analyze(OddWidth(), (torch.randn(2, 100),))
    cost = program.graph.annotation("proj").cost
    # in=100 → 2 groups of 64 per row (128 padded values), out=40
    assert cost[(4, 0)] == 40 * 128 // 2 + 40 * 2 * 4
    assert cost[(3, 0)] == (40 * 128 // 8) * 3 + 40 * 2 * 4
    assert cost[(16, 0)] == 40 * 100 * 2


def test_graph_json_round_trip_and_golden():
    graph = analyze(tiny_llama()).graph
    text = graph.to_json()
    again = LayerGraph.from_json(text)
    assert again.to_json() == text
    assert again.order() == graph.order()
    assert json.loads(text) == json.loads(GOLDEN.read_text()), "layer graph changed: regenerate tests/golden if intended"


def test_graph_is_deterministic():
    assert analyze(tiny_llama()).graph.to_json() == analyze(tiny_llama()).graph.to_json()


def test_graph_json_rejects_other_version():
    data = json.loads(analyze(MLP()).graph.to_json())
    data["format_version"] = 99
    with pytest.raises(Exception, match="format version"):
        LayerGraph.from_dict(data)


def test_a_recent_capture_of_the_same_structure_is_reused(monkeypatch):
    """Weights do not shape the graph: a deep copy or a re-weighted model reuses the traced graph (same layer
    graph as a fresh trace); another structure, a hook, a patched forward or reuse=False traces again."""
    import copy
    from collections import OrderedDict

    from autoqra.ir import capture
    from autoqra.ir.capture import structure_key

    monkeypatch.setattr(capture, "_RECENT", OrderedDict())  # nothing kept from earlier tests
    model = tiny_llama()
    first = analyze(model)
    assert first.attempts[-1] == ("export", "ok")
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    again = analyze(other)
    assert again.attempts[-1] == ("export", "ok (reused)") and again.graph_module is first.graph_module
    assert again.model is other
    fresh = analyze(other, capture_config=CaptureConfig(reuse=False))
    assert fresh.attempts[-1] == ("export", "ok") and fresh.graph_module is not first.graph_module
    assert again.graph.to_json() == fresh.graph.to_json() == first.graph.to_json()
    # nothing is held: no parameter or buffer of the captured model stays reachable from the kept graph
    held = {id(t) for t in first.graph_module.parameters()} | {id(t) for t in first.graph_module.buffers()}
    assert not held & {id(p) for p in model.parameters()}
    # what changes the graph changes the key
    args, kwargs = (), {"input_ids": torch.ones(1, 8, dtype=torch.long), "use_cache": False}
    names = set(first.layer_names)
    key = structure_key(model, args, kwargs, names, "auto")
    assert key == structure_key(other, args, kwargs, names, "auto")
    assert key != structure_key(tiny_llama(layers=3), args, kwargs, names, "auto")
    assert key != structure_key(model, args, {**kwargs, "input_ids": torch.ones(1, 9, dtype=torch.long)},
                                names, "auto")
    other.config._attn_implementation = "eager" if model.config._attn_implementation != "eager" else "sdpa"
    assert key != structure_key(other, args, kwargs, names, "auto")
    handle = model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: o)
    assert structure_key(model, args, kwargs, names, "auto") is None
    handle.remove()
    model.model.norm.forward = lambda x: x
    assert structure_key(model, args, kwargs, names, "auto") is None


def test_capture_reuse_must_be_a_bool():
    from autoqra.errors import ConfigError

    with pytest.raises(ConfigError, match="reuse must be True or False"):
        CaptureConfig(reuse="no")

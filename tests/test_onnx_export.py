"""ONNX export: MatMulNBits from the packed codes, the KV-cache graph, verification, the model unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
from tiny_models import tiny_gemma3, tiny_gpt2, tiny_llama, tiny_qwen2  # noqa: E402

from autoqra.errors import ConfigError, ExportError, ExportVerificationError  # noqa: E402
from autoqra.export import export_onnx  # noqa: E402
from autoqra.export.decoder import decoder_shape  # noqa: E402
from autoqra.export.layers import OnnxQuantLinear, container_bytes  # noqa: E402
from autoqra.export.verify import _feeds, compare_tokens, exact_reference, session  # noqa: E402
from autoqra.modules.quant_lora_linear import QuantLoRALinear  # noqa: E402
from autoqra.quant.pack import pack  # noqa: E402

HAS_GENAI = __import__("importlib").util.find_spec("onnxruntime_genai") is not None


def _compiled(model: nn.Module, bits_cycle=(2, 3, 4, 8, 16), rank_cycle=(0, 4)) -> nn.Module:
    """Every linear layer (Linear or GPT-2 Conv1D) → QuantLoRALinear, bits and ranks cycling, with
    non-zero adapters (as after fine-tuning)."""
    from autoqra.modules.quant_lora_linear import _is_hf_conv1d

    i = 0
    gen = torch.Generator().manual_seed(0)
    for _, parent in list(model.named_modules()):
        for cname, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) or _is_hf_conv1d(child):
                layer = QuantLoRALinear.from_linear(child, bits_cycle[i % len(bits_cycle)],
                                                    rank_cycle[i % len(rank_cycle)])
                if layer.rank:
                    with torch.no_grad():
                        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
                setattr(parent, cname, layer)
                i += 1
    return model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _optimized(path, out) -> onnx.GraphProto:
    """The graph onnxruntime runs (its optimizer's output, written to ``out``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(out)).graph


# -- the layer: what the graph computes equals the compiled layer ------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("rank", [0, 4])
@pytest.mark.parametrize("in_features", [64, 96])
def test_export_layer_matches_compiled_layer(bits: int, rank: int, in_features: int) -> None:
    torch.manual_seed(bits + rank)
    linear = nn.Linear(in_features, 128)
    layer = QuantLoRALinear.from_linear(linear, bits, rank)
    if rank:
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.05)
    x = torch.randn(3, 5, in_features)
    with torch.no_grad(), exact_reference(layer):
        ref = layer(x)
    export = OnnxQuantLinear(layer, name="l", adapters="separate", accuracy_level=0, dtype=torch.float32)
    with torch.no_grad():
        got = export(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits, rank, in_features", [(2, 4, 96), (3, 4, 96), (4, 0, 64), (4, 4, 96), (8, 4, 96)])
def test_one_op_layer_translates_to_the_same_numbers_in_onnxruntime(tmp_path, bits, rank, in_features) -> None:
    """``autoqra::quant_linear`` (the whole layer as one traced op) → MatMulNBits + side path + bias in the
    file; onnxruntime's output equals the compiled layer's (also when ``in`` is not a multiple of the group)."""
    from autoqra.export.ops import onnx_translation_table

    torch.manual_seed(bits + in_features)
    layer = QuantLoRALinear.from_linear(nn.Linear(in_features, 48), bits, rank)
    if rank:
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.05)
    export = OnnxQuantLinear(layer, name="l", adapters="separate", accuracy_level=0, dtype=torch.float32).eval()
    x = torch.randn(2, 5, in_features)
    program = torch.onnx.export(export, (x,), dynamo=True, custom_translation_table=onnx_translation_table(),
                                input_names=["x"], output_names=["y"], optimize=False, verbose=False,
                                dynamic_shapes=({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},))
    program.save(str(tmp_path / "layer.onnx"))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "layer.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 1 and ("Pad" in ops) == (in_features % 64 != 0)
    with torch.no_grad(), exact_reference(layer):
        for shape in ((2, 5), (1, 3)):
            xi = torch.randn(*shape, in_features)
            got = session(tmp_path / "layer.onnx").run(["y"], {"x": xi.numpy()})[0]
            torch.testing.assert_close(torch.from_numpy(got), layer(xi), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits, zp_bytes_per_row", [(2, 1), (3, 2), (4, 2), (8, 3)])
def test_fractional_zero_points_split_into_uint8_and_an_exact_fraction(bits, zp_bytes_per_row) -> None:
    """onnxruntime's fast kernels take uint8 zero points: round(zero) packed per row + the fp16 rest."""
    layer = QuantLoRALinear.from_linear(nn.Linear(192, 64), bits, 0)  # 3 groups a row
    export = OnnxQuantLinear(layer, name="l", adapters="separate", accuracy_level=0, dtype=torch.float32)
    assert export.zero_points.dtype == torch.uint8 and export.zero_points.numel() == 64 * zp_bytes_per_row
    assert export.scales.dtype == torch.float16  # as in autoqra's format: the file does not double them
    fraction = export.zero_fraction
    assert fraction is not None and fraction.dtype == torch.float16 and fraction.abs().max() <= 0.5
    kb = 4 if bits == 3 else bits
    integer = layer.zero.float().round().clamp(0, (1 << kb) - 1)
    assert torch.equal(integer + fraction.float(), layer.zero.float())  # the split loses nothing


def test_three_bit_container_cost_is_a_third_of_the_codes() -> None:
    layer = QuantLoRALinear.from_linear(nn.Linear(128, 64), 3, 0)
    assert container_bytes(layer) == 64 * 128 // 2 - layer.packed_qweight().numel()
    assert container_bytes(layer) * 3 == layer.packed_qweight().numel()
    assert container_bytes(QuantLoRALinear.from_linear(nn.Linear(128, 64), 4, 0)) == 0


def test_packed_layout_is_matmulnbits_layout() -> None:
    """Two 4-bit codes per byte, low nibble first: autoqra's packing is MatMulNBits's blob."""
    codes = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [0x21, 0x43]
    assert pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]


# -- whole models ------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2, tiny_gpt2, tiny_gemma3],
                         ids=["llama", "qwen2", "gpt2", "gemma3-sliding-window"])
def test_export_with_past_runs_and_decodes(tmp_path, factory) -> None:
    model = _compiled(factory())
    before = _state(model)
    types = {n: type(m) for n, m in model.named_modules()}
    result = export_onnx(model, tmp_path / "onnx", accuracy_level=0)
    p = result.parity
    assert p.max_rel < 1e-4 and p.tokens_checked == 16 and p.tokens_matched == 16
    if HAS_GENAI:
        assert p.genai_tokens_match is True
    # the model is exactly as before
    assert {n: type(m) for n, m in model.named_modules()} == types
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the files
    assert (tmp_path / "onnx" / "model.onnx").is_file() and (tmp_path / "onnx" / "genai_config.json").is_file()
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    n_quant = sum(isinstance(m, QuantLoRALinear) and m.bits != 16 for m in model.modules())
    # layers that read one input with the same kernel run as one MatMulNBits, split after
    fused = [len(n.output) for n in graph.node if n.op_type == "Split" and n.name.startswith("autoqra_fused")]
    assert len(fused) == result.fused_groups and all(size >= 2 for size in fused)
    assert ops.count("MatMulNBits") == n_quant - sum(size - 1 for size in fused)
    nbits = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert nbits == {2, 4, 8}  # 3-bit layers run in the 4-bit container
    levels = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {0}
    assert not any(n.metadata_props for n in graph.node)  # no stack traces / local paths shipped
    scales = [i for i in graph.initializer if i.name.endswith(".scales")]
    assert scales and all(i.data_type == onnx.TensorProto.FLOAT16 for i in scales)  # not doubled to fp32
    names = {i.name for i in graph.initializer}
    assert any(n.endswith(".lora_A_t") for n in names) and any(n.endswith(".lora_B_t") for n in names)
    # the zero-point fraction shares the adapter's second MatMul; after onnxruntime's optimizer the group
    # sums are computed once per distinct layer input (q/k/v share theirs), not once per layer
    optimized = _optimized(tmp_path / "onnx" / "model.onnx", tmp_path / "optimized.onnx")
    inputs = {n.input[0] for n in optimized.node if n.op_type == "MatMulNBits"}
    assert sum(n.op_type == "ReduceSum" for n in optimized.node) <= len(inputs)
    config = json.loads((tmp_path / "onnx" / "genai_config.json").read_text())
    inputs = {i.name for i in graph.input}
    assert config["model"]["decoder"]["inputs"]["past_key_names"] % 0 in inputs
    assert config["model"]["decoder"]["num_hidden_layers"] == decoder_shape(model).layers
    report = json.loads((tmp_path / "onnx" / "export_report.json").read_text())
    assert report["parity"]["tokens_matched"] == 16


def test_export_without_past_has_dynamic_batch_and_length(tmp_path) -> None:
    model = _compiled(tiny_llama())
    export_onnx(model, tmp_path / "plain", with_past=False, accuracy_level=0)
    sess = session(tmp_path / "plain" / "model.onnx")
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    for batch, seq in ((1, 3), (4, 21)):
        ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(batch))
        got = sess.run(["logits"], _feeds(ids, None, np.dtype("float32")))[0]
        with torch.no_grad(), exact_reference(model):
            ref = model(input_ids=ids).logits.numpy()
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


def _logits(path, ids: torch.Tensor) -> np.ndarray:
    return session(path).run(["logits"], _feeds(ids, None, np.dtype("float32")))[0]


def _zeroed(path, out, name: str):
    """A copy of the ONNX file at ``path`` with the initializer ``name`` set to zeros (an adapter swapped)."""
    model = onnx.load(str(path))
    (init,) = [i for i in model.graph.initializer if i.name == name]
    zeros = np.zeros_like(onnx.numpy_helper.to_array(init))
    init.CopyFrom(onnx.numpy_helper.from_array(zeros, name))
    onnx.save(model, str(out))
    return out


@pytest.mark.parametrize("bits_cycle, rank_cycle", [((4,), (4,)), ((3, 4), (0, 4, 8))],
                         ids=["uniform 4-bit r4", "3-bit in the 4-bit container beside 4-bit, ranks 0/4/8"])
def test_layers_that_share_an_input_fuse_into_one_matmulnbits(tmp_path, bits_cycle, rank_cycle) -> None:
    model = _compiled(tiny_llama(), bits_cycle, rank_cycle)
    blocks = model.config.num_hidden_layers
    fused = export_onnx(model, tmp_path / "fused", with_past=False, accuracy_level=0)
    plain = export_onnx(model, tmp_path / "plain", with_past=False, accuracy_level=0, fuse_layers=False)
    assert (fused.fused_groups, plain.fused_groups) == (2 * blocks, 0)  # q/k/v and gate/up in every block
    graphs = {name: onnx.load(str(r.model_file)).graph for name, r in (("fused", fused), ("plain", plain))}
    n_quant = sum(isinstance(m, QuantLoRALinear) for m in model.modules())
    counts = {name: sum(n.op_type == "MatMulNBits" for n in g.node) for name, g in graphs.items()}
    assert counts == {"plain": n_quant, "fused": n_quant - 3 * blocks}
    # every layer's tensors stay in the file under their own names (adapters swappable), nothing doubled
    names = {name: {i.name for i in g.initializer if i.name.startswith("model.")} for name, g in graphs.items()}
    assert names["fused"] == names["plain"]
    assert abs(fused.file_bytes - plain.file_bytes) < 0.01 * plain.file_bytes
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    got, ref = _logits(fused.model_file, ids), _logits(plain.model_file, ids)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5
    # swapping one fused member's adapter in the file acts as it does in the unfused file
    member = next(f"model.{n}.lora_B_t" for n, m in model.named_modules()
                  if isinstance(m, QuantLoRALinear) and m.rank and n.endswith(("k_proj", "v_proj")))
    swapped = {name: _logits(_zeroed(r.model_file, tmp_path / f"{name}_swapped.onnx", member), ids)
               for name, r in (("fused", fused), ("plain", plain))}
    assert np.abs(swapped["fused"] - swapped["plain"]).max() / np.abs(ref).max() < 1e-5
    assert np.abs(swapped["fused"] - got).max() / np.abs(ref).max() > 1e-4


def test_fast_accuracy_level_within_its_tolerance(tmp_path) -> None:
    model = _compiled(tiny_llama())
    result = export_onnx(model, tmp_path / "fast", accuracy_level=4, verify_genai=False)
    graph = onnx.load(str(tmp_path / "fast" / "model.onnx")).graph
    levels = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    assert 0 < result.parity.max_rel <= result.parity.tolerance


def test_large_weights_go_to_external_data(tmp_path, monkeypatch) -> None:
    """Past the protobuf limit the weights go to ``model.onnx.data`` (threshold lowered to exercise it)."""
    import autoqra.export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "_EXTERNAL_DATA_BYTES", 0)
    model = _compiled(tiny_llama())
    result = export_onnx(model, tmp_path / "big", accuracy_level=0, verify_genai=True)
    assert "model.onnx.data" in result.files
    proto = onnx.load(str(tmp_path / "big" / "model.onnx"), load_external_data=False)
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert any(name.endswith("qweight") or "lora" in name for name in external)
    assert (tmp_path / "big" / "model.onnx").stat().st_size < (tmp_path / "big" / "model.onnx.data").stat().st_size
    assert result.parity.max_rel < 1e-3 and result.parity.genai_tokens_match  # runs, from the external data


def test_plain_model_exports_as_float(tmp_path) -> None:
    result = export_onnx(tiny_llama(), tmp_path / "fp32", verify_genai=False)
    graph = onnx.load(str(tmp_path / "fp32" / "model.onnx")).graph
    assert "MatMulNBits" not in {n.op_type for n in graph.node}
    assert result.parity.max_rel < 1e-4 and result.layers == {}


def test_merged_adapters(tmp_path) -> None:
    sixteen = _compiled(tiny_llama(), bits_cycle=(16,), rank_cycle=(4,))
    result = export_onnx(sixteen, tmp_path / "merged", adapters="merged", accuracy_level=0, verify_genai=False)
    names = {i.name for i in onnx.load(str(tmp_path / "merged" / "model.onnx")).graph.initializer}
    assert not any("lora_" in n for n in names)
    assert result.parity.max_rel < 1e-4
    quantized = _compiled(tiny_llama(), bits_cycle=(4,), rank_cycle=(4,))
    before = _state(quantized)
    with pytest.raises(ExportError, match="adapters='separate'"):
        export_onnx(quantized, tmp_path / "refused", adapters="merged")
    assert not (tmp_path / "refused").exists()
    assert all(torch.equal(before[k], v) for k, v in quantized.state_dict().items())
    assert all(type(m) is not OnnxQuantLinear for m in quantized.modules())


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(adapters="fused"), ConfigError, "adapters must be one of"),
        (dict(accuracy_level=7), ConfigError, "accuracy_level must be one of"),
        (dict(rtol=0), ConfigError, "rtol must be > 0"),
        (dict(decode_steps=-1), ConfigError, "decode_steps"),
        (dict(with_past=False, verify_genai=True), ConfigError, "with_past=True"),
        (dict(fuse_layers="yes"), ConfigError, "fuse_layers must be True or False"),
        (dict(attention="flash"), ConfigError, "attention must be one of"),
        (dict(genai_threads=0), ConfigError, "genai_threads must be None or an int >= 1"),
        (dict(genai_threads=True), ConfigError, "genai_threads must be None or an int >= 1"),
        (dict(genai_threads=2.0), ConfigError, "genai_threads must be None or an int >= 1"),
        (dict(genai_threads=2, with_past=False), ConfigError, "genai_threads needs with_past=True"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error, words) -> None:
    model = _compiled(tiny_llama())
    with pytest.raises(error, match=words):
        export_onnx(model, tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_bf16_model_exports_in_float32_and_is_left_as_it_was(tmp_path) -> None:
    model = _compiled(tiny_llama()).to(torch.bfloat16)
    before = {k: (v.dtype, v.clone()) for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    result = export_onnx(model, tmp_path / "bf16", accuracy_level=0)
    assert result.parity.max_rel < 1e-4 and result.parity.tokens_matched == 16  # exact against the widened weights
    after = model.state_dict()
    assert all(after[k].dtype == d and torch.equal(after[k], v) for k, (d, v) in before.items())
    assert all(p is params[n] for n, p in model.named_parameters())
    sess = session(tmp_path / "bf16" / "model.onnx")
    assert {i.type for i in sess.get_inputs() if i.name.startswith("past")} == {"tensor(float)"}
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    got = sess.run(["logits"], _feeds(ids, decoder_shape(model), np.dtype("float32")))[0]
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float().numpy()  # the bf16 model itself: bf16 rounding apart
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.05


def test_mixed_dtype_model_is_refused_with_the_fix(tmp_path) -> None:
    model = _compiled(tiny_llama())
    model.model.norm.to(torch.bfloat16)
    with pytest.raises(ExportError, match=r"model\.float\(\)"):
        export_onnx(model, tmp_path / "mixed")


def test_code_book_layers_are_refused(tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    model = tiny_llama()
    model.model.layers[0].mlp.up_proj = QuantLoRALinear.from_linear(model.model.layers[0].mlp.up_proj, 4, 0,
                                                                    backend="bnb")
    with pytest.raises(ExportError, match="backend='packed'"):
        export_onnx(model, tmp_path / "nf4")


def test_verification_failure_keeps_the_files_marked_as_failed(tmp_path) -> None:
    model = _compiled(tiny_llama())
    with pytest.raises(ExportVerificationError, match="accuracy_level=0") as info:
        export_onnx(model, tmp_path / "strict", accuracy_level=4, rtol=1e-9)
    kept = tmp_path / "strict.failed"
    assert not (tmp_path / "strict").exists() and not list(tmp_path.glob(".strict*"))  # the target is untouched
    assert info.value.directory == kept and str(kept) in str(info.value)
    assert info.value.measured["max_rel"] > info.value.measured["tolerance"] == 1e-9
    marker = json.loads((kept / "EXPORT_FAILED.json").read_text())
    assert marker["measured"] == info.value.measured and marker["intended_directory"] == str(tmp_path / "strict")
    session(kept / "model.onnx")  # the kept file loads: it can be inspected and run


def test_a_later_failure_replaces_the_failed_folder_but_never_a_users(tmp_path) -> None:
    from autoqra.export.onnx_export import _keep_failed

    def failed_export(name: str) -> Path:
        tmp = tmp_path / f".{name}.tmp"
        tmp.mkdir()
        (tmp / "model.onnx").write_bytes(b"x")
        return _keep_failed(tmp, tmp_path / name, ExportVerificationError("off", measured={"max_rel": 1.0}), {})

    assert failed_export("out") == tmp_path / "out.failed"
    assert failed_export("out") == tmp_path / "out.failed"  # an earlier failed export (it has the marker) goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.failed"]
    (tmp_path / "other.failed").mkdir()
    (tmp_path / "other.failed" / "mine.txt").write_text("keep")
    assert failed_export("other") == tmp_path / "other.failed-2"
    assert (tmp_path / "other.failed" / "mine.txt").read_text() == "keep"
    assert json.loads((tmp_path / "other.failed-2" / "EXPORT_FAILED.json").read_text())["measured"] == {"max_rel": 1.0}


@pytest.mark.parametrize(
    "onnx_tokens, torch_tokens, margins, max_abs, expect",
    [
        ([1, 2, 3], [1, 2, 3], [1.0, 1.0, 1.0], 1e-3, (3, None)),
        ([1, 2, 9], [1, 2, 3], [1.0, 1.0, 1e-4], 1e-3, (2, 2)),  # a near-tie: accepted
        ([1, 9, 3], [1, 2, 3], [1.0, 1.0, 1.0], 1e-3, ExportVerificationError),
    ],
)
def test_compare_tokens(onnx_tokens, torch_tokens, margins, max_abs, expect) -> None:
    if isinstance(expect, type):
        with pytest.raises(expect, match="step 1"):
            compare_tokens(onnx_tokens, torch_tokens, margins, max_abs)
    else:
        assert compare_tokens(onnx_tokens, torch_tokens, margins, max_abs) == expect


@pytest.mark.parametrize(
    "make_model, make_path, error, words",
    [
        (lambda: "not a model", lambda t: t / "o", ConfigError, "torch.nn.Module"),
        (lambda: nn.Sequential(nn.Linear(64, 64)), lambda t: t / "o", ExportError, "Hugging Face causal LMs"),
        (lambda: _compiled(tiny_llama()), lambda t: (t / "file.onnx").write_text("x") and t / "file.onnx",
         ConfigError, "give a folder"),
    ],
    ids=["not-a-module", "no-config", "path-is-a-file"],
)
def test_bad_model_or_path(tmp_path, make_model, make_path, error, words) -> None:
    model = make_model()
    path = make_path(tmp_path)
    before = _state(model) if isinstance(model, nn.Module) else None
    with pytest.raises(error, match=words):
        export_onnx(model, path)
    if before is not None:
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_onnxruntime_failure_during_verification_is_a_verification_error() -> None:
    from autoqra.export.verify import _run

    class Failing:
        def run(self, names, feeds):
            raise RuntimeError("Non-zero status code returned while running Expand node\nmore")

    with pytest.raises(ExportVerificationError, match="with_past=False") as info:
        _run(Failing(), ["logits"], {}, "logits")
    assert "Expand node" in str(info.value) and "more" not in str(info.value)


class _RecordingBar:
    """Stands in for tqdm: records the export's stages, updates and ``disable``."""

    made: list[_RecordingBar] = []

    def __init__(self, *, total: int, disable: bool | None, **_: object) -> None:
        self.total, self.disable, self.n, self.stages, self.closed = total, disable, 0, [], False
        _RecordingBar.made.append(self)

    def update(self, k: int) -> None:
        self.n += k

    def set_postfix_str(self, text: str) -> None:
        self.stages.append(text)

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("progress, genai, disable, stages", [
    (None, HAS_GENAI, None, ["trace + translate (torch.onnx)", "graph clean-up", "write",
                             "onnxruntime vs PyTorch logits", "greedy decode 4 tokens"]
     + (["onnxruntime-genai decode"] if HAS_GENAI else [])),
    (False, False, True, ["trace + translate (torch.onnx)", "graph clean-up", "write",
                          "onnxruntime vs PyTorch logits", "greedy decode 4 tokens"]),
])
def test_export_shows_its_stages(tmp_path, monkeypatch, progress, genai, disable, stages) -> None:
    """A bar over the export's stages (silent for ~1.5 min on SmolLM2 otherwise): every stage named, the
    bar full and closed at the end; ``progress=False`` hides it, ``None`` leaves it to tqdm."""
    import autoqra.export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "tqdm", _RecordingBar)
    _RecordingBar.made.clear()
    export_onnx(_compiled(tiny_llama()), tmp_path / "o", accuracy_level=0, decode_steps=4, verify_genai=genai,
                progress=progress)
    (bar,) = _RecordingBar.made
    assert bar.stages == stages and bar.disable is disable
    assert bar.n == bar.total == len(stages) and bar.closed


def test_failed_export_closes_its_bar(tmp_path, monkeypatch) -> None:
    import autoqra.export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "tqdm", _RecordingBar)
    monkeypatch.setattr(onnx_export, "_optimize", lambda program, fuse: (_ for _ in ()).throw(RuntimeError("boom")))
    _RecordingBar.made.clear()
    with pytest.raises(ExportError, match="boom"):
        export_onnx(_compiled(tiny_llama()), tmp_path / "o", accuracy_level=0, verify_genai=False)
    (bar,) = _RecordingBar.made
    assert bar.stages == ["trace + translate (torch.onnx)", "graph clean-up"] and bar.closed
    assert bar.n < bar.total  # not shown as done


def test_an_existing_folder_is_refused_unless_overwrite_which_replaces_it(tmp_path) -> None:
    model = tiny_llama()
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "model.onnx.data").write_bytes(b"stale")  # e.g. an earlier export's external data
    with pytest.raises(ConfigError, match="exists and is not empty; pass overwrite=True"):
        export_onnx(model, out, with_past=False, accuracy_level=0)
    assert (out / "model.onnx.data").read_bytes() == b"stale"  # refused before any work: untouched
    result = export_onnx(model, out, with_past=False, accuracy_level=0, overwrite=True)
    assert not (out / "model.onnx.data").exists() and result.model_file.is_file()  # replaced, nothing stale left
    (tmp_path / "empty").mkdir()
    export_onnx(model, tmp_path / "empty", with_past=False, verify_export=False)  # an empty folder is fine


@pytest.mark.parametrize(("where", "overwrite", "words"), [
    ("file/onnx", False, "cannot be written"),  # below a regular file
    ("file", False, "is a file"),
    ("new", "yes", "overwrite must be True or False"),
])
def test_export_targets_that_cannot_work_are_refused_first(tmp_path, where, overwrite, words) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=words):
        export_onnx(nn.Linear(2, 2), tmp_path / where, overwrite=overwrite)


@pytest.mark.parametrize("bits, with_past", [(2, True), (3, False), (4, True), (8, False), (16, True)])
def test_shared_tied_embedding_reads_the_lm_heads_tensors_once(tmp_path, bits, with_past) -> None:
    """A tied embedding that reads the compiled lm_head (TiedQuantEmbedding) is exported as a Gather of the
    lm_head's own codes / scales / zero points: exact, and the file holds no float vocabulary matrix."""
    import autoqra
    from autoqra.modules.tied_embedding import TiedQuantEmbedding

    def build(mode: str) -> nn.Module:
        model = tiny_llama(tie=True)
        autoqra.compile(model, "40bits", include=("lm_head",), bits=(bits,), ranks=(4,), tied_embedding=mode,
                        group_size=16, cache_dir=None, progress=False)  # 4 groups a row: 2-5 zero-point bytes
        with torch.no_grad():
            model.lm_head.lora_B.add_(0.05)  # as after fine-tuning: the embedding must not see the adapter
        return model

    shared, kept = build("share"), build("keep")
    assert isinstance(shared.model.embed_tokens, TiedQuantEmbedding)
    result = export_onnx(shared, tmp_path / "shared", with_past=with_past, accuracy_level=0)
    assert result.parity.max_rel < 1e-4
    if with_past:
        assert result.parity.tokens_matched == result.parity.tokens_checked == 16
    kept_result = export_onnx(kept, tmp_path / "kept", with_past=with_past, accuracy_level=0)
    vocab_matrix = 128 * 64 * 4  # the fp32 embedding the kept file holds beside the lm_head

    def weights(folder: str) -> int:
        graph = onnx.load(str(tmp_path / folder / "model.onnx")).graph
        return sum(onnx.numpy_helper.to_array(i).nbytes for i in graph.initializer)

    assert vocab_matrix * 0.99 < weights("kept") - weights("shared") <= vocab_matrix
    assert result.file_bytes < kept_result.file_bytes  # the gather's few nodes cost far less than the matrix
    graph = onnx.load(str(tmp_path / "shared" / "model.onnx")).graph
    assert not [i.name for i in graph.initializer if "embed_tokens" in i.name]
    assert isinstance(shared.model.embed_tokens, TiedQuantEmbedding)  # swapped back after the export
    if bits == 16:  # merging would fold the adapter into the one weight the embedding reads
        with pytest.raises(ExportError, match="adapters='separate'"):
            export_onnx(shared, tmp_path / "merged", with_past=False, adapters="merged", verify_export=False)

"""The demo's last step (`autoqra.demo_export`) and the latency helpers it shares with the ONNX benchmark."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tiny_hf_dir import save_tiny_hf_model  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import autoqra  # noqa: E402
from autoqra.analysis import untouched_bytes  # noqa: E402
from autoqra.demo_export import export_demo  # noqa: E402
from autoqra.errors import ConfigError  # noqa: E402
from autoqra.export.decoder import decoder_shape  # noqa: E402
from autoqra.export.latency import (  # noqa: E402
    PairedDecode,
    genai_latency,
    onnx_latency,
    paired_decode,
    torch_latency,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_export_demo_measures_the_exported_file(tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(save_tiny_hf_model(tmp_path / "hf")))
    fp32 = tiny_llama()
    model = copy.deepcopy(fp32)
    calib = torch.randint(3, 20, (2, 32), generator=torch.Generator().manual_seed(0))
    result = autoqra.compile(model, "9bits", calib=calib, bits=(4, 8), ranks=(4,), cache_dir=None, progress=False)
    expected = result.plan.total_bytes + untouched_bytes(fp32, result.program.graph)
    prompt = tokenizer("the news of the police", return_tensors="pt")["input_ids"]
    out = export_demo(model, fp32, tokenizer, prompt, tmp_path / "onnx", expected, fp32_onnx=True,
                      new_tokens=5, prompt_len=8, decode_steps=2, repeats=1)
    assert (tmp_path / "onnx" / "model.onnx").is_file() and (tmp_path / "onnx" / "genai_config.json").is_file()
    assert not (tmp_path / "onnx_fp32").exists()  # the fp32 file only served the timing
    assert out.tokens_checked == 16 and out.tokens_matched >= 1 and out.max_rel < 0.05
    assert out.file_bytes > 0.95 * expected  # (a tiny model's graph is a large share of its file)
    assert out.onnx_decode_ms > 0 and out.torch_decode_ms > 0 and out.fp32_torch_decode_ms > 0
    assert out.fp32_onnx_decode_ms is not None and out.fp32_onnx_decode_ms > 0
    assert out.prompt == "the news of the police" and isinstance(out.continuation, str)
    for fp32_file in (True, False):
        lines = (out if fp32_file else dataclasses.replace(out, fp32_onnx_decode_ms=None)).lines()
        assert lines[0].startswith("ONNX export of the fine-tuned autoqra default")
        assert any("× the fp32 model in PyTorch" in line for line in lines)
        assert any("× the fp32 ONNX export" in line for line in lines) == fp32_file
        assert any(line.startswith("  onnxruntime continues 'the news of the police' → ") for line in lines)
    assert out.to_dict()["file_bytes"] == out.file_bytes
    shape = decoder_shape(model)  # the helpers on their own: both runtimes timed
    for timing in (onnx_latency(tmp_path / "onnx" / "model.onnx", shape, prompt_len=4, decode_steps=2, repeats=1),
                   torch_latency(model, shape.vocab, prompt_len=4, decode_steps=2, repeats=1)):
        assert timing.prompt_s > 0 and timing.decode_s > 0
    for timing in (onnx_latency(tmp_path / "onnx" / "model.onnx", shape, prompt_len=4, decode_steps=2, repeats=1,
                                prompt=False),
                   torch_latency(model, shape.vocab, prompt_len=4, decode_steps=2, repeats=1, prompt=False)):
        assert timing.prompt_s is None and timing.decode_s > 0  # decode only (what the demo shows)
    if __import__("importlib").util.find_spec("onnxruntime_genai") is not None:  # the runtime the folder targets
        for threads, prompt in ((None, True), (1, False)):
            timing = genai_latency(tmp_path / "onnx", prompt_len=4, decode_steps=3, repeats=1, threads=threads,
                                   prompt=prompt)
            assert (timing.prompt_s is None) != prompt and timing.decode_s > 0
    genai = __import__("importlib").util.find_spec("onnxruntime_genai") is not None
    for runtime in ("onnxruntime",) + ("genai",) * genai:  # one file twice, timed in turns
        paired = paired_decode({"a": tmp_path / "onnx" / "model.onnx", "b": tmp_path / "onnx" / "model.onnx"}, shape,
                               rounds=3, prompt_len=4, decode_steps=2, runtime=runtime)
        assert {k: len(v) for k, v in paired.seconds.items()} == {"a": 3, "b": 3}
        low, median, high = sorted(paired.ratio("a", "b"))
        assert 0 < low <= median <= high and paired.ratio("a", "a") == (1.0, 1.0, 1.0)


def test_latency_helpers_check_their_arguments() -> None:
    model = tiny_llama()
    with pytest.raises(ConfigError, match="decode_steps must be an int >= 1"):
        torch_latency(model, decoder_shape(model).vocab, decode_steps=0)
    with pytest.raises(ConfigError, match="repeats must be an int >= 1"):
        onnx_latency("missing.onnx", decoder_shape(model), repeats=True)
    with pytest.raises(ConfigError, match="threads must be None or an int >= 1"):
        genai_latency("missing", threads=0)
    with pytest.raises(ConfigError, match="has no genai_config.json"):
        genai_latency("missing")
    with pytest.raises(ConfigError, match="rounds must be an int >= 1"):
        paired_decode({"a": "missing.onnx"}, decoder_shape(model), rounds=0)
    with pytest.raises(ConfigError, match="at least one file"):
        paired_decode({}, decoder_shape(model))
    with pytest.raises(ConfigError, match="runtime must be 'onnxruntime' or 'genai'"):
        paired_decode({"a": "missing.onnx"}, decoder_shape(model), runtime="ort")


def test_paired_decode_ratio_is_read_round_by_round() -> None:
    # a drift that slows both files in round 2 leaves the per-round ratio unchanged
    timed = PairedDecode({"plan": (1.0, 2.0, 1.1), "fp32": (2.0, 4.0, 2.0)})
    assert timed.ratio("plan", "fp32") == (0.5, 0.5, 0.55)
    assert timed.ratio("fp32", "fp32") == (1.0, 1.0, 1.0)

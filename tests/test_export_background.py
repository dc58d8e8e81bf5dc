"""`export_in_background`: the same files as `export_onnx` in this process, the caller's threads shared
and given back, the child's errors raised here, a running child stopped by ``close``."""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tiny_hf_dir import save_tiny_hf_model  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import autoqra  # noqa: E402
from autoqra.errors import ConfigError, ExportError, ExportVerificationError  # noqa: E402
from autoqra.export import export_onnx  # noqa: E402
from autoqra.export.background import export_in_background  # noqa: E402
from autoqra.modules.quant_lora_linear import QuantLoRALinear  # noqa: E402


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A compiled tiny Llama (tied embeddings, 4/8-bit layers with adapters) and a tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(str(save_tiny_hf_model(tmp_path_factory.mktemp("hf"))))
    model = tiny_llama(tie=True)
    calib = torch.randint(3, 20, (2, 32), generator=torch.Generator().manual_seed(0))
    autoqra.compile(model, "9bits", calib=calib, bits=(4, 8), ranks=(4,), cache_dir=None, progress=False)
    with torch.no_grad():  # adapters as after fine-tuning
        for module in model.modules():
            if isinstance(module, QuantLoRALinear) and module.rank:
                module.lora_B.add_(0.01)
    return model, tokenizer


def test_background_export_writes_what_export_onnx_writes(tmp_path, compiled) -> None:
    model, tokenizer = compiled
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        job = export_in_background(model, tmp_path / "child", tokenizer=tokenizer, accuracy_level=0)
        assert torch.get_num_threads() == 1  # the caller leaves one core to the child while it runs
        while job.poll():
            assert torch.get_num_threads() == 1
            time.sleep(0.2)
        assert torch.get_num_threads() == 2  # ... and has it back as soon as the child has ended
        child = job.wait()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    here = export_onnx(model, tmp_path / "here", tokenizer=tokenizer, accuracy_level=0, progress=False)
    assert (tmp_path / "child" / "model.onnx").read_bytes() == (tmp_path / "here" / "model.onnx").read_bytes()
    assert child.files == here.files and child.file_bytes == here.file_bytes and child.layers == here.layers
    assert child.parity.tokens_matched == here.parity.tokens_matched == 16
    assert child.parity.max_rel == pytest.approx(here.parity.max_rel, rel=1e-6, abs=1e-9)
    assert child.directory == (tmp_path / "child").resolve()
    assert job.wait() is child  # a second wait returns the same result


def test_graph_options_reach_the_child(tmp_path, compiled) -> None:
    model, tokenizer = compiled
    with export_in_background(model, tmp_path / "plain", tokenizer=tokenizer, accuracy_level=0, fuse_layers=False,
                              attention="model", verify_genai=False, genai_threads=3) as job:
        child = job.wait()
    assert (child.fused_groups, child.attention) == (0, "model")
    options = json.loads((tmp_path / "plain" / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert options["intra_op_num_threads"] == 3
    default = export_onnx(model, tmp_path / "default", tokenizer=tokenizer, accuracy_level=0, progress=False,
                          verify_genai=False)
    assert default.fused_groups > 0 and default.attention == "grouped"
    options = json.loads((tmp_path / "default" / "genai_config.json").read_text())["model"]["decoder"]
    assert "intra_op_num_threads" not in options["session_options"]  # onnxruntime's own choice


def test_child_errors_are_raised_in_the_caller(tmp_path, compiled) -> None:
    model, tokenizer = compiled
    with export_in_background(model, tmp_path / "strict", tokenizer=tokenizer, rtol=1e-12,
                              verify_genai=False) as job, pytest.raises(ExportVerificationError, match="tolerance") as info:
        job.wait()
    # where the child kept the failed files, and what it measured, come back with the error
    assert info.value.directory == tmp_path / "strict.failed" and (info.value.directory / "EXPORT_FAILED.json").is_file()
    assert info.value.measured["max_rel"] > info.value.measured["tolerance"]


@pytest.mark.parametrize(
    "model, kwargs, words",
    [
        (None, {"progress": True}, "cannot pass \\['progress'\\]"),
        (nn.Sequential(nn.Linear(4, 4)), {}, "needs a Hugging Face model"),
        ("gpt2", {}, "must be a torch.nn.Module"),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(tmp_path, compiled, model, kwargs, words) -> None:
    threads = torch.get_num_threads()
    with pytest.raises(ConfigError, match=words):
        export_in_background(compiled[0] if model is None else model, tmp_path / "x", **kwargs)
    assert torch.get_num_threads() == threads and not (tmp_path / "x").exists()


@pytest.mark.parametrize(("target", "words"), [
    ("file", "is a file; give a folder"),
    ("full", "exists and is not empty; pass overwrite=True"),
    ("file/onnx", "cannot be written"),
])
def test_a_bad_target_is_refused_before_the_model_is_saved(tmp_path, compiled, target, words) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    jobs = set(Path(tempfile.gettempdir()).glob("autoqra-export-*"))
    with pytest.raises(ConfigError, match=words):
        export_in_background(compiled[0], tmp_path / target)
    assert set(Path(tempfile.gettempdir()).glob("autoqra-export-*")) == jobs  # nothing saved
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_close_stops_a_running_child(tmp_path, compiled) -> None:
    model, tokenizer = compiled
    threads = torch.get_num_threads()
    job = export_in_background(copy.deepcopy(model), tmp_path / "stopped", tokenizer=tokenizer)
    job_dir = job._job
    assert job.running and job_dir.is_dir()
    job.close()
    assert not job.running and not job_dir.exists() and torch.get_num_threads() == threads
    time.sleep(0.2)
    assert not (tmp_path / "stopped").exists()  # stopped before it wrote anything
    with pytest.raises(ExportError, match="exit code"):
        job.wait()  # nothing to return: says how the child ended


def test_a_shared_tied_embedding_reaches_the_child(tmp_path, compiled) -> None:
    """The child rebuilds the model through autoqra.save / load: the embedding that reads the compiled lm_head
    comes back reading it, and the child's file is the parent's, byte for byte."""
    _, tokenizer = compiled
    model = tiny_llama(tie=True)
    autoqra.compile(model, "12bits", include=("lm_head",), bits=(4,), ranks=(4,), cache_dir=None, progress=False)
    assert model.model.embed_tokens.source is model.lm_head
    with export_in_background(model, tmp_path / "child", tokenizer=tokenizer, accuracy_level=0,
                              verify_genai=False) as job:
        child = job.wait()
    here = export_onnx(model, tmp_path / "here", tokenizer=tokenizer, accuracy_level=0, progress=False,
                       verify_genai=False)
    assert (tmp_path / "child" / "model.onnx").read_bytes() == (tmp_path / "here" / "model.onnx").read_bytes()
    assert child.file_bytes == here.file_bytes and child.parity.tokens_matched == 16

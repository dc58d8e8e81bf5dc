"""Bad inputs to every public entry point: the exception type, a message that says what to do, and
the model unchanged (table-driven)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_llama

import autoqra
from autoqra.errors import (
    BudgetError,
    BudgetInfeasibleError,
    ConfigError,
    DataError,
    NotCompiledError,
    PeftExportError,
    QuantizationError,
    UnknownNameError,
)
from autoqra.io import SaveFormatError, load, save
from autoqra.modules.quant_lora_linear import QuantLoRALinear
from autoqra.passes.calibrate import CalibratePass

CALIB = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
FAST = dict(cache_dir=None, progress=False)


def _nan_model():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    return model


def _compiled():
    model = tiny_llama()
    autoqra.compile(model, "8bits", ranks=(4,), **FAST)
    return model


COMPILE_CASES = [
    # (id, model factory, budget, kwargs, exception, words the message must contain)
    ("budget-list", tiny_llama, [5], {}, BudgetError, "e.g."),
    ("budget-negative", tiny_llama, -5, {}, BudgetError, "positive"),
    ("budget-zero-bits", tiny_llama, "0bits", {}, BudgetError, "positive"),
    ("budget-overflow", tiny_llama, "1e400MB", {}, BudgetError, "finite"),
    ("budget-garbage", tiny_llama, "lots", {}, BudgetError, "e.g."),
    ("budget-infeasible", tiny_llama, "1bits", {"calib": CALIB}, BudgetInfeasibleError, "raise the budget"),
    ("solver", tiny_llama, "5bits", {"solver": "magic"}, UnknownNameError, "available"),
    ("estimator", tiny_llama, "5bits", {"estimator": "magic"}, UnknownNameError, "available"),
    ("backend", tiny_llama, "5bits", {"backend": "magic"}, UnknownNameError, "available"),
    ("bits", tiny_llama, "5bits", {"bits": (5,)}, ConfigError, "e.g."),
    ("objective", tiny_llama, "5bits", {"objective": "fast"}, ConfigError, "one of"),
    ("lambda", tiny_llama, "5bits", {"calib": CALIB, "lambda_": -2.0}, ConfigError, ">= 0"),
    ("finetune-no-data", tiny_llama, "5bits", {"objective": "finetune"}, ConfigError, "pass calib"),
    ("calib-type", tiny_llama, "5bits", {"calib": "some text"}, DataError, "LongTensor"),
    ("adapter-dtype", tiny_llama, "5bits", {"adapter_dtype": torch.int8}, ConfigError, "floating-point"),
    ("nan-weight", _nan_model, "5bits", {"calib": CALIB}, QuantizationError, "model.layers.1.mlp.up_proj"),
    ("already-compiled", _compiled, "5bits", {}, ConfigError, "already compiled"),
    ("not-a-module", lambda: "gpt2", "5bits", {}, ConfigError, "nn.Module"),
    ("unmatched-pins", tiny_llama, "5bits", {"patterns": {"q_proj": {"bits": 2, "rank": 64}}}, ConfigError,
     "loosen"),
]


@pytest.mark.parametrize(("make", "budget", "kwargs", "error", "words"),
                         [c[1:] for c in COMPILE_CASES], ids=[c[0] for c in COMPILE_CASES])
def test_compile_bad_inputs(monkeypatch, make, budget, kwargs, error, words) -> None:
    model = make()
    calibrated = []
    real_call = CalibratePass.call
    monkeypatch.setattr(CalibratePass, "call", lambda self, program: calibrated.append(1) or real_call(self, program))
    before = None
    if isinstance(model, torch.nn.Module):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        types = [type(m) for m in model.modules()]
    with pytest.raises(error, match=None) as info:
        autoqra.compile(model, budget, **FAST, **kwargs)
    assert words in str(info.value), str(info.value)
    # errors that arguments and weights decide come before the expensive calibration
    assert not calibrated
    if before is not None:
        after = model.state_dict()
        assert set(after) == set(before)
        assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).any() for k in before)
        assert types == [type(m) for m in model.modules()]


def test_meta_device_model_is_refused_by_name() -> None:
    with torch.device("meta"):
        model = tiny_llama()
    with pytest.raises(ConfigError, match="meta device"):
        autoqra.compile(model, "5bits", **FAST)


@pytest.mark.parametrize("damage", ["missing-dir", "bad-json", "unknown-keys", "float-qweight", "nan-scale",
                                    "other-model"])
def test_load_bad_files(tmp_path, damage) -> None:
    model = _compiled()
    folder = tmp_path / "saved"
    save(model, folder)
    from safetensors.torch import load_file, save_file

    def rewrite(fn):  # modify the tensors and re-seal the manifest, as a careful forger would
        tensors = load_file(str(folder / "model.safetensors"))
        fn(tensors)
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "manifest.json").unlink()
        meta = json.loads((folder / "autoqra_plan.json").read_text())
        meta["format_version"] = 1  # a format-1 folder has no manifest to check
        (folder / "autoqra_plan.json").write_text(json.dumps(meta))

    base = tiny_llama()
    if damage == "missing-dir":
        folder = tmp_path / "nowhere"
    elif damage == "bad-json":
        (folder / "autoqra_plan.json").write_text("{oops")
        (folder / "manifest.json").unlink()
    elif damage == "unknown-keys":
        rewrite(lambda t: t.__setitem__("surprise", torch.zeros(2)))
    elif damage == "float-qweight":
        key = next(k for k in load_file(str(folder / "model.safetensors")) if k.endswith("qweight"))
        rewrite(lambda t: t.__setitem__(key, t[key].float()))
    elif damage == "nan-scale":
        key = next(k for k in load_file(str(folder / "model.safetensors")) if k.endswith(".scale"))
        rewrite(lambda t: t[key].__setitem__((0, 0), float("nan")))
    else:
        base = tiny_llama(layers=1)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(SaveFormatError) as info:
        load(folder, base)
    assert any(w in str(info.value) for w in ("re-save", "autoqra.save", "same architecture", "missing",
                                              "does not exist"))
    assert not any(isinstance(m, QuantLoRALinear) for m in base.modules())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda: autoqra.save(tiny_llama(), "/tmp/autoqra-never"), autoqra.AutoQRAError, "compile"),
        (lambda: autoqra.to_peft_config(tiny_llama()), NotCompiledError, "compile"),
        (lambda: autoqra.save_peft_adapter(_compiled(), "/tmp/autoqra-never", target="int4"), ConfigError, "target"),
        (lambda: autoqra.finetune(tiny_llama(), CALIB, steps=1, progress=False), NotCompiledError, "compile"),
        (lambda: autoqra.calibrate(tiny_llama(), CALIB, holdout=1.5, progress=False), ConfigError, "fraction"),
    ],
    ids=["save-uncompiled", "peft-config-uncompiled", "peft-target", "finetune-uncompiled", "calibrate-holdout"],
)
def test_other_entry_points(call, error, words) -> None:
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)


def _not_a_module_calls():
    from autoqra import peft_native
    from autoqra.evaluate import perplexity

    path = "HuggingFaceTB/SmolLM2-135M"  # a name or a folder where the model object belongs
    return {
        "compile": lambda: autoqra.compile(path, "4bits"),
        "calibrate": lambda: autoqra.calibrate(path, CALIB),
        "pareto": lambda: autoqra.pareto(path),
        "finetune": lambda: autoqra.finetune(path, CALIB, steps=1),
        "save": lambda: autoqra.save(path, "/tmp/autoqra-never"),
        "save_peft_adapter": lambda: autoqra.save_peft_adapter(path, "/tmp/autoqra-never"),
        "export_onnx": lambda: autoqra.export_onnx(path, "/tmp/autoqra-never"),
        "perplexity": lambda: perplexity(path, CALIB),
        "to_peft_model": lambda: peft_native.to_peft_model(path),
        "to_autoqra": lambda: peft_native.to_autoqra(path),
        "merge_to_dense": lambda: peft_native.merge_to_dense(path),
        "save_base": lambda: peft_native.save_base(path, "/tmp/autoqra-never"),
        "load_peft_model": lambda: peft_native.load_peft_model(path, "/tmp/autoqra-never"),
    }


@pytest.mark.parametrize("entry", sorted(_not_a_module_calls()))
def test_every_entry_point_refuses_a_name_where_the_model_belongs(entry) -> None:
    with pytest.raises(ConfigError, match=r"torch\.nn\.Module") as info:
        _not_a_module_calls()[entry]()
    assert "got str" in str(info.value)


def test_peft_export_without_initial_factors_names_the_fix(tmp_path) -> None:
    model = _compiled()
    del model.autoqra_init_adapters
    with pytest.raises(PeftExportError, match="target='quantized'"):
        autoqra.save_peft_adapter(model, tmp_path, target="fp32")

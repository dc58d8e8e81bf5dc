"""The command line on a tiny local Hugging Face model folder."""

from __future__ import annotations

import json

import pytest
from tiny_hf_dir import save_tiny_hf_model, write_text

from autoqra.cli import build_parser, main
from autoqra.errors import ConfigError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_hf_model(tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "calib.txt")


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("demo", "estimate", "compile", "pareto", "eval"):
        assert command in out


def test_estimate_prints_uniform_sizes_and_writes_graph(model_dir, tmp_path, capsys):
    assert main(["estimate", str(model_dir), "--json", str(tmp_path / "g.json")]) == 0
    out = capsys.readouterr().out
    assert "capture route: export" in out and "quantizable layers: 14 in 2 blocks" in out
    assert "uniform 3-bit" in out and "smallest feasible budget" in out
    assert len(json.loads((tmp_path / "g.json").read_text())["nodes"]) == 14


def test_compile_writes_plan_report_and_model(model_dir, text_file, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code = main(["compile", str(model_dir), "--budget", "5bits", "--calib", str(text_file), "--seq-len", "32",
                 "--calib-windows", "4", "--out", str(out_dir)])
    assert code == 0
    plan = json.loads((out_dir / "plan.json").read_text())
    assert len(plan["layers"]) == 14 and plan["total_bytes"] <= plan["budget_bytes"]
    assert plan["settings"]["estimator"] == "fisher_weighted"
    assert (out_dir / "model" / "model.safetensors").exists()
    report = json.loads((out_dir / "report.json").read_text())
    assert report["capture_route"] == "export"
    assert report["total_bytes"] == plan["total_bytes"] and report["budget_bytes"] == plan["budget_bytes"]
    assert {r["layer"]: {"bits": r["bits"], "rank": r["rank"]} for r in report["per_layer"]} == plan["layers"]
    assert sum(r["bytes"] for r in report["per_layer"]) == plan["total_bytes"]
    assert {t["pass"] for t in report["timings"]} >= {"CalibratePass", "SelectPlanPass", "MaterializePass"}
    assert report["selection"]["candidates"]  # plans scored by measured loss
    assert "total" in (out_dir / "report.txt").read_text()
    # the whole model, measured through its tensor storages: the plan's layers and what stays outside
    assert report["model_held_bytes"] > report["held_bytes"] == plan["total_bytes"]
    printed = capsys.readouterr().out
    assert "total" in printed and "the compiled model holds" in printed
    assert "tied embedding" not in printed  # this model's lm_head is not tied


def test_tied_head_hint_names_the_float_matrix_outside_the_budget():
    from tiny_models import tiny_llama

    from autoqra.cli import _tied_head_hint

    assert "--include lm_head" in _tied_head_hint(tiny_llama(tie=True))
    assert _tied_head_hint(tiny_llama(tie=False)) is None


@pytest.mark.parametrize(
    ("flags", "objective", "selected"),
    [
        (["--objective", "deploy", "--no-select"], "deploy", False),
        (["--score-steps", "0"], "finetune", True),
        (["--objective", "finetune", "--lambda", "0.5", "--score-steps", "1"], "finetune", True),
    ],
)
def test_compile_objective_flags(model_dir, text_file, tmp_path, capsys, flags, objective, selected):
    out_dir = tmp_path / "out"
    code = main(["compile", str(model_dir), "--budget", "5bits", "--calib", str(text_file), "--seq-len", "32",
                 "--calib-windows", "4", "--plan-only", "--out", str(out_dir), *flags])
    assert code == 0
    plan = json.loads((out_dir / "plan.json").read_text())
    assert plan["settings"]["objective"] == objective
    report = json.loads((out_dir / "report.json").read_text())
    assert (report["selection"] is not None) == selected
    assert ("winner:" in capsys.readouterr().out) == selected


def test_compile_screen_steps_flag(model_dir, text_file, tmp_path, capsys):
    out_dir = tmp_path / "out"
    assert main(["compile", str(model_dir), "--budget", "5bits", "--calib", str(text_file), "--seq-len", "32",
                 "--calib-windows", "4", "--plan-only", "--out", str(out_dir), "--score-steps", "2",
                 "--screen-steps", "1"]) == 0
    config = json.loads((out_dir / "report.json").read_text())["selection"]["config"]
    assert (config["score_steps"], config["screen_steps"]) == (2, 1)
    assert "winner:" in capsys.readouterr().out


@pytest.mark.parametrize(("flags", "probed", "band"), [([], True, True), (["--no-probe"], False, True),
                                                       (["--no-band"], True, False)])
def test_compile_no_probe_and_no_band_flags(model_dir, text_file, tmp_path, capsys, flags, probed, band):
    out_dir = tmp_path / "out"
    assert main(["compile", str(model_dir), "--budget", "5bits", "--calib", str(text_file), "--seq-len", "32",
                 "--calib-windows", "4", "--plan-only", "--out", str(out_dir), "--score-steps", "1", *flags]) == 0
    report = json.loads((out_dir / "report.json").read_text())
    assert (report["selection"]["config"]["probe"] is not None) == probed
    assert (report["error_probe"] is not None) == probed
    assert report["selection"]["config"]["band"] == band
    assert "winner:" in capsys.readouterr().out


def test_select_and_probe_configs_are_exported_at_the_top_level():
    import autoqra
    from autoqra.passes.probe import ProbeConfig
    from autoqra.passes.select import SelectConfig

    assert autoqra.SelectConfig is SelectConfig and autoqra.ProbeConfig is ProbeConfig
    assert autoqra.SelectConfig(probe=None).to_dict()["probe"] is None


def test_compile_plan_only_data_free(model_dir, tmp_path, capsys):
    code = main(["compile", str(model_dir), "--budget", "4bits", "--calib", "none", "--plan-only",
                 "--solver", "greedy", "--out", str(tmp_path)])
    assert code == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["settings"]["estimator"] == "lora_residual" and plan["settings"]["solver"] == "greedy"
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("flags, mode", [([], "share"), (["--tied-embedding", "keep"], "keep")])
def test_compile_tied_embedding_flag_reaches_the_plan(model_dir, tmp_path, capsys, flags, mode):
    code = main(["compile", str(model_dir), "--budget", "6bits", "--calib", "none", "--plan-only",
                 "--include", "lm_head", "--out", str(tmp_path), *flags])
    assert code == 0
    assert json.loads((tmp_path / "plan.json").read_text())["settings"]["tied_embedding"] == mode


def test_plan_only_then_apply_materializes_the_saved_plan(model_dir, text_file, tmp_path, capsys):
    plan_dir = tmp_path / "plan"
    common = ["--calib", str(text_file), "--seq-len", "32", "--calib-windows", "4"]
    assert main(["compile", str(model_dir), "--budget", "5bits", *common, "--plan-only", "--score-steps", "1",
                 "--out", str(plan_dir)]) == 0
    assert main(["apply", str(plan_dir / "plan.json"), str(model_dir), *common, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "applied" in out and "bytes held" in out
    assert json.loads((tmp_path / "a" / "plan.json").read_text())["layers"] == \
        json.loads((plan_dir / "plan.json").read_text())["layers"]
    assert (tmp_path / "a" / "model" / "manifest.json").is_file()
    # the plan file is checked before the model is loaded
    assert main(["apply", str(tmp_path / "nothing.json"), "/does/not/exist", "--out", str(tmp_path / "b")]) == 2
    assert "no plan file" in capsys.readouterr().err


def test_pareto_honours_include_and_exclude(model_dir, tmp_path):
    assert main(["pareto", str(model_dir), "--calib", "none", "--points", "3", "--out", str(tmp_path / "all")]) == 0
    assert main(["pareto", str(model_dir), "--calib", "none", "--points", "3", "--exclude", "mlp",
                 "--out", str(tmp_path / "some")]) == 0

    def most_bytes(folder):
        return max(int(line.split(",")[1]) for line in (folder / "pareto.csv").read_text().splitlines()[1:])

    assert most_bytes(tmp_path / "some") < most_bytes(tmp_path / "all")


def test_pareto_writes_csv_and_png(model_dir, tmp_path):
    assert main(["pareto", str(model_dir), "--calib", "none", "--points", "5", "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "pareto.csv").read_text().splitlines()
    assert lines[0] == "budget_bytes,bytes,predicted_error" and len(lines) >= 4
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compile", "MODEL", "--budget", "lots", "--calib", "none"], "cannot parse budget"),
        (["compile", "MODEL", "--budget", "1000", "--calib", "none", "--plan-only"], "infeasible"),
        (["compile", "MODEL", "--budget", "4bits", "--calib", "none", "--solver", "magic"], "invalid choice"),
        (["compile", "MODEL", "--budget", "4bits", "--calib", "none", "--bits", "2,x"], "comma-separated"),
    ],
)
def test_bad_input_gives_error_and_exit_2(model_dir, argv, message, capsys):
    argv = [str(model_dir) if a == "MODEL" else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refuses a name outside its choices= before anything loads
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_parser_defaults():
    args = build_parser().parse_args(["compile", "--budget", "3bits"])
    assert args.model == "smollm2-135m" and args.calib == "lee" and args.solver == "exact"
    demo = build_parser().parse_args(["demo"])
    assert demo.full is False and demo.out == "demo_out" and demo.eval_windows is None and demo.no_export is False
    assert build_parser().parse_args(["demo", "--no-export"]).no_export is True
    assert build_parser().parse_args(["demo", "--full"]).full is True
    assert build_parser().parse_args(["demo", "--fast"]).full is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--fast", "--full"])


def test_version_quiet_and_name_choices(capsys, monkeypatch):
    import autoqra

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"autoqra {autoqra.__version__}"
    with pytest.raises(SystemExit) as info:
        main(["compile", "x", "--budget", "4bits", "--solver", "magic"])
    assert info.value.code == 2 and "invalid choice: 'magic'" in capsys.readouterr().err
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    args = build_parser().parse_args(["--quiet", "estimate"])
    assert args.quiet


def test_compile_export_onnx_then_export_command(model_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out_dir = tmp_path / "out"
    code = main(["compile", str(model_dir), "--budget", "5bits", "--calib", "none", "--out", str(out_dir),
                 "--export-onnx", str(tmp_path / "onnx"), "--accuracy-level", "0", "--genai-threads", "2",
                 "--ort-attention"])
    assert code == 0
    out = capsys.readouterr().out
    assert "MatMulNBits" in out and "greedy tokens equal 16/16" in out
    assert "groups of layers that read one input run as one MatMulNBits each" in out
    assert {"model.onnx", "genai_config.json", "export_report.json", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "onnx").iterdir()}
    genai = json.loads((tmp_path / "onnx" / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 2  # and genai decoded with it
    assert genai["search"]["past_present_share_buffer"] is True  # every layer one GroupQueryAttention
    assert json.loads((tmp_path / "onnx" / "export_report.json").read_text())["attention"] == "onnxruntime"
    code = main(["export", str(out_dir / "model"), "--base", str(model_dir), "--out", str(tmp_path / "plain"),
                 "--no-past", "--no-fuse", "--model-attention"])
    assert code == 0
    out = capsys.readouterr().out
    assert "max rel" in out and "read one input" not in out
    report = json.loads((tmp_path / "plain" / "export_report.json").read_text())
    assert report["fused_groups"] == 0 and report["attention"] == "model"
    assert not (tmp_path / "plain" / "genai_config.json").exists()
    # --rtol reaches the verification; a failed export is kept beside OUT and the error says where
    code = main(["export", str(out_dir / "model"), "--base", str(model_dir), "--out", str(tmp_path / "strict"),
                 "--no-past", "--rtol", "1e-12"])
    err = capsys.readouterr().err
    assert code != 0 and "above the tolerance 1e-12" in err and str(tmp_path / "strict.failed") in err
    assert (tmp_path / "strict.failed" / "EXPORT_FAILED.json").is_file() and not (tmp_path / "strict").exists()


@pytest.mark.parametrize(("extra", "message"), [
    ([], "no manifest.json"),
    (["--data", "/no/such.txt"], "--data '/no/such.txt' is not a file"),
    (["--eval-data", "/no/such.txt"], "--eval-data '/no/such.txt' is not a file"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_finetune_checks_its_inputs_before_loading_the_base(tmp_path, capsys, extra, message):
    folder = tmp_path / "model"
    folder.mkdir()
    if extra:  # a folder that passes the first check, so the row's own check is the one that fires
        (folder / "manifest.json").write_text("{}")
    code = main(["finetune", str(folder), "--base", "/does/not/exist", "--out", str(tmp_path / "o"), *extra])
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "attention"), [
    ([], "grouped"), (["--model-attention"], "model"), (["--ort-attention"], "onnxruntime"),
    (["--model-attention", "--ort-attention"], None),
])
def test_export_attention_flags(flags, attention):
    from autoqra.cli import _attention

    args = build_parser().parse_args(["export", "folder", "--out", "o", *flags])
    if attention is None:
        with pytest.raises(ConfigError, match="exclude each other"):
            _attention(args)
    else:
        assert _attention(args) == attention


def test_export_checks_the_folder_before_loading_the_base(tmp_path, capsys):
    code = main(["export", str(tmp_path), "--base", "/does/not/exist", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "no manifest.json" in capsys.readouterr().err
    # a non-empty export folder is refused before the base is loaded (the base path does not exist) …
    compiled = tmp_path / "compiled"
    compiled.mkdir()
    (compiled / "manifest.json").write_text("{}")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    code = main(["export", str(compiled), "--base", "/does/not/exist", "--out", str(tmp_path / "o")])
    assert code == 2 and "exists and is not empty; pass overwrite=True (CLI: --overwrite)" in capsys.readouterr().err
    # … and before compile starts; --overwrite lets it through to the next step (here: the missing model)
    code = main(["compile", "/does/not/exist", "--budget", "4bits", "--out", str(tmp_path / "c"),
                 "--export-onnx", str(tmp_path / "o")])
    assert code == 2 and "exists and is not empty" in capsys.readouterr().err
    code = main(["export", str(compiled), "--base", "/does/not/exist", "--out", str(tmp_path / "o"), "--overwrite"])
    assert code != 0 and "exists and is not empty" not in capsys.readouterr().err
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


def test_demo_lines_are_flushed_as_they_come(monkeypatch):  # noqa: ANN001
    """A piped demo (`| tee`, CI logs) must show each step when it ends: every line is flushed."""
    import sys

    from autoqra import cli, demo, zoo

    flushes: list[str] = []

    class Out:
        def write(self, text: str) -> int:
            return len(text)

        def flush(self) -> None:
            flushes.append("flush")

    def fake_run_demo(emit, **_kwargs):  # noqa: ANN001
        before = len(flushes)
        emit("step done")
        assert len(flushes) == before + 1

    monkeypatch.setattr(zoo, "load_default_model", lambda: (object(), None))
    monkeypatch.setattr(cli, "_summary", lambda *a: None)
    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    monkeypatch.setattr(sys, "stdout", Out())
    assert cli.main(["demo"]) == 0


def test_compile_jemalloc_reexecs_before_loading_the_model(monkeypatch):
    from autoqra import cli

    seen: list[list[str]] = []

    class Reexec(Exception):
        pass

    def reexec(argv):  # noqa: ANN001, ANN202
        seen.append(argv)
        raise Reexec  # os.execve does not return

    monkeypatch.setattr(cli, "_reexec_with_jemalloc", reexec)
    monkeypatch.setattr("autoqra.zoo.load_model", lambda *a, **k: pytest.fail("model loaded before the re-exec"))
    argv = ["compile", "--budget", "3.25bits", "--jemalloc", "--plan-only"]
    with pytest.raises(Reexec):
        cli.main(argv)
    assert seen == [argv]


def test_compile_in_bf16_then_finetune_keeps_the_saved_dtype(model_dir, tmp_path, capsys):
    """``compile --dtype bfloat16`` loads and saves the model in bf16 (recorded as ``model_dtype``); ``finetune``
    loads its base in that dtype unless told otherwise."""
    import torch

    from autoqra.io import load, saved_model_dtype

    out = tmp_path / "c"
    assert main(["compile", str(model_dir), "--budget", "8bits", "--calib", "none", "--ranks", "4", "--dtype",
                 "bfloat16", "--out", str(out)]) == 0
    assert saved_model_dtype(out / "model") == torch.bfloat16
    text = write_text(tmp_path / "train.txt", 2000)
    argv = ["finetune", str(out / "model"), "--base", str(model_dir), "--steps", "2", "--batch-size", "2",
            "--seq-len", "32", "--data", str(text), "--eval-data", "none", "--out", str(tmp_path / "ft")]
    capsys.readouterr()
    assert main(argv) == 0
    assert "(bfloat16, cpu)" in capsys.readouterr().out
    assert saved_model_dtype(tmp_path / "ft") == torch.bfloat16
    from transformers import AutoModelForCausalLM

    tuned = load(tmp_path / "ft", AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16))
    assert {p.dtype for n, p in tuned.named_parameters() if not n.endswith(("lora_A", "lora_B"))} == {torch.bfloat16}
    assert main([*argv, "--dtype", "float32", "--out", str(tmp_path / "ft32")]) == 0
    assert "(float32, cpu)" in capsys.readouterr().out
    assert saved_model_dtype(tmp_path / "ft32") == torch.float32


@pytest.mark.parametrize(("device", "message"), [
    ("gpu", "is not a device"),
    ("meta", "autoqra runs on cpu or cuda"),
    pytest.param("cuda", "no CUDA device is visible", marks=pytest.mark.skipif(
        __import__("torch").cuda.is_available(), reason="this machine has a CUDA device")),
])
def test_device_flag_is_checked_before_the_model_loads(tmp_path, capsys, device, message):
    code = main(["compile", "/does/not/exist", "--budget", "4bits", "--calib", "none", "--device", device])
    assert code == 2 and message in capsys.readouterr().err

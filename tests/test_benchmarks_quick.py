"""Smoke test of the benchmark scripts in their ``--quick`` mode (what CI runs): exit code 0 and
the JSON result written with the expected keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _results_dir(tmp_path, monkeypatch):
    """The scripts write their JSON to a temporary folder, not over the committed results."""
    monkeypatch.setenv("AUTOQRA_BENCH_RESULTS", str(tmp_path))


def run_quick(script: str, result: str, timeout: int = 120, extra: tuple[str, ...] = ()) -> dict:
    path = Path(os.environ["AUTOQRA_BENCH_RESULTS"]) / f"{result}.json"
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--quick", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, f"{script} --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert path.exists(), f"{script} --quick did not write {path}"
    return json.loads(path.read_text())


def test_layer_speed_quick() -> None:
    data = run_quick("layer_speed.py", "layer_speed_quick")
    for key in ("machine", "quick", "size", "torch_threads", "thread_counts", "layers", "results", "bnb",
                "base_bytes", "rel_error_b32", "goal_packed4_le_2x"):
        assert key in data, key
    assert data["quick"] is True
    assert data["size"] == 512
    assert data["machine"]["torch_threads"] >= 1
    for name in ("fp32", "packed-2", "packed-3", "packed-4", "packed-8"):
        assert name in data["layers"]
    assert set(data["bnb"]) == {"bnb-nf4", "bnb-nf4 train-mode"}
    for results in data["results"].values():
        assert set(results) == {"fwd_b1", "fwd_b32", "fwd+bwd_b1", "fwd+bwd_b32"}
        for mode in results.values():
            assert mode["fp32"]["ratio_to_fp32"] == pytest.approx(1.0)
            for bits in (2, 3, 4, 8):
                r = mode[f"packed-{bits}"]
                assert r["seconds"] > 0 and r["ratio_to_fp32"] > 0


def test_rounding_quick() -> None:
    data = run_quick("rounding.py", "rounding_quick")
    for key in ("machine", "quick", "fp32_perplexity", "rows", "perplexity", "ratio_to_minmax", "group_size"):
        assert key in data, key
    assert data["quick"] is True
    assert data["group_size"] == 64
    expected = {"fp32"} | {f"{m}-{b}" for m in ("minmax", "mse", "mse+imp") for b in (2, 3, 4)}
    assert set(data["perplexity"]) == expected
    assert all(v > 1.0 for v in data["perplexity"].values())
    assert set(data["ratio_to_minmax"]) == {f"{m}-{b}" for m in ("mse", "mse+imp") for b in (2, 3, 4)}


def test_finetune_memory_quick() -> None:
    data = run_quick("finetune_memory.py", "finetune_memory_quick")
    for key in ("machine", "quick", "model", "rank", "steps", "batch_size", "seq_len", "runs", "ratio_peak_rss",
                "goal_ratio", "meets_goal"):
        assert key in data, key
    assert data["quick"] is True and data["steps"] == 2
    assert set(data["runs"]) == {"fp32", "autoqra", "autoqra-load"}
    assert set(data["ratio_peak_rss"]) == {"autoqra", "autoqra-load"}
    assert all(v > 0 for v in data["ratio_peak_rss"].values())
    assert set(data["ratio_peak_above_baseline"]) == {"autoqra", "autoqra-load"}
    for kind, run in data["runs"].items():
        assert run["worker"] == run["kind"] == kind and run["setting"] == ""
        for key in ("rss_baseline_mib", "rss_fp32_loaded_mib", "rss_before_train_mib", "peak_rss_train_mib",
                    "peak_rss_setup_mib", "peak_above_baseline_mib", "tokens_per_second", "adapted_layers",
                    "trainable_mib"):
            assert run[key] > 0, (kind, key)
        assert run["peak_rss_train_mib"] >= run["rss_before_train_mib"] * 0.9
        assert len(run["losses"]) == 2
    assert data["runs"]["fp32"]["adapted_layers"] == data["runs"]["autoqra"]["adapted_layers"] == 14
    assert data["runs"]["autoqra-load"]["adapted_layers"] == 14


def test_compile_cost_quick() -> None:
    data = run_quick("compile_cost.py", "compile_cost_quick")
    assert data["quick"] is True
    assert [m["blocks"] for m in data["models"]] == [1, 2]
    assert all(m["capture_route"] == "export" for m in data["models"])
    solvers = {(r["groups"], r["solver"]) for r in data["solvers"]}
    assert {(10, "exact"), (10, "greedy"), (10, "differentiable")} <= solvers
    assert all(r["within_budget"] for r in data["solvers"])
    assert all(r["gap_vs_exact"] >= -1e-9 for r in data["solvers"])


def test_quality_quick() -> None:
    data = run_quick("quality.py", "quality_quick")
    rows = {r["row"]: r for r in data["rows"]}
    assert set(rows) == {"default", "uniform", "deploy", "fp32"}
    for row in rows.values():
        assert "error" not in row, row
        assert set(row["ppl"]) == {"0", "4", "8"}
        assert row["held_bytes"] == row["plan_bytes"]
    assert rows["default"]["held_bytes"] <= rows["uniform"]["held_bytes"]
    assert "u3_default_vs_uniform" in data["figures"]
    assert (Path(os.environ["AUTOQRA_BENCH_RESULTS"]) / "quality_quick.png").read_bytes()[:4] == b"\x89PNG"


def test_quality_quick_group_size() -> None:
    """``--group-size`` compiles autoqra's rows with that group; the baselines keep 64 (and the budget)."""
    data = run_quick("quality.py", "quality_quick", extra=("--rows", "default,uniform", "--group-size", "32"))
    rows = {r["row"]: r for r in data["rows"]}
    assert (rows["default"]["group_size"], rows["uniform"]["group_size"], data["group_size"]) == (32, 64, 32)
    assert rows["default"]["held_bytes"] <= data["budgets"]["u3"][1] == rows["uniform"]["plan_bytes"]


@pytest.mark.parametrize(("group", "fix"), [("12", "try 64"), ("0", "positive int")])
def test_quality_bad_group_size_is_refused_before_any_work(group: str, fix: str) -> None:
    proc = subprocess.run([sys.executable, "benchmarks/quality.py", "--quick", "--group-size", group], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--group-size" in proc.stderr and fix in proc.stderr, proc.stderr[-2000:]


def test_proxy_fidelity_quick() -> None:
    data = run_quick("proxy_fidelity.py", "proxy_fidelity_quick")
    assert len(data["rows"]) == 6  # 4 random plans + deploy + finetune at the fitted λ
    assert all(r["bytes"] <= data["budget"] for r in data["rows"])
    for key in ("spearman_deploy_vs_ppl0", "spearman_finetune_vs_ppl_ft", "best_plan"):
        assert key in data["figures"]
    assert data["probe"]["bits"] == [2, 3]  # the tables the compile uses: calibrated by measured loss


def test_proxy_fidelity_rescore_quick() -> None:
    """A run on the tables as predicted, re-scored on the calibrated ones against its own perplexities."""
    raw = run_quick("proxy_fidelity.py", "proxy_fidelity_quick", extra=("--no-probe",))
    assert raw["probe"] is None
    path = Path(os.environ["AUTOQRA_BENCH_RESULTS"]) / "proxy_fidelity_quick.json"
    data = run_quick("proxy_fidelity.py", "proxy_fidelity_rescored_quick", extra=("--rescore", str(path)))
    assert [r["plan"] for r in data["rows"]] == [r["plan"] for r in raw["rows"]]
    for new, old in zip(data["rows"], raw["rows"], strict=True):
        assert (new["ppl0"], new["ppl_ft"], new["deploy_raw"]) == (old["ppl0"], old["ppl_ft"], old["deploy_objective"])
    assert data["probe"]["bits"] == [2, 3] and len(data["probe"]["measured"]) == 2  # both blocks probed
    assert "random:deploy_vs_ppl0" in data["figures"] and "all:finetune_1_vs_ppl_ft" in data["figures"]


def test_compile_memory_quick() -> None:
    data = run_quick("compile_memory.py", "compile_memory_quick")
    assert [(r["kind"], r["task"]) for r in data["rows"]] == [("tiny", "compile"), ("tiny", "eval")]
    for row in data["rows"]:
        assert "error" not in row, row.get("error")
        assert row["peak_rss"] >= row["rss_after_load"] > 0


def test_onnx_export_quick() -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    genai = __import__("importlib").util.find_spec("onnxruntime_genai") is not None
    data = run_quick("onnx_export.py", "onnx_export_quick", timeout=600,
                     extra=("--genai-reference", "--genai-runtime") * genai + ("--paired-rounds", "2"))
    rows = data["rows"]
    for r in rows:  # --paired-rounds: our files timed again in turns, each against its same-form fp32 file
        if r["plan"].startswith("onnxruntime-genai builder"):
            assert "paired_vs_fp32" not in r  # (the builder's files are not kept)
            continue
        assert all(t > 0 for t in r["paired_decode_s"])
        for key in ("paired",) + ("paired_genai",) * genai:
            assert len(r[f"{key}_decode_s"]) == 2
            ratio = r[f"{key}_vs_fp32"]
            assert ratio["reference"] == "fp32 base" and 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
    assert rows[0]["paired_vs_fp32"]["median"] == 1.0
    reference = ["onnxruntime-genai builder fp32", "onnxruntime-genai builder int4 (RTN, no adapters)"] * genai
    assert [r["plan"] for r in rows] == ["fp32 base", *reference] + ["mostly 4-bit"] * 2 + ["mixed 2/3/4/8"] * 2
    for r in rows[1:1 + len(reference)]:  # the builder's files run through the same harness
        assert r["onnx_decode_s"] > 0 and r["file_bytes"] > 0 and r["onnx_ppl"] > 1 and r["parity"] is None
    assert all((r["genai_decode_s"] > 0) if genai else r["genai_decode_s"] is None for r in rows)
    rows = [rows[0], *rows[1 + len(reference):]]
    for r in rows:
        assert r["parity"]["tokens_checked"] == 16 and r["onnx_decode_s"] > 0 and r["file_bytes"] > 0
        assert r["onnx_ppl"] > 1 and abs(r["onnx_ppl"] / r["torch_ppl"] - 1) < 0.05
    mixed = [r for r in rows if r["plan"] == "mixed 2/3/4/8"]
    assert {"2-bit (MatMulNBits)", "8-bit (MatMulNBits)"} <= set(mixed[0]["layers"])


def test_onnx_export_quick_times_a_plan_that_fails_verification() -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    data = run_quick("onnx_export.py", "onnx_export_quick_failed", timeout=600,
                     extra=("--plans", "mostly 4-bit", "--accuracy-levels", "4", "--rtol", "1e-12",
                            "--out", "onnx_export_quick_failed"))
    base, plan = data["rows"]
    assert base["parity"]["tokens_checked"] == 16  # the fp32 base keeps export_onnx's tolerance
    assert "above the tolerance" in plan["parity"]["failed"] and plan["parity"]["max_rel"] > 1e-12
    assert plan["onnx_decode_s"] > 0 and plan["file_bytes"] > 0 and plan["layers"] and plan["export_s"] is None


def test_qlora_parity_quick() -> None:
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    data = run_quick("qlora_parity.py", "qlora_parity_quick")
    rows = {r["row"]: r for r in data["rows"]}
    assert set(rows) == {"peft + bitsandbytes", "autoqra bnb format"}
    for r in rows.values():
        assert "error" not in r, r.get("error")
        assert len(r["losses"]) == data["steps"] and all(v == v for v in r["losses"])
    # the same base codes and the same B = 0 start: equal step-0 perplexity up to the absmax rounding
    peft0, ours0 = rows["peft + bitsandbytes"]["ppl"]["0"], rows["autoqra bnb format"]["ppl"]["0"]
    assert abs(peft0 - ours0) / peft0 < 0.01
    assert rows["peft + bitsandbytes"]["trainable"] == rows["autoqra bnb format"]["trainable"]


def test_gpu_check_quick_on_cpu() -> None:
    """The GPU check's benchmark steps on CPU (a tiny Llama): the layer, fine-tuning and decoding rows;
    on a machine without CUDA its default device is refused with the fix."""
    from benchmarks.gpu_check import FINETUNE_ROWS, HAS_BNB

    path = Path(os.environ["AUTOQRA_BENCH_RESULTS"]) / "gpu_check_quick.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick",
                           "--sections", "layer,finetune,decode"], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(path.read_text())
    rows = {r["row"]: r for r in data["rows"]}
    assert {"bf16 nn.Linear, forward, 1 tokens", "packed 4-bit r8, forward+backward, 4096 tokens"} <= set(rows)
    finetune = [r for r in data["rows"] if r["section"] == "finetune"]
    assert [r["row"] for r in finetune] == [label for label, key, _ in FINETUNE_ROWS if key != "qlora" or HAS_BNB]
    assert all(r["tokens_per_s"] > 0 and r["peak_bytes"] is None for r in finetune)
    # compiled code allocates outside the dispatcher: no tensor peak for the torch.compile row
    assert all((r["tensor_peak_bytes"] is None) == ("torch.compile" in r["row"]) for r in finetune)
    assert rows["autoqra uniform 4-bit r8, bf16 model, torch.compile"]["loss"] > 0
    # each row against the bf16-base LoRA with the same loss; the bf16 compile holds less than it at either
    assert rows["peft LoRA r8, bf16 base, chunked loss"]["tensor peak vs bf16 LoRA"] == 1
    assert rows["autoqra uniform 4-bit r8, bf16 model"]["tensor peak vs bf16 LoRA"] < 1
    assert rows["autoqra uniform 4-bit r8, bf16 model, chunked loss"]["tensor peak vs bf16 LoRA"] < 1
    ckpt = "autoqra uniform 4-bit r8, bf16 model, chunked loss, checkpointing"
    assert rows[ckpt]["loss_mode"] == "chunked+ckpt" and rows[ckpt]["tensor peak vs bf16 LoRA"] < 1
    if HAS_BNB:  # QLoRA (bitsandbytes on the CPU) is each row's second reference, with the same loss
        qlora = rows["QLoRA (peft r16 on bnb nf4), chunked loss"]
        assert qlora["tensor peak vs QLoRA"] == 1 and qlora["tensor peak vs bf16 LoRA"] > 0
        own = rows["autoqra uniform 4-bit r8, bf16 model, chunked loss"]
        assert own["tensor peak vs QLoRA"] == own["tensor_peak_bytes"] / qlora["tensor_peak_bytes"]
    # checkpointing holds less than the same loss without it
    assert rows[ckpt]["tensor_peak_bytes"] < rows["autoqra uniform 4-bit r8, bf16 model, chunked loss"]["tensor_peak_bytes"]
    decode = [r for r in data["rows"] if r["section"] == "decode"]
    assert [r["row"] for r in decode] == [f"{label}, per token" for label in (
        "fp32 model", "fp32 model, torch.compile", "autoqra uniform 4-bit r8", "autoqra uniform 4-bit r8, kernel_cache",
        "autoqra uniform 4-bit r8, fast_path=False", "autoqra uniform 4-bit r8, torch.compile")]
    # a compiled row decodes its eager row's tokens; every row has a time and a ratio to the model as loaded
    assert [r["same tokens"] for r in decode if "torch.compile" in r["row"]] == [True, True]
    assert all(r["seconds"] > 0 and r["vs model"] > 0 for r in decode) and decode[0]["vs model"] == 1
    assert rows["packed 4-bit r8, torch.compile, forward, 1 tokens"]["seconds"] > 0
    unknown = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--sections",
                              "finetune", "--finetune-rows", "peft-bf16,nope"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert unknown.returncode == 2 and "--finetune-rows: unknown ['nope']; known: autoqra," in unknown.stderr
    import torch

    if not torch.cuda.is_available():
        refused = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, capture_output=True,
                                 text=True, timeout=120)
        assert refused.returncode == 2 and "pass --device cpu" in refused.stderr


def _quality_module():  # noqa: ANN202
    """``benchmarks/quality.py`` imported as a module (its functions, not its command line)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import quality
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return quality


@pytest.mark.parametrize(("row", "expected"), [
    ("lambda1", {"lambda_": 1.0}),
    ("lambda4", {"lambda_": 4.0}),
    ("lambda0.5", {"lambda_": 0.5}),
    ("default", {}),
    ("deploy", {"objective": "deploy"}),
])
def test_quality_row_settings(row: str, expected: dict) -> None:
    """``lambdaX`` rows fix the plasticity weight at X; the named rows keep their settings."""
    quality = _quality_module()
    assert quality._row_kwargs(row, 3, 1000) == (1000, expected)


@pytest.mark.parametrize("row", ["lambda", "lambdax", "lambda-1", "nonsense"])
def test_quality_unknown_row_is_refused(row: str) -> None:
    quality = _quality_module()
    with pytest.raises(SystemExit, match="unknown row"):
        quality._row_kwargs(row, 3, 1000)


def test_tied_embedding_quick() -> None:
    data = run_quick("tied_embedding.py", "tied_embedding_quick", extra=("--export",))
    rows = data["results"]
    vocab_matrix = 128 * 64 * 4  # the tiny Llama's fp32 tied matrix
    for head in (4, 8):
        share, keep = rows[f"4-bit r8, lm_head {head}-bit, share"], rows[f"4-bit r8, lm_head {head}-bit, keep"]
        assert share["plan_bytes"] == keep["plan_bytes"] and share["lm_head"] == keep["lm_head"] == [head, 8]
        assert keep["held_bytes"] - share["held_bytes"] == vocab_matrix  # measured through the storages
        assert share["shared"] == {"model.embed_tokens": "lm_head"} and keep["shared"] == {}
    assert rows["4-bit r8, lm_head 4-bit, share"]["onnx_bytes"] < rows["4-bit r8, lm_head 4-bit, keep"]["onnx_bytes"]


def test_quality_summary_reads_every_run_and_draws_the_front(tmp_path) -> None:
    def row(budget, name, seed, nbytes, ppl100):  # a benchmarks/quality.py row, as its JSON holds it
        return dict(budget=budget, row=name, seed=seed, held_bytes=nbytes, ppl={"0": 40.0, "100": ppl100})

    def on(date):
        return {"machine": {"date": f"2026-12-0{date} 10:00:00"}}

    runs = {
        "quality_a.json": dict(quick=False, **on(2), rows=[row("u3", "uniform", 0, 100, 30.0),
                                                           row("u3", "default", 0, 100, 26.0),
                                                           row("u2", "default", 0, 80, 40.0)]),
        "quality_b.json": dict(quick=False, **on(3), rows=[row("u3", "uniform", 1, 100, 31.0),
                                                           row("u3", "qlora", 0, 140, 27.0),
                                                           row("u3", "default", 0, 100, 25.0)]),  # a re-run: it wins
        # the newest run wins although its name sorts first
        "quality_0_newest.json": dict(quick=False, **on(4), rows=[row("u2", "default", 0, 80, 38.0)]),
        # other settings: left out of the default figure, drawn on their own
        "quality_g128.json": dict(quick=False, group_size=128, **on(5), rows=[row("u3", "default", 0, 90, 20.0)]),
        "quality_gemma.json": dict(quick=False, model="gemma", **on(5), rows=[row("u3", "default", 0, 300, 10.0)]),
        "quality_quick.json": dict(quick=True, rows=[row("u3", "uniform", 5, 100, 99.0)]),  # left out
    }
    for name, data in runs.items():
        (tmp_path / name).write_text(json.dumps(data))

    def summary(*extra):
        proc = subprocess.run([sys.executable, "benchmarks/quality_summary.py", "--results", str(tmp_path), *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        payload = json.loads((tmp_path / "quality_summary.json").read_text())
        return proc, payload, {p["label"]: p for p in payload["points"]}

    proc, payload, points = summary()
    assert (payload["model"], payload["group_size"]) == ("smollm2-135m", 64)
    assert set(points) == {"uniform 3-bit r8", "autoqra default @ u3", "autoqra default @ u2", "QLoRA nf4 r16"}
    assert points["uniform 3-bit r8"]["ppl"] == 30.5 and points["uniform 3-bit r8"]["seeds"] == [0, 1]
    assert points["autoqra default @ u3"]["ppl"] == 25.0
    assert points["autoqra default @ u2"]["ppl"] == 38.0 and points["autoqra default @ u2"]["files"] == [
        "quality_0_newest.json"]
    assert {k for k, p in points.items() if p["on_front"]} == {"autoqra default @ u2", "autoqra default @ u3"}
    assert (tmp_path / "quality_summary.png").stat().st_size > 0
    for extra, ppl in ((("--group-size", "128"), 20.0), (("--model", "gemma"), 10.0)):
        _, _, other = summary(*extra)
        assert {k: p["ppl"] for k, p in other.items()} == {"autoqra default @ u3": ppl}
    proc, _, _ = summary()
    missing = subprocess.run([sys.executable, "benchmarks/quality_summary.py", "--results", str(tmp_path),
                              "--group-size", "32"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0  # no run at that group: the error names the settings that have runs
    assert "no quality rows of smollm2-135m at group 32" in missing.stderr
    for fix in ("--model smollm2-135m --group-size 64", "--model smollm2-135m --group-size 128",
                "--model gemma --group-size 64"):
        assert fix in missing.stderr
    assert "| uniform 3-bit r8 | 100 | 2 |" in proc.stdout


def test_onnx_export_refuses_negative_paired_rounds() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/onnx_export.py", "--quick", "--paired-rounds", "-1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--paired-rounds must be >= 0 (0: off)" in proc.stderr

"""The main job on the real SmolLM2 + Lee corpus, at a reduced size (slow: real model)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end_on_the_real_model(tmp_path, monkeypatch):
    import autoqra.api
    from autoqra.demo import run_demo

    # empty error and selection caches (an earlier run's scores would skip the short fine-tunes it reuses);
    # the model conversion cache stays where it is
    monkeypatch.setattr(autoqra.api, "default_cache_dir", lambda: tmp_path / "cache")

    lines: list[str] = []
    results = run_demo(lines.append, calib_windows=2, eval_windows=2, out_dir=tmp_path, progress=False)
    text = "\n".join(lines)
    assert "capture route: export; 210 quantizable layers in 30 blocks" in text
    for label in ("uniform 4-bit r0", "uniform 3-bit r8", "autoqra default"):
        assert results[label]["bytes"] == results[label]["plan_bytes"]  # held storages == cost model
        assert 25 < results[label]["ppl"] < 200
    assert "autoqra deploy" not in results  # the fast demo leaves it to --full
    assert results["autoqra default"]["bytes"] <= results["uniform 3-bit r8"]["bytes"]
    assert results["fp32"]["ppl"] < results["uniform 4-bit r0"]["ppl"] < results["uniform 3-bit r8"]["ppl"]
    # fine-tuned rows: the selection's short fine-tunes, reused (nothing fine-tuned twice; with one
    # 512-token statistics window here, 8 steps overfit it, so only that they ran is checked)
    assert results["finetune_steps"] == 8
    for label in ("uniform 3-bit r8", "autoqra default"):
        assert 25 < results[label]["ppl_finetuned"] < 200 and results[label]["ppl_finetuned"] != results[label]["ppl"]
        assert any(line.startswith(f"{label}: after 8 adapter steps (the selection's short fine-tune of")
                   for line in lines), label
    selection = results["autoqra default"]["selection"]
    assert any(c["label"] == "uniform 3-bit r8" for c in selection["candidates"])  # no regret: uniform scored
    assert "candidates scored on held-back calibration windows" in text
    for name in ("summary.png", "plan_default.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "report.md").read_text()
    assert "![perplexity against bytes](summary.png)" in report and "plan_default.png" in report
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"]["autoqra default"]["plan"]["layers"]
    assert f"wrote {tmp_path / 'summary.png'}" in text
    # the last step: the fine-tuned default exported, verified, measured and run in onnxruntime
    onnx = results["onnx"]
    assert (tmp_path / "onnx" / "model.onnx").is_file() and (tmp_path / "onnx" / "genai_config.json").is_file()
    assert 0.95 < onnx["file_bytes"] / onnx["expected_bytes"] < 1.05  # the size goal
    assert onnx["tokens_checked"] == 16 and onnx["onnx_decode_ms"] > 0 and onnx["continuation"]
    assert any(line.startswith("ONNX export of the fine-tuned autoqra default") for line in lines)
    assert onnx["background"] and "by a background process while the demo went on" in text  # overlapped
    assert "## ONNX export" in report and saved["onnx"]["file_bytes"] == onnx["file_bytes"]

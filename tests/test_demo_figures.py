"""The demo's pictures and report, on a tiny model's plan (fast)."""

from __future__ import annotations

import pytest
from tiny_models import tiny_llama

import autoqra
from autoqra.analysis import analyze
from autoqra.demo_figures import DemoRow, plan_grid, plan_heatmap, summary_plot, write_report


@pytest.fixture(scope="module")
def planned():
    model = tiny_llama()
    result = autoqra.compile(model, "5bits", materialize=False, cache_dir=None, progress=False)
    return result.plan, analyze(tiny_llama()).graph


def test_plan_grid_is_block_by_projection(planned):
    plan, graph = planned
    blocks, projections, cells = plan_grid(plan, graph)
    assert blocks == [0, 1]
    assert set(projections) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert cells[(1, "down_proj")] == plan.layers["model.layers.1.mlp.down_proj"]
    assert len(cells) == len(plan.layers)


def test_pictures_and_report_are_written(planned, tmp_path):
    plan, graph = planned
    rows = [DemoRow("uniform 4-bit r8", 3_000_000, 31.0, None, True),
            DemoRow("uniform 3-bit r8", 2_400_000, 40.0, 33.0, True),
            DemoRow("autoqra default", 2_400_000, 33.0, 31.0, False)]
    summary_plot(rows, tmp_path / "s.png", fp32_ppl=29.0, steps=10)
    plan_heatmap(plan, graph, tmp_path / "h.png", title="plan")
    for name in ("s.png", "h.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    write_report(tmp_path / "r.md", header=["hello"], rows=[["a", "1"]], row_headers=["model", "bytes"],
                 selection=None, plans={"autoqra default": plan}, pictures={"summary": "s.png",
                                                                            "autoqra default": "h.png"})
    text = (tmp_path / "r.md").read_text()
    assert "![perplexity against bytes](s.png)" in text and "![autoqra default per layer](h.png)" in text
    assert "layers per (bits, rank)" in text

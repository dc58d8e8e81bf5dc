"""The demo's pictures and report: perplexity against bytes, and the plan as a heat map.

* `summary_plot(rows, path)`: every row's perplexity against its held bytes, before (hollow) and
  after fine-tuning (filled); the uniform plans joined by a line; fp32 as a dashed level.
* `plan_heatmap(plan, graph, path)`: bits and rank of every layer, blocks down, projections across.
* `write_report(...)`: ``report.md`` with the tables, the selection scores and both pictures.

matplotlib is needed (``pip install 'autoqra[plot]'``; the demo's virtualenv has it); without it a
`MissingDependencyError` names the extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoqra.errors import MissingDependencyError
from autoqra.report import selection_table, table

__all__ = ["DemoRow", "plan_grid", "plan_heatmap", "summary_plot", "write_report"]


@dataclass(frozen=True)
class DemoRow:
    """One compiled (or original) model of the demo."""

    label: str
    nbytes: int
    ppl: float
    ppl_finetuned: float | None = None
    uniform: bool = False


def _pyplot():  # noqa: ANN202
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingDependencyError("the demo's pictures need matplotlib: pip install 'autoqra[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def summary_plot(rows: list[DemoRow], path: Path, *, fp32_ppl: float | None = None, steps: int = 0) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    mib = 2**20
    uniform = sorted((r for r in rows if r.uniform), key=lambda r: r.nbytes)
    if uniform:
        ax.plot([r.nbytes / mib for r in uniform], [r.ppl for r in uniform], "-", color="0.55", lw=1.2,
                label="uniform plans, as compiled")
        tuned = [r for r in uniform if r.ppl_finetuned is not None]
        if len(tuned) > 1:
            ax.plot([r.nbytes / mib for r in tuned], [r.ppl_finetuned for r in tuned], "-", color="0.25", lw=1.2,
                    label=f"uniform plans, after {steps} steps")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(rows):
        color = "0.4" if r.uniform else colors[(i + 1) % len(colors)]
        ax.plot(r.nbytes / mib, r.ppl, "o", mfc="none", color=color, ms=8)
        if r.ppl_finetuned is not None:
            ax.plot(r.nbytes / mib, r.ppl_finetuned, "o", color=color, ms=8)
            ax.annotate("", xy=(r.nbytes / mib, r.ppl_finetuned), xytext=(r.nbytes / mib, r.ppl),
                        arrowprops={"arrowstyle": "->", "color": color, "lw": 0.8})
        ax.annotate(r.label, (r.nbytes / mib, r.ppl_finetuned if r.ppl_finetuned is not None else r.ppl),
                    textcoords="offset points", xytext=(6, -10), fontsize=8, color=color)
    if fp32_ppl is not None:
        ax.axhline(fp32_ppl, ls="--", color="0.6", lw=1, label=f"fp32 ({fp32_ppl:.2f})")
    ax.set_xlabel("bytes held by the quantized layers + adapters (MiB)")
    ax.set_ylabel("perplexity, Lee evaluation split (lower is better)")
    ax.set_title(f"Perplexity against memory: hollow = as compiled, filled = after {steps} fine-tuning steps",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plan_grid(plan, graph) -> tuple[list[int], list[str], dict[tuple[int, str], tuple[int, int]]]:  # noqa: ANN001
    """(blocks, projections, {(block, projection): (bits, rank)}) of the layers inside blocks."""
    cells: dict[tuple[int, str], tuple[int, int]] = {}
    projections: list[str] = []
    for name in graph.order():
        block = graph.annotation(name).block
        if block is None or name not in plan.layers:
            continue
        proj = name.split(".")[-1]
        cells[(block, proj)] = plan.layers[name]
        if proj not in projections:
            projections.append(proj)
    return sorted({b for b, _ in cells}), projections, cells


def plan_heatmap(plan, graph, path: Path, *, title: str = "") -> None:  # noqa: ANN001
    import numpy as np

    plt = _pyplot()
    blocks, projections, cells = plan_grid(plan, graph)
    fig, axes = plt.subplots(1, 2, figsize=(2.2 + 1.1 * len(projections), 1.0 + 0.22 * len(blocks)), sharey=True)
    for ax, k, what, cmap in ((axes[0], 0, "bits", "viridis"), (axes[1], 1, "adapter rank", "magma")):
        grid = np.full((len(blocks), len(projections)), np.nan)
        for (b, p), choice in cells.items():
            grid[blocks.index(b), projections.index(p)] = choice[k]
        image = ax.imshow(grid, aspect="auto", cmap=cmap, interpolation="nearest")
        for i in range(len(blocks)):
            for j in range(len(projections)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{int(grid[i, j])}", ha="center", va="center", fontsize=6,
                            color="white" if grid[i, j] <= np.nanmean(grid) else "black")
        ax.set_xticks(range(len(projections)), projections, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=6)
        ax.set_title(what, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.6)
    axes[0].set_ylabel("block")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(path: Path, *, header: list[str], rows: list[list[Any]], row_headers: list[str],
                 selection: dict[str, Any] | None, plans: dict[str, Any], pictures: dict[str, str],
                 export_lines: Sequence[str] = ()) -> None:
    """``report.md``: the measured table, the selection's scores, each plan by choice, the pictures, the
    ONNX export's figures (``export_lines``)."""
    from autoqra.demo import plan_summary

    out = ["# autoqra demo report", "", *header, "", "## Perplexity and bytes", "", "```",
           table(row_headers, rows), "```", ""]
    if "summary" in pictures:
        out += [f"![perplexity against bytes]({pictures['summary']})", ""]
    if selection:
        out += ["## How the default plan was chosen", "",
                f"Candidates scored on held-back calibration windows ({selection['fidelity']}; mean next-token "
                f"loss, lower is better). Winner: **{selection['winner']}**.", "", "```",
                selection_table(selection), "```", ""]
    for label, plan in plans.items():
        out += [f"## {label}: layers per (bits, rank)", "", "```",
                table(["bits", "rank", "layers", "bytes"], plan_summary(plan)), "```", ""]
        if label in pictures:
            out += [f"![{label} per layer]({pictures[label]})", ""]
    if export_lines:
        out += ["## ONNX export", "", "```", *export_lines, "```", ""]
    path.write_text("\n".join(out))

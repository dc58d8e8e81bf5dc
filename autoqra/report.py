"""Human-readable tables for the CLI and reports (the only library module besides cli.py that prints)."""

from __future__ import annotations

from collections.abc import Sequence


def fmt_bytes(n: float) -> str:
    """``52_428_800`` → ``'50.00 MiB'``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def probe_summary(probe: dict | None) -> str:
    """One line on the error tables' calibration by measured loss (`autoqra.passes.probe`)."""
    if not probe:
        return "error tables as predicted (no probe)"
    if probe.get("factors") is None:
        return f"error tables as predicted: probe skipped ({probe.get('skipped', 'not run')})"
    spread = [f for block in probe["factors"].values() for f in block.values()]
    source = "from the cache" if probe.get("cached") else f"{probe['seconds']:.0f} s"
    return (f"error tables calibrated by measured loss: {probe['blocks']} blocks × "
            f"{'/'.join(str(b) for b in probe['bits'])} bits on {probe['tokens']:,} held-back tokens ({source}); "
            f"block factors {min(spread):.2f}–{max(spread):.2f}")


def selection_table(selection: dict) -> str:
    """The measured selection's candidates (``CompileResult.report["selection"]``) as a table: held-back
    loss at step 0, after the screen's first fine-tuning steps (when there was a screen) and after the
    whole short fine-tune."""
    cands = selection["candidates"]

    def loss(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    screened = any(c.get("loss_screen") is not None for c in cands)
    config = selection.get("config") or {}
    headers = ["candidate", "bytes", "loss at step 0"]
    if screened:
        headers.append(f"after {config.get('screen_steps', '?')} steps")
    headers += [f"after {config.get('score_steps', '?')} steps" if screened else "after short fine-tune", "note",
                "groups: bits × count, mean rank"]
    rows = []
    for c in cands:
        row = [c["label"], fmt_bytes(c["bytes"]), loss(c["loss0"])]
        if screened:
            row.append(loss(c.get("loss_screen")))
        rows.append([*row, loss(c["loss_ft"]), c["note"], c.get("mix", "")])
    return table(headers, rows)


def plan_table(plan) -> str:  # autoqra.plan.Plan (imported lazily by callers)
    """Per-layer table (bits, rank, bytes, predicted error) with totals against the budget."""
    rows = [
        [name, b, r, plan.layer_bytes.get(name, ""), f"{plan.layer_error.get(name, 0.0):.4g}"]
        for name, (b, r) in plan.layers.items()
    ]
    text = table(["layer", "bits", "rank", "bytes", "pred. error"], rows)
    avg = plan.average_bits
    return (
        f"{text}\n"
        f"total {fmt_bytes(plan.total_bytes)} of budget {fmt_bytes(plan.budget_bytes)} "
        f"({100 * plan.total_bytes / plan.budget_bytes:.1f}%), predicted error {plan.predicted_error:.5g}, "
        f"mean bits {avg['bits']:.2f}, mean rank {avg['rank']:.2f}"
    )


def pareto_plot(front, path) -> None:
    """Write the bytes-vs-predicted-error front as a PNG (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p.cost / 2**20 for p in front], [p.error for p in front], "o-")
    ax.set_xlabel("plan bytes (MiB)")
    ax.set_ylabel("predicted error")
    ax.set_yscale("log")
    ax.set_title("autoqra Pareto front")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

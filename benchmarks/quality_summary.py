"""Every quality row measured so far in one figure: perplexity after the longest fine-tune against held bytes.

``benchmarks/quality.py`` writes one JSON (and one PNG) per run, and the rows of the quality benchmark were
measured over several runs (budgets, seeds and rows added as the work went on). This script reads those
files (``benchmarks/results/quality_*.json``, the ``--quick`` ones left out) and draws every (budget, row) —
the mean over its seeds after ``--step`` steps — against the bytes its model held, with the Pareto front (the
rows no other row beats in both bytes and perplexity). It also writes the points to JSON and prints them as
a table. Nothing is measured here: every figure is one of those files' own.

Only the runs of one model at one quantization group size are drawn together (``--model``, default
``smollm2-135m``; ``--group-size``, default 64): a file that records neither is SmolLM2 at group 64 (the
benchmark's only setting before it recorded them), except where :data:`FILE_MODEL` says otherwise. A row
measured in several files with the same seed (a re-run of the same plan) counts once: the newest run wins
(the date in the file's ``machine`` record; files without one count as older, then by name), except where
:data:`SUPERSEDED` names a row a later code change replaced.

    python benchmarks/quality_summary.py            # → results/quality_summary.{png,json}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS  # noqa: E402

# what each row of benchmarks/quality.py is, per budget where the name alone does not say
LABELS = {
    "uniform": {"u2": "uniform 2-bit r8", "u3": "uniform 3-bit r8"},
    "uniform4": "uniform 4-bit r8",
    "hqq": "HQQ 3-bit r8",
    "hqq4": "HQQ 4-bit r8",
    "qlora": "QLoRA nf4 r16",
    "fp32": "fp32 weights + LoRA r8 (ceiling)",
    "default": "autoqra default",
    "deploy": "autoqra deploy",
    "evolutionary": "autoqra evolutionary",
}


#: (file, budget, row) → why that file's row is left out: measured with code a later fix changed
SUPERSEDED = {
    ("quality_u3_rows.json", "u3", "evolutionary"):
        "before the fine-tune-choice fix; quality_u3_evolutionary_v2.json re-measured it",
}

#: file → the model it measured, for files written before the benchmark recorded its model
FILE_MODEL = {"quality_gemma3_u3.json": "gemma-3-270m"}

#: (budget, row) → what the row was when it ran, where today's default would differ
NOTES = {
    ("u3", "lambda1"): "λ = 1 forced (2026-12-03 code); today's default picks λ = 1 at u3",
}


def label(budget: str, row: str) -> str:
    """A readable name for one (budget, row) of the quality benchmark."""
    name = LABELS.get(row, row)
    if isinstance(name, dict):
        name = name.get(budget, f"{row} ({budget})")
    if row.startswith("lambda"):
        name = f"autoqra λ = {row[len('lambda'):]}"
    if row in ("default", "deploy", "evolutionary") or row.startswith("lambda"):
        name += f" @ {budget}"
    return name


def _run_setting(path: Path, data: dict[str, Any]) -> tuple[str, int]:
    """(model, group size) of one result file (see the module docstring for files that record neither)."""
    model = data.get("model") or FILE_MODEL.get(path.name, "smollm2-135m")
    return str(model), int(data.get("group_size") or 64)


def collect(files: list[Path], step: int, model: str = "smollm2-135m", group_size: int = 64) -> list[dict[str, Any]]:
    """One point per (budget, row): mean bytes and perplexities over its seeds, rows without ``step`` left out;
    only the files of ``model`` at ``group_size``, the newest run of each (budget, row, seed)."""
    by_seed: dict[tuple[str, str, int], tuple[dict[str, Any], str]] = {}
    loaded = [(path, json.loads(path.read_text())) for path in files]
    # oldest first, so that a later run of the same (budget, row, seed) replaces an earlier one
    loaded.sort(key=lambda item: (str(item[1].get("machine", {}).get("date") or ""), item[0].name))
    for path, data in loaded:
        if data.get("quick") or _run_setting(path, data) != (model, group_size):
            continue
        for r in data.get("rows", []):
            if (path.name, r.get("budget"), r.get("row")) in SUPERSEDED:
                continue
            if "ppl" in r and str(step) in r["ppl"]:
                by_seed[(r["budget"], r["row"], int(r["seed"]))] = (r, path.name)
    groups: dict[tuple[str, str], list[tuple[dict[str, Any], str]]] = {}
    for (budget, row, _), item in sorted(by_seed.items()):
        groups.setdefault((budget, row), []).append(item)
    points = []
    for (budget, row), items in groups.items():
        rs = [r for r, _ in items]
        points.append(dict(
            label=label(budget, row), budget=budget, row=row, seeds=sorted(int(r["seed"]) for r in rs),
            held_bytes=round(sum(r["held_bytes"] for r in rs) / len(rs)),
            ppl_step0=sum(r["ppl"]["0"] for r in rs) / len(rs) if all("0" in r["ppl"] for r in rs) else None,
            ppl=sum(r["ppl"][str(step)] for r in rs) / len(rs), files=sorted({f for _, f in items}),
            note=NOTES.get((budget, row))))
    return sorted(points, key=lambda p: (p["held_bytes"], p["ppl"]))


def settings(files: list[Path], step: int) -> set[tuple[str, int]]:
    """The (model, group size) pairs of the non-quick files that hold rows measured after ``step`` steps."""
    found = set()
    for path in files:
        data = json.loads(path.read_text())
        if not data.get("quick") and any(str(step) in r.get("ppl", {}) for r in data.get("rows", [])):
            found.add(_run_setting(path, data))
    return found


def pareto(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats in both bytes and perplexity (ties in bytes: the lower perplexity)."""
    front: list[dict[str, Any]] = []
    for p in sorted(points, key=lambda p: (p["held_bytes"], p["ppl"])):
        if not front or p["ppl"] < front[-1]["ppl"]:
            front.append(p)
    return front


def plot(points: list[dict[str, Any]], front: list[dict[str, Any]], step: int, path: Path, title: str) -> None:
    """Numbered points (the legend names them), the front as a step line; a row far to the right of the others
    (the fp32 ceiling) is drawn as a dashed level instead of stretching the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 2**20
    near = [p for p in points if p["held_bytes"] <= 2 * points[0]["held_bytes"]]
    far = [p for p in points if p not in near]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    shown = [p for p in front if p in near]
    ax.step([p["held_bytes"] / mib for p in shown], [p["ppl"] for p in shown], where="post", color="0.6", lw=1,
            label="Pareto front")
    for p in far:
        ax.axhline(p["ppl"], ls="--", color="0.5", lw=1,
                   label=f"{p['label']}: {p['ppl']:.2f} at {p['held_bytes'] / mib:.0f} MiB")
    for i, p in enumerate(near, 1):
        ours = p["row"] in ("default", "deploy", "evolutionary") or p["row"].startswith("lambda")
        color = "C0" if ours else "C1"
        ax.plot(p["held_bytes"] / mib, p["ppl"], "o" if ours else "s", color=color, ms=7,
                label=f"{i}. {p['label']} ({len(p['seeds'])} seed{'s' * (len(p['seeds']) > 1)}): {p['ppl']:.2f}")
        ax.annotate(str(i), (p["held_bytes"] / mib, p["ppl"]), textcoords="offset points",
                    xytext=(6, 4 if i % 2 else -10), fontsize=8, color=color)
    ax.set_xlabel("bytes held by the quantized layers + adapters (MiB)")
    ax.set_ylabel(f"perplexity after {step} steps, Lee evaluation split")
    ax.set_title(f"{title} + Lee: every quality row after {step} fine-tuning steps "
                 "(circles: autoqra, squares: baselines; mean over seeds)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of quality_*.json (default: "
                        "benchmarks/results)")
    parser.add_argument("--step", type=int, default=100, help="fine-tuning steps to read (default 100)")
    parser.add_argument("--out", default="quality_summary", help="name of the written .json/.png (in --results)")
    parser.add_argument("--model", default="smollm2-135m",
                        help="the model whose runs are drawn (a result file's 'model'; default smollm2-135m)")
    parser.add_argument("--group-size", type=int, default=64,
                        help="the quantization group size whose runs are drawn (default 64)")
    args = parser.parse_args(argv)
    files = [f for f in args.results.glob("quality_*.json") if not f.name.startswith(args.out)]
    points = collect(files, args.step, args.model, args.group_size)
    if not points:
        present = sorted(settings(files, args.step))
        hint = ("; runs there: " + ", ".join(f"--model {m} --group-size {g}" for m, g in present)) if present else ""
        raise SystemExit(f"no quality rows of {args.model} at group {args.group_size} with step {args.step} in "
                         f"{args.results}{hint}")
    front = pareto(points)
    for p in points:
        p["on_front"] = p in front
    payload = {"step": args.step, "model": args.model, "group_size": args.group_size, "points": points,
               "note": "read from benchmarks/quality.py's result files (listed per point); nothing measured here"}
    (args.results / f"{args.out}.json").write_text(json.dumps(payload, indent=1) + "\n")
    plot(points, front, args.step, args.results / f"{args.out}.png", f"{args.model}, group {args.group_size}")
    print(f"| row | held bytes | seeds | ppl step 0 | ppl step {args.step} | on the front | note |")
    print("|---|---|---|---|---|---|---|")
    for p in points:
        step0 = "–" if p["ppl_step0"] is None else f"{p['ppl_step0']:.2f}"
        print(f"| {p['label']} | {p['held_bytes']:,} | {len(p['seeds'])} | {step0} | {p['ppl']:.2f} | "
              f"{'yes' if p['on_front'] else ''} | {p['note'] or ''} |")
    return payload


if __name__ == "__main__":
    main()

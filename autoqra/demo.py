"""The main job on the embedded default: SmolLM2-135M + the Lee corpus, end to end.

`run_demo(emit)` loads the model and text (or takes them), calibrates once, and compares on the Lee
evaluation split, at the bytes of uniform 3-bit rank 8 (or ``budget``):

* **fast** (default, ~5 minutes on 2 cores): fp32; uniform 4-bit r0 (as compiled: a point of the
  uniform line, built from the roundings the error tables already made); uniform 3-bit r8 and the
  autoqra default, each as compiled and after the **selection's short fine-tune** — the adapters the
  default compile trained to score its candidates (`CompileResult.scored_adapters`: 8 AdamW steps of
  2×256 tokens of the calibration windows, the same recipe for every candidate), evaluated on the Lee
  evaluation split, so nothing is fine-tuned twice (a plan the selection did not fine-tune gets
  `autoqra.passes.select.short_finetune`, the same recipe); 6 evaluation windows (the default-to-uniform
  ratios on 6 windows are within 0.003 of those on 16, on 8 within 0.006: benchmarks/RESULTS.md).
* **full** (``full=True``): also uniform 2-bit r8 and the autoqra ``deploy`` plan, uniform 4-bit at
  r8, every quantized row fine-tuned ``finetune_steps`` (default 10) steps of `RECIPE` on the Lee
  training split, 16 evaluation windows (the numbers in ``benchmarks/RESULTS.md``).

Every compile shares the one calibration and the error tables (the default compile runs first;
the uniform compiles read its table from the cache). As soon as the default compile has chosen and
fine-tuned its plan, the fine-tuned model's ONNX export starts in a background process
(`autoqra.export.background`: its tracing is single-threaded Python) while this one evaluates and
compiles the other rows on the other core; the export's latencies are then timed on a quiet machine. ``out_dir`` receives ``summary.png``
(perplexity against bytes), ``plan_default.png`` (the default plan per block × projection),
``report.md`` and ``results.json``. ``emit`` receives the lines to show (the CLI passes ``print``).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from autoqra.analysis import analyze, uniform_costs
from autoqra.api import calibrate, compile
from autoqra.budget import Budget
from autoqra.evaluate import perplexity
from autoqra.footprint import layers_held_bytes
from autoqra.ir.cost import CostModel
from autoqra.passes.select import SelectConfig, short_finetune
from autoqra.quant.memo import quant_memo
from autoqra.report import fmt_bytes, probe_summary, selection_table, table
from autoqra.train import adapter_state, finetune, load_adapter_state

logger = logging.getLogger(__name__)

#: the fine-tuning recipe of every fine-tuned row (AdamW, constant lr, Lee training split): 2×256 tokens a
#: step, half the quality benchmark's batch, so that the demo's two fine-tunes take ~1 minute each
RECIPE = {"lr": 5e-4, "batch_size": 2, "seq_len": 256, "seed": 0}
#: evaluation windows per forward: a compiled model dequantizes its packed weights once per forward, so the
#: fast demo's windows go in one (the output layer and the loss run in chunks: no [8, 512, vocab] logits)
_EVAL_BATCH = 8


def real_bytes(model: nn.Module) -> int:
    """Bytes the compiled layers really hold, measured through their tensor storages (codes,
    scales, zeros, adapters, any kernel copy; biases excluded as the cost model excludes them)."""
    return layers_held_bytes(model)


def plan_summary(plan) -> list[list[Any]]:  # noqa: ANN001
    """Rows (bits, rank, layers, bytes) of how many layers took each choice."""
    counts = Counter(plan.layers.values())
    size: Counter = Counter()
    for name, choice in plan.layers.items():
        size[choice] += plan.layer_bytes[name]
    return [[b, r, n, fmt_bytes(size[(b, r)])] for (b, r), n in sorted(counts.items())]


def run_demo(emit: Callable[[str], None], **kwargs: Any) -> dict[str, Any]:
    """Run the demo (see the module docstring; keyword arguments as `_run_demo`'s); a background ONNX
    export still running when the demo fails is stopped."""
    with contextlib.ExitStack() as stack:
        return _run_demo(stack, emit, **kwargs)


def _run_demo(
    stack: contextlib.ExitStack,
    emit: Callable[[str], None],
    *,
    full: bool = False,
    out_dir: str | Path | None = "demo_out",
    budget: str | int | None = None,
    calib_windows: int = 8,
    eval_windows: int | None = None,
    seq_len: int = 512,
    solver: str = "exact",
    group_size: int = 64,
    finetune_steps: int | None = None,
    model: nn.Module | None = None,
    tokenizer: object = None,
    progress: bool = True,
    export: bool = True,
) -> dict[str, Any]:
    from autoqra.data import lee_corpus_text, split_tokens, window_bos_id, windows

    start = time.perf_counter()
    if model is None:
        from autoqra.zoo import load_default_model

        model, tokenizer = load_default_model()
    eval_windows = eval_windows or (16 if full else 6)
    emit(f"model: SmolLM2-135M-Instruct, {sum(p.numel() for p in model.parameters()):,} parameters; "
         f"{'full' if full else 'fast'} demo")
    splits = split_tokens(lee_corpus_text(), tokenizer)
    bos = window_bos_id(tokenizer)
    calib = windows(splits.calibration, seq_len=seq_len, max_windows=calib_windows, bos_token_id=bos)
    evals = windows(splits.evaluation, seq_len=seq_len, max_windows=eval_windows, bos_token_id=bos)
    emit(f"text: Lee corpus, {splits.n_total:,} tokens = {splits.n_calibration:,} calibration + "
         f"{splits.n_evaluation:,} evaluation; using {calib.shape[0]}×{seq_len} calibration and "
         f"{evals.shape[0]}×{seq_len} evaluation tokens")

    program = analyze(model)
    graph = program.graph
    cost_model = CostModel(group_size=group_size)
    emit(f"capture route: {program.route}; {len(graph)} quantizable layers in "
         f"{len({graph.annotation(n).block for n in graph.order()} - {None})} blocks, "
         f"{len(graph.groups())} fusion groups")
    uniform = {b: uniform_costs(graph, cost_model, (b,), 8)[0].nbytes for b in (2, 3, 4)}
    target = Budget.parse(budget).resolve(graph.total_numel()) if budget is not None else uniform[3]

    t = time.perf_counter()
    cal = calibrate(model, calib, progress=progress)
    emit(f"calibration (activations, output and weight gradients): {time.perf_counter() - t:.1f} s")

    n_weights = graph.total_numel()
    # fast: the selection's short fine-tune (its adapters reused); full / an explicit step count: RECIPE
    reuse_selection = finetune_steps is None and not full
    select_config = SelectConfig()  # the default compile's selection recipe
    if finetune_steps is None:
        finetune_steps = select_config.score_steps if reuse_selection else 10
    recipe: dict[str, Any] = RECIPE
    if reuse_selection:
        cfg = select_config
        recipe = {"lr": cfg.lr, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "seed": cfg.seed,
                  "data": f"the {len(cal.batches)} calibration windows (the selection's short fine-tune)"}
    results: dict[str, Any] = {"mode": "full" if full else "fast", "eval_windows": int(evals.shape[0]),
                               "finetune_steps": finetune_steps, "recipe": recipe, "rows": {}}

    # (label, bytes, compile kwargs, fine-tune?, uniform?) — the default first: its error table is then
    # cached for the others
    variants: list[tuple[str, int, dict[str, Any], bool, bool]] = [
        ("autoqra default", target, {"solver": solver}, True, False),
        ("uniform 3-bit r8", uniform[3], {"bits": (3,), "ranks": (8,)}, True, True),
        # fast: rank 0, built from the error tables' own 4-bit roundings (seconds; r8 needs LoftQ inits)
        (f"uniform 4-bit r{8 if full else 0}", uniform[4] if full else uniform_costs(graph, cost_model, (4,), 0)[0].nbytes,
         {"bits": (4,), "ranks": (8 if full else 0,)}, full, True),
    ]
    if full:
        variants += [
            ("uniform 2-bit r8", uniform[2], {"bits": (2,), "ranks": (8,)}, True, True),
            # the step-0 objective: spends bytes on bits and starves ranks, which fine-tuning then lacks
            ("autoqra deploy", target, {"solver": solver, "objective": "deploy"}, True, False),
        ]
    rows = results["rows"]
    scored: dict[str, Any] = {}  # the default compile's short-fine-tuned adapters, by candidate label
    default_model = None  # the compiled (and fine-tuned) default, kept for the ONNX export's measurements
    do_export = export and out_dir is not None and tokenizer is not None
    job: Any = None  # the background export (entered in ``stack``: stopped if the demo fails)

    def evaluate(m: nn.Module) -> float:
        if job is not None:
            job.poll()  # the export has ended: this process gets its cores back
        return perplexity(m, evals, batch_size=_EVAL_BATCH, progress=False)

    def fp32_perplexity() -> float:
        t = time.perf_counter()
        value = evaluate(model)
        emit(f"fp32 perplexity: {value:.2f} ({time.perf_counter() - t:.1f} s)")
        results["fp32"] = {"ppl": value, "bytes": n_weights * 4}
        return value

    def start_export(compiled: nn.Module) -> None:
        # the fine-tuned default's ONNX export runs in a child process (one core) while the demo evaluates
        # and compiles the rest on the other: its tracing is single-threaded Python (autoqra.export.background)
        nonlocal job
        if do_export and job is None:
            from autoqra.export.background import export_in_background

            job = stack.enter_context(export_in_background(compiled, Path(out_dir) / "onnx", tokenizer=tokenizer,
                                                                overwrite=True))
            emit("ONNX export of the fine-tuned default started in a background process")

    # one memo for every compile: the uniform compiles reuse the default compile's roundings, and the
    # uniform plan the selection built as a candidate (LoftQ inits kept: ~0.5 GB for SmolLM2)
    with quant_memo(1 << 30, inits=True):
        for label, nbytes, kwargs, tune, is_uniform in variants:
            work = copy.deepcopy(model)
            t = time.perf_counter()
            result = compile(work, nbytes, calib=cal, group_size=group_size, progress=progress, **kwargs)
            seconds = time.perf_counter() - t
            if label == "autoqra default":
                scored = result.scored_adapters
                winner = (result.report.get("selection") or {}).get("winner")
                if reuse_selection and winner in scored:  # the fine-tuned default is known: export it now
                    compiled_state = adapter_state(work)
                    load_adapter_state(work, scored[winner])
                    start_export(work)
                    load_adapter_state(work, compiled_state)
                fp32 = fp32_perplexity()  # (after the export started: it runs beside it)
            ppl = evaluate(work)
            measured = real_bytes(work)  # after forwards: a cache beside the weights would show here
            emit(f"{label}: compiled in {seconds:.1f} s; held bytes {measured:,} vs plan "
                 f"{result.plan.total_bytes:,} ({'equal' if measured == result.plan.total_bytes else 'DIFFERENT'}); "
                 f"perplexity {ppl:.2f}")
            rows[label] = {"ppl": ppl, "bytes": measured, "plan_bytes": result.plan.total_bytes,
                           "seconds": seconds, "uniform": is_uniform, "plan": result.plan,
                           "selection": result.report.get("selection"),
                           "error_probe": result.report.get("error_probe"), "timings": result.report.get("timings"),
                           "quant_memo": result.report.get("quant_memo")}
            if tune and finetune_steps and reuse_selection:
                t = time.perf_counter()
                selection = rows["autoqra default"].get("selection") or {}
                # the default's winner, or this plan among the default's candidates (same plan, same init)
                name = selection.get("winner") if label == "autoqra default" else label
                if name in scored:
                    load_adapter_state(work, scored[name])
                    how = f"the selection's short fine-tune of {name!r}, reused"
                else:  # not fine-tuned by the selection (e.g. scores from the cache): the same recipe here
                    short_finetune(work, list(cal.batches), select_config)
                    how = "the selection's short fine-tune recipe, run here"
                if label == "autoqra default":
                    start_export(work)
                after = evaluate(work)
                emit(f"{label}: after {finetune_steps} adapter steps ({how}: AdamW lr {recipe['lr']:g}, "
                     f"{recipe['batch_size']}×{recipe['seq_len']} tokens of the calibration windows) "
                     f"[{time.perf_counter() - t:.1f} s]: perplexity {ppl:.2f} → {after:.2f}")
                rows[label]["ppl_finetuned"] = after
            elif tune and finetune_steps:
                t = time.perf_counter()
                finetune(work, splits.calibration, steps=finetune_steps, lr=RECIPE["lr"], batch_size=RECIPE["batch_size"],
                         seq_len=RECIPE["seq_len"], seed=RECIPE["seed"], progress=progress)
                if label == "autoqra default":
                    start_export(work)
                after = evaluate(work)
                emit(f"{label}: {finetune_steps} fine-tuning steps (adapters only, AdamW lr {RECIPE['lr']:g}, "
                     f"{RECIPE['batch_size']}×{RECIPE['seq_len']} tokens of the Lee training split) in "
                     f"{time.perf_counter() - t:.1f} s: perplexity {ppl:.2f} → {after:.2f}")
                rows[label]["ppl_finetuned"] = after
            if label == "autoqra default":
                default_model = work
                start_export(work)  # (not fine-tuned: finetune_steps=0)
            del work
            gc.collect()
    # results under the old flat keys too (scripts and tests read results["uniform 3-bit r8"])
    results.update(rows)

    order = sorted(rows, key=lambda k: -rows[k]["bytes"])
    table_rows = [["fp32 (original)", fmt_bytes(n_weights * 4), "32", f"{fp32:.2f}", "-", "-"]]
    for label in order:
        r = rows[label]
        table_rows.append([label, fmt_bytes(r["bytes"]), f"{8 * r['bytes'] / n_weights:.2f}", f"{r['ppl']:.2f}",
                           f"{r['ppl'] / fp32:.3f}",
                           f"{r['ppl_finetuned']:.2f}" if "ppl_finetuned" in r else "-"])
    headers = ["model", "bytes", "bits/weight", "perplexity", "vs fp32", f"after {finetune_steps} steps"]
    default = rows["autoqra default"]
    emit("\nautoqra default plan (layers per choice):")
    emit(table(["bits", "rank", "layers", "bytes"], plan_summary(default["plan"])))
    selection = default.get("selection")
    if selection:
        emit(f"\nautoqra default: candidates scored on held-back calibration windows ({selection['fidelity']}; "
             f"mean next-token loss, lower is better), winner: {selection['winner']}")
        emit(selection_table(selection))
        emit(probe_summary(default.get("error_probe")))
    emit(f"\nLee evaluation perplexity ({evals.shape[0]}×{seq_len} tokens):")
    emit(table(headers, table_rows))
    ratios = []
    if target == uniform[3]:
        uni = rows["uniform 3-bit r8"]
        emit("")
        for label, suffix in (("autoqra default", ""), ("autoqra deploy", "_deploy")):
            if label not in rows:
                continue
            plan = rows[label]
            ratio = plan["ppl"] / uni["ppl"]
            line = f"{label} vs uniform 3-bit r8 at the same bytes: {ratio:.3f}× the perplexity after compiling"
            results["ratio_vs_uniform3" + suffix] = ratio
            if "ppl_finetuned" in plan and "ppl_finetuned" in uni:
                tuned_ratio = plan["ppl_finetuned"] / uni["ppl_finetuned"]
                line += f", {tuned_ratio:.3f}× after {finetune_steps} fine-tuning steps"
                results["ratio_vs_uniform3_finetuned" + suffix] = tuned_ratio
            emit(line)
            ratios.append(line)
    pictures = _write_pictures(Path(out_dir), results, graph, fp32, finetune_steps) if out_dir is not None else {}
    export_lines: list[str] = []
    if job is not None and default_model is not None:
        from autoqra.analysis import untouched_bytes
        from autoqra.demo_export import export_demo

        emit("")
        onnx = export_demo(default_model, model, tokenizer, splits.evaluation[:24].reshape(1, -1),
                           Path(out_dir) / "onnx", default["plan_bytes"] + untouched_bytes(model, graph),
                           fp32_onnx=full, progress=progress, exported=job)
        export_lines = onnx.lines()
        for line in export_lines:
            emit(line)
        results["onnx"] = onnx.to_dict()
    del default_model
    seconds = time.perf_counter() - start
    results["seconds"] = seconds
    if out_dir is not None:
        _write_outputs(Path(out_dir), emit, results, pictures, table_rows, headers, ratios, finetune_steps,
                       seconds, export_lines)
    emit(f"demo done in {seconds:.0f} s")
    return results


def _write_pictures(out: Path, results: dict[str, Any], graph, fp32: float, steps: int) -> dict[str, str]:  # noqa: ANN001
    """``summary.png`` and the plans' heat maps (written while a background export may still run);
    returns {what: file name}."""
    from autoqra.demo_figures import DemoRow, plan_heatmap, summary_plot

    out.mkdir(parents=True, exist_ok=True)
    rows = results["rows"]
    summary_plot([DemoRow(label, r["bytes"], r["ppl"], r.get("ppl_finetuned"), r["uniform"])
                  for label, r in rows.items()], out / "summary.png", fp32_ppl=fp32, steps=steps)
    pictures = {"summary": "summary.png"}
    for label in ("autoqra default", "autoqra deploy"):
        if label in rows:
            name = "plan_" + label.split()[-1] + ".png"
            plan_heatmap(rows[label]["plan"], graph, out / name, title=f"{label}: bits and adapter rank per layer")
            pictures[label] = name
    return pictures


def _write_outputs(out: Path, emit: Callable[[str], None], results: dict[str, Any], pictures: dict[str, str],
                   table_rows, headers, ratios: list[str], steps: int, seconds: float,  # noqa: ANN001
                   export_lines: list[str]) -> None:
    from autoqra.demo_figures import write_report

    rows = results["rows"]
    plans = {label: rows[label]["plan"] for label in ("autoqra default", "autoqra deploy") if label in rows}
    recipe = results["recipe"]
    data = recipe.get("data", "the Lee training split")
    header = [f"SmolLM2-135M-Instruct + Lee corpus, {results['mode']} demo, {results['eval_windows']}×512 evaluation "
              f"tokens, {steps} adapter fine-tuning steps (AdamW lr {recipe['lr']:g}, {recipe['batch_size']}×"
              f"{recipe['seq_len']} tokens of {data}, seed {recipe['seed']}); {seconds:.0f} s in all.", "", *ratios]
    write_report(out / "report.md", header=header, rows=table_rows, row_headers=headers,
                 selection=rows["autoqra default"].get("selection"), plans=plans, pictures=pictures,
                 export_lines=export_lines)
    plain = {k: v for k, v in results.items() if k not in rows}
    plain["rows"] = {label: {k: (v.to_dict() if k == "plan" else v) for k, v in r.items()}
                     for label, r in rows.items()}
    (out / "results.json").write_text(json.dumps(plain, indent=1, sort_keys=True, default=str) + "\n")
    emit(f"\nwrote {out / 'summary.png'} (perplexity against bytes), {out / 'report.md'} (tables + the plan as "
         f"a heat map: {', '.join(p for k, p in pictures.items() if k != 'summary')}) and {out / 'results.json'}")

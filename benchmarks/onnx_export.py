"""ONNX export of a compiled SmolLM2: file size, onnxruntime latency, parity (one run, ratios).

Plans (data-free, ``objective="deploy"``, so the run needs no calibration):

* ``mostly 4-bit``: bits {4, 8}, rank 8, at 5.3 bits a weight (uniform 4-bit r8 is 5.24 on SmolLM2);
* ``mixed 2/3/4/8``: pinned by pattern (q/k/v share a fusion group) — attention q/k/v 2-bit, o 4-bit, MLP gate/up 3-bit, down 8-bit —
  ranks {0, 8} chosen by the solver at 5 bits a weight;
* ``4-bit + 8-bit lm_head``: as ``mostly 4-bit`` with the (tied) ``lm_head`` included and pinned to
  8 bits, at 6.3 bits a weight: what an edge deployment ships (the fp32 vocabulary projection is
  most of a small model's bytes read per decoded token; the embedding stays float for its lookup).
* ``uniform 4-bit r8 + 4-bit lm_head``: every layer and the ``lm_head`` at 4 bits, rank 8 (no 8-bit
  layers: their kernel is the slow one at decode).
* ``uniform 4-bit r0 + 4-bit lm_head``: the same without adapters (rank 0): what the adapters cost at decode.
* ``mostly 4-bit + 4-bit lm_head`` and ``mixed 2/3/4/8 + 4-bit lm_head``: the first two with the ``lm_head``
  included and pinned to 4 bits (at the same bits a weight).

``--genai-reference`` adds onnxruntime-genai's own model builder on the base model (its fp32 file and its
int4 round-to-nearest file without adapters), timed in the same run: the export a user would otherwise make.
``--genai-runtime`` also times every folder under onnxruntime-genai's own runtime (``og.Generator``);
``--ort-attention`` adds the fp32 base and each plan exported with ``attention="onnxruntime"``.

Each is exported with the KV cache at ``accuracy_level`` 4 (int8 activations: the fast CPU kernels)
and 0 (exact fp32), with the layers that share an input fused (``export_onnx``'s default; ``--unfused`` adds
each plan exported one ``MatMulNBits`` a layer; ``--model-attention`` adds the fp32 base and each plan exported
with the model's own attention instead of the grouped-query form), and verified
(logits vs PyTorch, 16 greedy tokens through the cache graph and onnxruntime-genai). Measured, all
in this process with the same thread count: the file's bytes against the plan's bytes plus the
untouched parameters (3-bit container cost separately); prompt latency (128 tokens, empty cache)
and per-token decode latency (32 steps after the prompt) under onnxruntime CPU, against the fp32
ONNX export of the same base model (the same attention form) and against PyTorch eager on the compiled model.

``--paired-rounds N`` keeps every exported file of this run and, at the end, times their decode again *in
turns* (:func:`autoqra.export.latency.paired_decode`: N rounds, each decoding every file once), and reports
each plan's decode against its same-form fp32 file as the median over rounds of the per-round ratio, with its
range (with ``--genai-runtime``, under onnxruntime-genai as well): on a shared VM whose speed drifts by ~15%
between minutes, the ratio of two medians measured minutes apart is not a reliable figure, the per-round ratio
is.

    python benchmarks/onnx_export.py            # SmolLM2-135M, ~20 min on 2 cores
    python benchmarks/onnx_export.py --quick    # a tiny Llama (CI smoke)
    python benchmarks/onnx_export.py --model smollm2-360m-shape   # SmolLM2-360M's shape, random weights
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import autoqra  # noqa: E402
from autoqra.analysis import untouched_bytes  # noqa: E402
from autoqra.errors import ExportVerificationError  # noqa: E402
from autoqra.export import export_onnx, latency  # noqa: E402
from autoqra.export.decoder import DecoderShape, decoder_shape  # noqa: E402
from autoqra.export.verify import _feeds, session  # noqa: E402
from autoqra.report import table  # noqa: E402
from benchmarks.common import smollm2_360m_shape, write_json  # noqa: E402

logger = logging.getLogger("bench.onnx_export")


class _OwnInputs:
    """An onnxruntime session that drops the feeds its graph does not take (onnxruntime-genai's builder
    computes the positions from ``attention_mask``: its files have no ``position_ids`` input)."""

    def __init__(self, path: Path, threads: int) -> None:
        self._session = session(path, threads)
        self._inputs = {i.name for i in self._session.get_inputs()}

    def get_outputs(self):  # type: ignore[no-untyped-def]
        return self._session.get_outputs()

    def run(self, names, feeds):  # type: ignore[no-untyped-def]
        return self._session.run(names, {k: v for k, v in feeds.items() if k in self._inputs})


def onnx_latency(path: Path, shape: DecoderShape, prompt_len: int, decode_steps: int, threads: int,
                 repeats: int) -> tuple[float, float]:
    """(prompt seconds, seconds per decoded token) of the KV-cache graph in onnxruntime."""
    t = latency.onnx_latency(_OwnInputs(path, threads), shape, prompt_len=prompt_len, decode_steps=decode_steps,
                             repeats=repeats)
    return t.prompt_s, t.decode_s


def pair_rows(rows: list[dict], kept: dict[int, Path], shape: DecoderShape, args: argparse.Namespace,
              prompt_len: int, decode_steps: int) -> None:
    """``--paired-rounds``: every kept file's decode timed in turns (in onnxruntime, and with ``--genai-runtime``
    in onnxruntime-genai too); each row gets its per-round seconds and its median [range] ratio against the fp32
    file of its attention form."""
    fp32_of = {rows[i].get("attention"): i for i in kept if rows[i]["plan"].startswith("fp32 base")}
    runtimes = [("onnxruntime", "paired")] + [("genai", "paired_genai")] * args.genai_runtime
    for runtime, key in runtimes:
        logger.info("timing %d files' decode in %d interleaved rounds (%s)", len(kept), args.paired_rounds, runtime)
        timed = latency.paired_decode({str(i): path for i, path in kept.items()}, shape, rounds=args.paired_rounds,
                                      prompt_len=prompt_len, decode_steps=decode_steps, threads=args.threads,
                                      runtime=runtime)
        for i in kept:
            rows[i][f"{key}_decode_s"] = list(timed.seconds[str(i)])
            reference = fp32_of.get(rows[i].get("attention"), 0)
            median, low, high = timed.ratio(str(i), str(reference))
            rows[i][f"{key}_vs_fp32"] = dict(median=median, min=low, max=high, reference=rows[reference]["plan"])


def tiny_tokenizer(vocab: int):  # type: ignore[no-untyped-def]
    """A word-level fast tokenizer of ``vocab`` tokens: onnxruntime-genai's builder saves one beside the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    backend = Tokenizer(models.WordLevel(words, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="w1", bos_token="w1")


def genai_builder(base: torch.nn.Module, tokenizer, root: Path, precision: str, level: int) -> Path:  # type: ignore[no-untyped-def]
    """onnxruntime-genai's own model builder on the base model (saved as a Hugging Face folder): the reference
    export a user would otherwise make. ``int4`` is its round-to-nearest quantization with the same group
    (64) and the same activation accuracy level as autoqra's files, with no adapters; symmetric, the builder's
    default (its asymmetric option, ``is_symmetric=0``, wrote a file onnxruntime 1.32 refused to load for
    SmolLM2's tied embedding: a uint8 ``Reshape`` output where float was expected). Returns the folder's
    ``model.onnx``."""
    source, out = root / "hf", root / f"genai_{precision}"
    if not source.is_dir():
        base.save_pretrained(source)
        tokenizer.save_pretrained(source)
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", "reference", "-i", str(source),
               "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(root / "genai_cache")]
    if precision == "int4":
        command += ["--extra_options", f"accuracy_level={level}", "block_size=64"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"onnxruntime-genai's builder failed ({precision}):\n{done.stderr[-3000:]}")
    return out / "model.onnx"


def torch_latency(model: torch.nn.Module, vocab: int, prompt_len: int, decode_steps: int,
                  repeats: int) -> tuple[float, float]:
    """The same two figures for PyTorch eager (the model's cache, its fast CPU paths)."""
    t = latency.torch_latency(model, vocab, prompt_len=prompt_len, decode_steps=decode_steps, repeats=repeats)
    return t.prompt_s, t.decode_s


def onnx_perplexity(path: Path, shape: DecoderShape, windows: torch.Tensor, threads: int) -> float:
    """Perplexity of the exported graph over ``windows [n, seq]`` (one window at a time, empty cache)."""
    sess = _OwnInputs(path, threads)
    nll, count = 0.0, 0
    for window in windows:
        logits = sess.run(["logits"], _feeds(window[None], shape, np.dtype("float32")))[0][0]
        logp = torch.log_softmax(torch.from_numpy(logits[:-1]).double(), dim=-1)
        nll -= float(logp.gather(1, window[1:, None]).sum())
        count += window.numel() - 1
    return float(np.exp(nll / count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny Llama, few repeats (CI smoke)")
    parser.add_argument("--rtol", type=float, default=None,
                        help="the logit tolerance of each plan's export (default: export_onnx's); a plan that fails "
                             "verification is timed all the same from its kept files, and its row says 'failed'")
    parser.add_argument("--accuracy-levels", default="4,0",
                        help="MatMulNBits accuracy levels to export each plan at (default 4,0)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--ppl-windows", type=int, default=4,
                        help="Lee evaluation windows of 512 tokens for the perplexity of each file (default 4; 0: skip)")
    parser.add_argument("--plans", default=None,
                        help="comma-separated plan names to run (default: all; --quick: the first two)")
    parser.add_argument("--out", default=None,
                        help="results name under benchmarks/results (default onnx_export, onnx_export_quick with --quick)")
    parser.add_argument("--model", default="smollm2-135m", choices=("smollm2-135m", "smollm2-360m-shape"),
                        help="the real SmolLM2-135M (default) or SmolLM2-360M's shape with random weights (speed and "
                             "size only: its perplexity means nothing)")
    parser.add_argument("--unfused", action="store_true",
                        help="also export every plan with fuse_layers=False (one MatMulNBits a layer) and time it")
    parser.add_argument("--model-attention", action="store_true",
                        help="also export the fp32 base and every plan with attention='model' (the model's own "
                             "attention, repeating the KV cache per head) and time them")
    parser.add_argument("--genai-reference", action="store_true",
                        help="also build the base model with onnxruntime-genai's own model builder (fp32, and its "
                             "int4 round-to-nearest: group 64, symmetric, the first accuracy level, no adapters) and "
                             "time both in this run: the reference a user would otherwise export")
    parser.add_argument("--ort-attention", action="store_true",
                        help="also export the fp32 base and every plan with attention='onnxruntime' (onnxruntime's "
                             "GroupQueryAttention, a shared KV buffer in onnxruntime-genai) and time them")
    parser.add_argument("--genai-runtime", action="store_true",
                        help="also time every KV-cache folder under onnxruntime-genai's own runtime (og.Generator, "
                             "--threads intra-op threads): what the exported folder does where it is meant to run")
    parser.add_argument("--prompt-len", type=int, default=128,
                        help="tokens in the prompt before the timed decode steps (default 128; the KV cache the "
                             "decode reads grows with it)")
    parser.add_argument("--paired-rounds", type=int, default=0,
                        help="after the run, time every file's decode again in N interleaved rounds and report "
                             "the median per-round ratio against the same-form fp32 file (default 0: off)")
    parser.add_argument("--skip-latency", action="store_true",
                        help="quality only: no latency figures (writes onnx_export_quality.json)")
    args = parser.parse_args()
    if args.paired_rounds < 0:
        parser.error(f"--paired-rounds must be >= 0 (0: off), got {args.paired_rounds}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)

    if args.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny_models import tiny_llama

        base, tokenizer = tiny_llama(), None
        windows = torch.randint(0, 128, (max(args.ppl_windows, 0), 32), generator=torch.Generator().manual_seed(2))
        prompt_len, decode_steps, repeats = 16, 4, 2
        plans = {"mostly 4-bit": dict(bits=(4, 8), ranks=(4,), budget=78_000),
                 "mixed 2/3/4/8": dict(bits=(2, 3, 4, 8), ranks=(0, 4), budget="9bits")}
    else:
        from autoqra.data import lee_windows
        from autoqra.zoo import load_default_model

        base, tokenizer = load_default_model()
        if args.model == "smollm2-360m-shape":
            base = smollm2_360m_shape(base)
        windows = lee_windows(tokenizer, split="eval", seq_len=512, n=args.ppl_windows) if args.ppl_windows else None
        prompt_len, decode_steps, repeats = args.prompt_len, 32, 5
        plans = {"mostly 4-bit": dict(bits=(4, 8), ranks=(8,), budget="5.3bits"),
                 "mixed 2/3/4/8": dict(bits=(2, 3, 4, 8), ranks=(0, 8), budget="5bits"),
                 "4-bit + 8-bit lm_head": dict(bits=(4, 8), ranks=(8,), budget="6.3bits", include=("lm_head",),
                                                patterns={"lm_head": {"bits": 8}}),
                 "uniform 4-bit r8 + 4-bit lm_head": dict(bits=(4,), ranks=(8,), budget="8bits", include=("lm_head",)),
                 "uniform 4-bit r0 + 4-bit lm_head": dict(bits=(4,), ranks=(0,), budget="8bits",
                                                                    include=("lm_head",)),
                 # the two named plans with their lm_head quantized too (a 16-bit lm_head is 20% of SmolLM2's
                 # weights and reads 113 MB a token in fp32)
                 "mostly 4-bit + 4-bit lm_head": dict(bits=(4, 8), ranks=(8,), budget="5.3bits", include=("lm_head",),
                                                      patterns={"lm_head": {"bits": 4}}),
                 "mixed 2/3/4/8 + 4-bit lm_head": dict(bits=(2, 3, 4, 8), ranks=(0, 8), budget="5bits",
                                                       include=("lm_head",), patterns={"lm_head": {"bits": 4}})}
    if args.plans is not None:
        wanted = [p.strip() for p in args.plans.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in plans]
        if unknown:
            raise SystemExit(f"unknown plan(s) {unknown}; plans: {', '.join(plans)}")
        plans = {k: v for k, v in plans.items() if k in wanted}
    mixed_pins = {r"self_attn\.(q|k|v)_proj": {"bits": 2}, r"self_attn\.o_proj": {"bits": 4},
                  r"mlp\.(gate|up)_proj": {"bits": 3}, r"mlp\.down_proj": {"bits": 8}}
    for label in ("mixed 2/3/4/8", "mixed 2/3/4/8 + 4-bit lm_head"):
        if label in plans:
            plans[label]["patterns"] = {**mixed_pins, **plans[label].get("patterns", {})}
    shape = decoder_shape(base)
    out_root = Path(tempfile.mkdtemp(prefix="autoqra-onnx-bench-"))
    rows = []
    levels = [int(v) for v in args.accuracy_levels.split(",")]
    payload: dict = {"quick": args.quick, "model": "tiny llama" if args.quick else args.model,
                     "accuracy_levels": levels, "threads": args.threads, "prompt_len": prompt_len,
                     "decode_steps": decode_steps, "rows": rows}
    name = "onnx_export_quick" if args.quick else "onnx_export"
    if args.skip_latency:
        name += "_quality"
    if args.out:
        name = args.out
    if windows is not None and not len(windows):
        windows = None

    def timed(fn, *a):  # type: ignore[no-untyped-def]
        return (float("nan"), float("nan")) if args.skip_latency else fn(*a)

    def runtime(folder: Path) -> dict:
        """onnxruntime-genai's figures for one folder (None without --genai-runtime)."""
        if not args.genai_runtime or args.skip_latency:
            return dict(genai_prompt_s=None, genai_decode_s=None)
        t = latency.genai_latency(folder, prompt_len=prompt_len, decode_steps=decode_steps, repeats=repeats,
                                  threads=args.threads)
        return dict(genai_prompt_s=t.prompt_s, genai_decode_s=t.decode_s)

    def quality(model, path):  # type: ignore[no-untyped-def]
        if windows is None:
            return None, None
        from autoqra.evaluate import perplexity

        return onnx_perplexity(path, shape, windows, args.threads), perplexity(model, windows, progress=False)

    paired = args.paired_rounds > 0 and not args.skip_latency
    kept: dict[int, Path] = {}  # row index → its model.onnx, for --paired-rounds
    logger.info("fp32 ONNX export of the base model")
    fp32 = export_onnx(base, out_root / "fp32", tokenizer=tokenizer, accuracy_level=0)
    fp32_prompt, fp32_decode = timed(onnx_latency, fp32.model_file, shape, prompt_len, decode_steps, args.threads,
                                       repeats)
    fp32_onnx_ppl, fp32_torch_ppl = quality(base, fp32.model_file)
    rows.append(dict(plan="fp32 base", accuracy_level=None, file_bytes=fp32.file_bytes, plan_bytes=None, untouched_bytes=None,
                     container_extra_bytes=0, onnx_prompt_s=fp32_prompt, onnx_decode_s=fp32_decode,
                     parity=fp32.parity.as_dict(), export_s=fp32.seconds, layers={}, onnx_ppl=fp32_onnx_ppl,
                     torch_ppl=fp32_torch_ppl, attention=fp32.attention, **runtime(fp32.directory)))
    kept[0] = fp32.model_file
    other_forms = [("model", "fp32 base (model's attention)")] * args.model_attention + [
        ("onnxruntime", "fp32 base (GroupQueryAttention)")] * args.ort_attention
    for attention, label in other_forms:  # the fp32 base in each extra attention form, for same-form ratios
        other = export_onnx(base, out_root / f"fp32_{attention}_attention", tokenizer=tokenizer, accuracy_level=0,
                            attention=attention)
        o_prompt, o_decode = timed(onnx_latency, other.model_file, shape, prompt_len, decode_steps, args.threads,
                                   repeats)
        rows.append(dict(plan=label, accuracy_level=None, file_bytes=other.file_bytes, plan_bytes=None,
                         untouched_bytes=None, container_extra_bytes=0, onnx_prompt_s=o_prompt, onnx_decode_s=o_decode,
                         parity=other.parity.as_dict(), export_s=other.seconds, layers={}, onnx_ppl=None,
                         torch_ppl=None, attention=other.attention, **runtime(other.directory)))
        kept[len(rows) - 1] = other.model_file
    if args.genai_reference:
        reference_tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer(shape.vocab)
        for precision, label in (("fp32", "onnxruntime-genai builder fp32"),
                                 ("int4", "onnxruntime-genai builder int4 (RTN, no adapters)")):
            logger.info("onnxruntime-genai's builder: %s", precision)
            start = time.perf_counter()
            path = genai_builder(base, reference_tokenizer, out_root, precision, levels[0])
            built_s = time.perf_counter() - start
            g_prompt, g_decode = timed(onnx_latency, path, shape, prompt_len, decode_steps, args.threads, repeats)
            rows.append(dict(plan=label, accuracy_level=levels[0] if precision == "int4" else None,
                             file_bytes=sum(f.stat().st_size for f in path.parent.glob("model.onnx*")),
                             plan_bytes=None, untouched_bytes=None, container_extra_bytes=0, onnx_prompt_s=g_prompt,
                             onnx_decode_s=g_decode, parity=None, export_s=built_s, layers={},
                             onnx_ppl=None if windows is None else onnx_perplexity(path, shape, windows, args.threads),
                             torch_ppl=None, **runtime(path.parent)))
            write_json(name, payload)
            shutil.rmtree(path.parent, ignore_errors=True)

    for label, spec in plans.items():
        model = copy.deepcopy(base)
        result = autoqra.compile(model, spec["budget"], bits=spec["bits"], ranks=spec["ranks"], objective="deploy",
                                 select=False, cache_dir=None, progress=False, patterns=spec.get("patterns"),
                                 include=spec.get("include", ()))
        t_prompt, t_decode = timed(torch_latency, model, shape.vocab, prompt_len, decode_steps, repeats)
        forms = ([(True, "grouped")] + [(False, "grouped")] * args.unfused + [(True, "model")] * args.model_attention
                 + [(True, "onnxruntime")] * args.ort_attention)
        variants = [(level, fuse, attention) for level in levels for fuse, attention in forms]
        for level, fuse, attention in variants:
            tag = f"{label.replace(' ', '_').replace('/', '')}_{level}_{int(fuse)}_{attention}"
            try:
                exported = export_onnx(model, out_root / tag, tokenizer=tokenizer, accuracy_level=level,
                                       fuse_layers=fuse, attention=attention, rtol=args.rtol)
                folder, export_s, parity = exported.directory, exported.seconds, exported.parity.as_dict()
                done = {k: getattr(exported, k) for k in ("attention", "fused_groups", "file_bytes",
                                                          "container_extra_bytes", "layers")}
            except ExportVerificationError as exc:  # the kept files are timed all the same; the row says it failed
                folder, export_s = exc.directory, None
                marker = json.loads((folder / "EXPORT_FAILED.json").read_text())
                parity = {"failed": marker["message"], **marker["measured"]}  # the check's own message
                done = {k: marker[k] for k in ("attention", "fused_groups", "file_bytes", "container_extra_bytes",
                                               "layers")}
                logging.warning("%s at level %d failed verification (%s); timed all the same", label, level,
                                parity["failed"][:120])
            o_prompt, o_decode = timed(onnx_latency, folder / "model.onnx", shape, prompt_len, decode_steps,
                                       args.threads, repeats)
            onnx_ppl, torch_ppl = quality(model, folder / "model.onnx")
            rows.append(dict(
                plan=label + ("" if fuse else " (unfused)") + {"grouped": "", "model": " (model's attention)",
                                                               "onnxruntime": " (GroupQueryAttention)"}[attention],
                accuracy_level=level, fuse_layers=fuse, **done,
                plan_bytes=int(result.plan.total_bytes), untouched_bytes=untouched_bytes(base, result.program.graph),
                onnx_prompt_s=o_prompt, onnx_decode_s=o_decode, torch_prompt_s=t_prompt, torch_decode_s=t_decode,
                parity=parity, export_s=export_s, onnx_ppl=onnx_ppl, torch_ppl=torch_ppl, **runtime(folder),
            ))
            write_json(name, payload)
            if paired:
                kept[len(rows) - 1] = folder / "model.onnx"
            else:
                shutil.rmtree(folder, ignore_errors=True)
        write_json(name, payload)
        del model
    if paired:
        pair_rows(rows, kept, shape, args, prompt_len, decode_steps)
        write_json(name, payload)
        shutil.rmtree(out_root, ignore_errors=True)

    genai_columns = args.genai_runtime and not args.skip_latency
    header = ["plan", "level", "file MB", "plan + untouched MB", "file / expected", "3-bit container MB",
              "prompt ms", "decode ms/token", "decode vs fp32 ONNX (same form)", "decode vs torch", "logits max rel",
              "tokens equal", "ppl ONNX", "ppl torch"] + ["genai decode ms", "genai vs fp32 (same form)"] * genai_columns + [
                  f"paired vs fp32, median [range] of {args.paired_rounds} rounds"] * paired + [
                  "paired genai vs fp32"] * (paired and genai_columns)
    fp32_forms = {r.get("attention"): r for r in reversed(rows) if r["plan"].startswith("fp32 base")}

    def same_form(r):  # type: ignore[no-untyped-def]
        """The fp32 base row exported with the row's attention form (the builder's files: the default one)."""
        return fp32_forms.get(r.get("attention"), rows[0])

    body = []
    for r in rows:
        expected = None if r["plan_bytes"] is None else r["plan_bytes"] + r["untouched_bytes"]
        body.append([
            r["plan"], "—" if r["accuracy_level"] is None else r["accuracy_level"], f"{r['file_bytes'] / 1e6:.1f}", "—" if expected is None else f"{expected / 1e6:.1f}",
            "—" if expected is None else f"{r['file_bytes'] / expected:.3f}",
            f"{r['container_extra_bytes'] / 1e6:.2f}", f"{r['onnx_prompt_s'] * 1e3:.1f}",
            f"{r['onnx_decode_s'] * 1e3:.2f}", f"{r['onnx_decode_s'] / same_form(r)['onnx_decode_s']:.2f}",
            "—" if "torch_decode_s" not in r else f"{r['onnx_decode_s'] / r['torch_decode_s']:.2f}",
            "—" if r["parity"] is None else f"{r['parity']['max_rel']:.1e}",
            "—" if r["parity"] is None else ("failed" if "failed" in r["parity"] else
                                             f"{r['parity']['tokens_matched']}/{r['parity']['tokens_checked']}"),
            "—" if r.get("onnx_ppl") is None else f"{r['onnx_ppl']:.2f}",
            "—" if r.get("torch_ppl") is None else f"{r['torch_ppl']:.2f}",
        ] + ([] if not genai_columns else [
            f"{r['genai_decode_s'] * 1e3:.2f}", f"{r['genai_decode_s'] / same_form(r)['genai_decode_s']:.2f}"])
            + [("—" if r.get(f"{key}_vs_fp32") is None else
                "{median:.3f} [{min:.3f}–{max:.3f}]".format(**r[f"{key}_vs_fp32"]))
               for key in ["paired"] * paired + ["paired_genai"] * (paired and genai_columns)])
    print(table(header, body))


if __name__ == "__main__":
    main()

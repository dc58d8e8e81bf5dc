"""The GPU check in one run (`scripts/gpu_check.sh` calls it after the CUDA-marked tests): what the GPU path
costs against the usual baselines, measured in one process on one device, one table and one json.

1. **Layer speed**: packed 4-bit ``QuantLoRALinear`` (rank 8; eager, and under ``torch.compile``: CUDA graphs on a
   GPU) against a bf16 ``nn.Linear`` and
   bitsandbytes nf4 ``Linear4bit`` (when installed; CUDA only), forward at batch 1 and forward+backward
   at 4096 tokens, bf16 inputs; medians of ``--rounds`` interleaved rounds (synchronized timings).
   Goals: forward ≤ 1× bf16 at batch 1, forward+backward ≤ 1.5× at 4096 tokens.
2. **Compile**: ``autoqra.compile`` of SmolLM2 (``--quick``: a tiny Llama) on the device at the bytes
   of uniform 3-bit r8 with the default objective, against the CPU time recorded in
   ``benchmarks/results/demo_fast.txt`` (the fast demo's default compile, 2-core VM).
3. **Fine-tuning memory**: ``--steps`` steps (4 × 256 tokens of the Lee calibration split, AdamW lr 5e-4,
   the same batches for every row) of: the autoqra-compiled model (uniform 4-bit r8, adapters in fp32) from
   the fp32 and from the bf16 model; peft LoRA r8 on the fp32 base; peft LoRA r8 on the bf16 base; QLoRA
   (peft LoRA r16 on bitsandbytes nf4, when bitsandbytes is installed; it runs on a CPU too, slowly); each
   with the full fp32 logits, the bf16 rows and QLoRA also with the loss in token chunks (what
   ``autoqra.finetune`` does by default), the bf16 rows also with activation checkpointing on top, and the bf16
   compile under ``torch.compile`` (full logits; no tensor peak: compiled code allocates outside the dispatcher). Peak
   ``torch.cuda.max_memory_allocated`` (CUDA), the peak of live tensor storages (`autoqra.peak_memory`,
   every device: the model's bytes plus what the first two steps created), each against the bf16-base LoRA
   and QLoRA with the same loss, and tokens/s after those two steps. Goals: autoqra's peak ≤ 0.5× the bf16-base
   LoRA's and ≤ QLoRA's; tokens/s ≥ QLoRA's.
4. **Decoding**: greedy decoding with a static KV cache, time per token: the model as loaded (bf16 on a GPU, fp32
   on a CPU) against the uniform 4-bit r8 compile (scale/offset derived per call, kept with ``kernel_cache``,
   packed codes), eager, and the model and the 4-bit compile under ``torch.compile`` (CUDA graphs on a GPU).
5. **DDP**: ``torchrun --nproc_per_node 2 scripts/finetune_ddp.py`` (NCCL) when two GPUs are visible, else
   the single-process path of the same script.

    python benchmarks/gpu_check.py                         # on a CUDA machine (SmolLM2; minutes)
    python benchmarks/gpu_check.py --device cpu --quick    # every step on a tiny Llama on CPU (CI smoke)

Writes ``benchmarks/results/gpu_check.json`` (``gpu_check_quick.json`` with ``--quick``, ``<--out>.json`` when given).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import logging
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import autoqra  # noqa: E402
from autoqra.footprint import held_bytes  # noqa: E402
from autoqra.loss import auto_chunk_tokens, causal_lm_loss  # noqa: E402
from autoqra.modules.quant_lora_linear import QuantLoRALinear  # noqa: E402
from autoqra.peak_memory import StoragePeak  # noqa: E402
from autoqra.report import table  # noqa: E402
from autoqra.train import _gradient_checkpointing  # noqa: E402
from benchmarks.common import RESULTS, write_json  # noqa: E402

logger = logging.getLogger("bench.gpu_check")
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], Any], device: torch.device, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- 1. layer speed ------------------------------------------------------------------------------
def _layers(size: int, device: torch.device) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    linear = nn.Linear(size, size, bias=False)
    layers: dict[str, nn.Module] = {"bf16 nn.Linear": copy.deepcopy(linear).to(device, torch.bfloat16)}
    packed = QuantLoRALinear.from_linear(linear, 4, 8)
    layers["packed 4-bit r8"] = packed.to(device)
    layers["packed 4-bit r8, kernel_cache"] = QuantLoRALinear.from_linear(linear, 4, 8, kernel_cache=True).to(device)
    layers["packed 4-bit r8, fast_path=False"] = QuantLoRALinear.from_linear(linear, 4, 8, fast_path=False).to(device)
    layers["packed 3-bit r8"] = QuantLoRALinear.from_linear(linear, 3, 8).to(device)
    if HAS_BNB and device.type == "cuda":
        import bitsandbytes as bnb

        nf4 = bnb.nn.Linear4bit(size, size, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        nf4.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
        layers["bnb nf4"] = nf4.to(device)
    for layer in layers.values():
        for name, p in layer.named_parameters():
            p.requires_grad_(name.endswith(("lora_A", "lora_B")))
    return layers


def layer_speed(device: torch.device, size: int, rounds: int, quick: bool = False) -> list[dict[str, Any]]:
    rows = []
    layers = _layers(size, device)
    torch._dynamo.reset()
    layers["packed 4-bit r8, torch.compile"] = torch.compile(layers["packed 4-bit r8"], **_compile_options(device, quick))
    for tokens, mode in ((1, "forward"), (4096, "forward+backward")):
        x = torch.randn(tokens, size, device=device, dtype=torch.bfloat16)
        base = None
        for label, layer in layers.items():
            if mode == "forward":
                def run(layer: nn.Module = layer, x: torch.Tensor = x) -> None:
                    with torch.no_grad():
                        layer(x)
            else:
                def run(layer: nn.Module = layer, x: torch.Tensor = x) -> None:
                    xi = x.detach().requires_grad_()
                    layer(xi).float().square().mean().backward()
            seconds = _median_time(run, device, rounds)
            base = seconds if base is None else base
            rows.append({"section": "layer", "row": f"{label}, {mode}, {tokens} tokens", "seconds": seconds,
                         "vs bf16": seconds / base})
    return rows


# -- 2. compile ----------------------------------------------------------------------------------
#: SmolLM2-135M's architecture (its config.json), for ``--synthetic``
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                     rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
#: ``--synthetic --shape``: architectures (their config.json's shape fields) built with random weights
SHAPES = {
    "smollm2-135m": SMOLLM2_SHAPE,
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                           rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}


def _model_and_tokens(quick: bool, synthetic: bool = False,
                      shape: str = "smollm2-135m") -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(fp32 model, calibration windows [8, L], training tokens 1-D). ``synthetic``: the architecture ``shape``
    (`SHAPES`, default SmolLM2-135M's) with random weights and random tokens (for a GPU machine the real weights
    cannot reach, or a larger model than the embedded one: speed and memory do not depend on the values; the
    compile's choices do)."""
    if synthetic and not quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape])).eval()
        tokens = torch.randint(3, SHAPES[shape]["vocab_size"], (65536,), generator=torch.Generator().manual_seed(0))
        return model, tokens[: 8 * 512].view(8, 512), tokens
    if quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
        tokens = torch.randint(3, 128, (8192,), generator=torch.Generator().manual_seed(0))
        return LlamaForCausalLM(cfg).eval(), tokens[:1024].view(8, 128), tokens
    from autoqra.data import lee_corpus_text, split_tokens, window_bos_id, windows
    from autoqra.zoo import load_default_model

    model, tokenizer = load_default_model()
    splits = split_tokens(lee_corpus_text(), tokenizer)
    calib = windows(splits.calibration, seq_len=512, max_windows=8, bos_token_id=window_bos_id(tokenizer))
    return model, calib, splits.calibration


def _cpu_compile_seconds() -> float | None:
    path = RESULTS / "demo_fast.txt"
    if not path.is_file():
        return None
    found = re.search(r"autoqra default: compiled in ([0-9.]+) s", path.read_text())
    return float(found.group(1)) if found else None


def compile_time(model: nn.Module, calib: torch.Tensor, device: torch.device, quick: bool) -> list[dict[str, Any]]:
    from autoqra.analysis import analyze, uniform_costs
    from autoqra.ir.cost import CostModel

    work = copy.deepcopy(model).to(device)
    budget = uniform_costs(analyze(work).graph, CostModel(), (3,), 8)[0].nbytes
    _sync(device)
    start = time.perf_counter()
    result = autoqra.compile(work, budget, calib=calib.to(device), cache_dir=None, progress=False)
    _sync(device)
    seconds = time.perf_counter() - start
    cpu = None if quick else _cpu_compile_seconds()
    kept = all(t.device.type == device.type for t in list(work.parameters()) + list(work.buffers()))
    return [{"section": "compile", "row": f"default compile at uniform 3-bit r8 bytes (winner "
             f"{result.report.get('selection', {}).get('winner', '-')})", "seconds": seconds,
             "vs cpu": None if cpu is None else seconds / cpu, "device kept": kept}]


# -- 3. fine-tuning memory ---------------------------------------------------------------------
def _peft(model: nn.Module, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                            lora_dropout=0.0))


def _qlora(model: nn.Module, device: torch.device) -> nn.Module:
    """nf4 bases (bitsandbytes, block 64, double-quantized absmax) + peft LoRA r16 (α = 2r)."""
    import bitsandbytes as bnb

    for _, parent in list(model.named_modules()):
        for cname, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and cname != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             blocksize=64, compress_statistics=True)
                setattr(parent, cname, q)
    return _peft(model.to(device), 16)


def _train(model: nn.Module, tokens: torch.Tensor, device: torch.device, steps: int, seq_len: int,
           chunked: bool, checkpointing: bool = False, track: bool = True) -> dict[str, Any]:
    """``steps`` AdamW steps on the same batches; the first two run under `StoragePeak` (the second sees the
    optimizer state the first created), the rest are timed. ``chunked``: the loss as ``autoqra.finetune`` computes
    it by default (`autoqra.loss.auto_chunk_tokens`: the full logits never exist), else the full fp32 logits.
    ``checkpointing``: the model's activation checkpointing on, as ``finetune(gradient_checkpointing=True)``
    turns it on (non-reentrant). ``track=False``: the first two steps are not watched (``tensor_peak_bytes``
    None)."""
    with _gradient_checkpointing(model, checkpointing):
        return _train_loop(model, tokens, device, steps, seq_len, chunked, track)


def _train_loop(model: nn.Module, tokens: torch.Tensor, device: torch.device, steps: int, seq_len: int,
                chunked: bool, track: bool = True) -> dict[str, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4)
    windows = tokens[: (tokens.numel() // seq_len) * seq_len].view(-1, seq_len)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(0))
    chunk = auto_chunk_tokens(model) if chunked else None
    before = held_bytes(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    start, counted = None, 0
    tracker = StoragePeak()
    tracked = min(2, steps)
    for step in range(steps):
        idx = order[(torch.arange(4) + 4 * step) % windows.shape[0]]
        batch = {"input_ids": windows[idx].to(device)}
        with tracker if track and step < tracked else contextlib.nullcontext():
            loss, _ = causal_lm_loss(model, batch, use_cache_flag=True, chunk_tokens=chunk)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
        if step == tracked - 1:
            start = time.perf_counter()  # the tracked steps warm up
        elif step >= tracked:
            counted += batch["input_ids"].numel()
    seconds = time.perf_counter() - start if start is not None else 0.0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"peak_bytes": peak, "tensor_peak_bytes": tracker.peak_with(device, before) if track else None,
            "tokens_per_s": counted / seconds if seconds and counted else None, "loss": float(loss)}


def _compiled(model: nn.Module, device: torch.device, dtype: torch.dtype = torch.float32,
              **layer_settings: Any) -> nn.Module:
    """A copy of ``model`` in ``dtype`` compiled as uniform 4-bit r8 on ``device``, adapters trainable (fp32);
    ``layer_settings`` (``fast_path``, ``kernel_cache``) are set on every compiled layer."""
    work = copy.deepcopy(model).to(device, dtype)
    autoqra.compile(work, "16bits", bits=(4,), ranks=(8,), cache_dir=None, progress=False)
    for module in work.modules():
        if isinstance(module, QuantLoRALinear):
            for key, value in layer_settings.items():
                setattr(module, key, value)
    for name, p in work.named_parameters():
        p.requires_grad_(name.endswith(("lora_A", "lora_B")))
    return work


#: (row, builder key, loss): ``full`` fp32 logits, ``chunked`` (``autoqra.finetune``'s default) or ``chunked+ckpt``
#: (and activation checkpointing); the bf16-base LoRA row with the same loss is each row's reference
FINETUNE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("autoqra uniform 4-bit r8, fp32 model", "autoqra", "full"),
    ("autoqra uniform 4-bit r8, fp32 model, fast_path=False", "autoqra-slow", "full"),
    ("autoqra uniform 4-bit r8, bf16 model", "autoqra-bf16", "full"),
    ("peft LoRA r8, fp32 base", "peft-fp32", "full"),
    ("peft LoRA r8, bf16 base", "peft-bf16", "full"),
    ("QLoRA (peft r16 on bnb nf4)", "qlora", "full"),
    ("autoqra uniform 4-bit r8, bf16 model, chunked loss", "autoqra-bf16", "chunked"),
    ("peft LoRA r8, bf16 base, chunked loss", "peft-bf16", "chunked"),
    ("QLoRA (peft r16 on bnb nf4), chunked loss", "qlora", "chunked"),
    ("autoqra uniform 4-bit r8, bf16 model, chunked loss, checkpointing", "autoqra-bf16", "chunked+ckpt"),
    ("peft LoRA r8, bf16 base, chunked loss, checkpointing", "peft-bf16", "chunked+ckpt"),
    ("autoqra uniform 4-bit r8, bf16 model, torch.compile", "autoqra-bf16-compiled", "full"),
)


def row_key(key: str, loss: str) -> str:
    """A fine-tuning row's name for ``--finetune-rows``: the builder key, ``:chunked`` / ``:chunked+ckpt`` after it."""
    return key if loss == "full" else f"{key}:{loss}"


def finetune_memory(model: nn.Module, tokens: torch.Tensor, device: torch.device, steps: int,
                    seq_len: int, only: set[str] | None = None, quick: bool = False) -> list[dict[str, Any]]:
    """The `FINETUNE_ROWS` (``only``: those whose `row_key` is in it; each row's reference, the bf16-base LoRA
    with the same loss, should be among them, or its ratios are None). A ``torch.compile`` row (inductor's
    default mode; ``aot_eager`` when ``quick``) has no tensor peak: compiled code allocates outside the dispatcher
    that `StoragePeak` watches, so only ``max_memory_allocated`` (CUDA) and tokens/s count there."""
    train_options = {"backend": "aot_eager"} if quick else {}
    builders: dict[str, Callable[[], nn.Module]] = {
        "autoqra": lambda: _compiled(model, device),
        "autoqra-slow": lambda: _compiled(model, device, fast_path=False),
        "autoqra-bf16": lambda: _compiled(model, device, torch.bfloat16),
        "autoqra-bf16-compiled": lambda: torch.compile(_compiled(model, device, torch.bfloat16), **train_options),
        "peft-fp32": lambda: _peft(copy.deepcopy(model).to(device), 8),
        "peft-bf16": lambda: _peft(copy.deepcopy(model).to(device, torch.bfloat16), 8),
        "qlora": lambda: _qlora(copy.deepcopy(model), device),
    }
    rows = []
    for label, key, loss in FINETUNE_ROWS:
        if key == "qlora" and not HAS_BNB:
            continue
        if only is not None and row_key(key, loss) not in only:
            continue
        torch._dynamo.reset()
        work = builders[key]()
        compiled = key.endswith("-compiled")
        rows.append({"section": "finetune", "row": label, "loss_mode": loss,
                     **_train(work, tokens, device, steps, seq_len, loss != "full", loss == "chunked+ckpt",
                              track=not compiled)})
        del work
        if device.type == "cuda":
            torch.cuda.empty_cache()
    none = {"peak_bytes": None, "tensor_peak_bytes": None}
    for r in rows:  # against the bf16-base LoRA and QLoRA that compute their loss the same way
        for prefix, name in (("peft LoRA r8, bf16 base", "bf16 LoRA"), ("QLoRA", "QLoRA")):
            ref = next((x for x in rows if x["row"].startswith(prefix) and x["loss_mode"] == r["loss_mode"]), none)
            for key, label in (("peak_bytes", "peak"), ("tensor_peak_bytes", "tensor peak")):
                r[f"{label} vs {name}"] = None if r[key] is None or not ref[key] else r[key] / ref[key]
    return rows


# -- 4. decoding ----------------------------------------------------------------------------------
def _compile_options(device: torch.device, quick: bool) -> dict[str, Any]:
    """``torch.compile`` settings of the compiled decoding rows: CUDA graphs on a GPU (the batch-1 step is
    launch-bound), inductor's defaults on a CPU, and only the trace (``aot_eager``) in the quick smoke run."""
    if quick:
        return {"backend": "aot_eager"}
    return {"mode": "reduce-overhead"} if device.type == "cuda" else {}


def _generate(work: nn.Module, prompt: torch.Tensor, new: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds and tokens of greedy ``generate`` of exactly ``new`` tokens with a static KV cache (fixed
    shapes: what ``torch.compile`` and CUDA graphs need); transformers' own automatic compile is off, so an
    eager row stays eager."""
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = work.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                            cache_implementation="static", disable_compile=True)
    _sync(device)
    return time.perf_counter() - start, out


def decode_speed(model: nn.Module, calib: torch.Tensor, device: torch.device, tokens: int,
                 quick: bool = False) -> list[dict[str, Any]]:
    """Greedy decoding after a 64-token prompt with a static KV cache, seconds per token (the time of
    ``tokens + 1`` new tokens less the time of 1, so the prompt is not counted): the model as loaded (bf16 on
    a GPU, fp32 on a CPU, which lacks fast bf16 matmuls) against the uniform 4-bit r8 compile with the
    scale/offset pairs derived per call (default) and kept (``kernel_cache=True``), with packed codes
    (``fast_path=False``), and both the model and the 4-bit compile under ``torch.compile``
    (`_compile_options`; ``compile_s``: the first call, compilation included). ``same tokens`` compares a
    compiled row's tokens with its eager row's."""
    prompt = calib[:1, :64].to(device)
    dtype, dtype_label = (torch.bfloat16, "bf16") if device.type == "cuda" else (torch.float32, "fp32")
    options = _compile_options(device, quick)

    def torch_compiled(work: nn.Module) -> nn.Module:
        work.forward = torch.compile(work.forward, **options)
        return work

    builds: dict[str, tuple[Callable[[], nn.Module], bool]] = {
        f"{dtype_label} model": (lambda: copy.deepcopy(model).to(device, dtype), False),
        f"{dtype_label} model, torch.compile": (lambda: torch_compiled(copy.deepcopy(model).to(device, dtype)),
                                                      True),
        "autoqra uniform 4-bit r8": (lambda: _compiled(model, device), False),
        "autoqra uniform 4-bit r8, kernel_cache": (lambda: _compiled(model, device, kernel_cache=True), False),
        "autoqra uniform 4-bit r8, fast_path=False": (lambda: _compiled(model, device, fast_path=False), False),
        "autoqra uniform 4-bit r8, torch.compile": (lambda: torch_compiled(_compiled(model, device)), True),
    }
    rows: list[dict[str, Any]] = []
    eager_tokens: dict[str, torch.Tensor] = {}
    for label, (build, compiled) in builds.items():
        torch._dynamo.reset()
        work = build().eval()
        # warm-up (compilation for the compiled rows), the longest call first: transformers then keeps its cache
        # length for the later calls, so no shape changes and no recompilation
        compile_s, _ = _generate(work, prompt, tokens + 1, device)
        one, _ = _generate(work, prompt, 1, device)
        many, out = _generate(work, prompt, tokens + 1, device)
        row = {"section": "decode", "row": f"{label}, per token", "seconds": (many - one) / tokens}
        stem = label.removesuffix(", torch.compile")
        if compiled:
            row["compile_s"] = compile_s
            row["same tokens"] = torch.equal(out.cpu(), eager_tokens[stem])
        else:
            eager_tokens[stem] = out.cpu()
        rows.append(row)
        del work
    torch._dynamo.reset()
    base = rows[0]["seconds"]
    for r in rows:
        r["vs model"] = r["seconds"] / base
    return rows


# -- 5. DDP --------------------------------------------------------------------------------------
def ddp(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    script = str(ROOT / "scripts" / "finetune_ddp.py")
    extra = ["--tiny"] if quick else ["--steps", "10"]
    two = device.type == "cuda" and torch.cuda.device_count() >= 2
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script, *extra] if two
           else [sys.executable, script, *extra])
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode:
        logger.error("DDP run failed:\n%s", done.stderr[-3000:])
    return [{"section": "ddp", "row": ("2 processes, NCCL" if two else "1 process") + " scripts/finetune_ddp.py",
             "seconds": time.perf_counter() - start, "ok": done.returncode == 0}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run of every step)")
    parser.add_argument("--quick", action="store_true", help="a tiny Llama, small layers, 2 steps")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 50; quick 3)")
    parser.add_argument("--sections", default="layer,compile,finetune,decode,ddp", help="comma-separated subset")
    parser.add_argument("--synthetic", action="store_true",
                        help="SmolLM2-135M's architecture with random weights and tokens (no download)")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="smollm2-135m",
                        help="with --synthetic: the architecture built with random weights (default smollm2-135m)")
    parser.add_argument("--seq-len", type=int, default=None, help="fine-tuning window length (default 256; quick 32)")
    parser.add_argument("--finetune-rows", default=None,
                        help="comma-separated subset of the fine-tuning rows by builder key, ':chunked' / "
                             "':chunked+ckpt' after it for the chunked-loss (and checkpointing) rows, e.g. "
                             "autoqra-bf16,peft-bf16,autoqra-bf16:chunked,peft-bf16:chunked")
    parser.add_argument("--out", default=None,
                        help="results file name (default gpu_check, gpu_check_quick with --quick)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run on a GPU machine, or pass --device cpu for the smoke run")
    sections = set(args.sections.split(","))
    steps = args.steps or (3 if args.quick else 50)
    payload: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                               "torch": torch.__version__, "quick": args.quick, "steps": steps,
                               "model": f"{args.shape} shape, random weights" if args.synthetic else "default",
                               "rows": []}
    name = args.out or ("gpu_check_quick" if args.quick else "gpu_check")
    rows = payload["rows"]
    if "layer" in sections:
        rows += layer_speed(device, 256 if args.quick else 4096, 2 if args.quick else 20, args.quick)
        write_json(name, payload)
    if sections & {"compile", "finetune", "decode"}:
        model, calib, tokens = _model_and_tokens(args.quick, args.synthetic, args.shape)
        if "finetune" in sections:
            only = None if args.finetune_rows is None else set(args.finetune_rows.split(","))
            known = {row_key(key, loss) for _, key, loss in FINETUNE_ROWS}
            if only is not None and not only <= known:
                parser.error(f"--finetune-rows: unknown {sorted(only - known)}; known: {', '.join(sorted(known))}")
            rows += finetune_memory(model, tokens, device, steps, args.seq_len or (32 if args.quick else 256), only,
                                    args.quick)
            write_json(name, payload)
        if "decode" in sections:
            rows += decode_speed(model, calib, device, 4 if args.quick else 32, args.quick)
            write_json(name, payload)
        if "compile" in sections:
            rows += compile_time(model, calib, device, args.quick)
            write_json(name, payload)
    if "ddp" in sections:
        rows += ddp(device, args.quick or args.synthetic)
        write_json(name, payload)
    keys = ["seconds", "vs bf16", "vs model", "vs cpu", "compile_s", "same tokens", "peak_bytes", "peak vs bf16 LoRA", "peak vs QLoRA", "tensor_peak_bytes",
            "tensor peak vs bf16 LoRA", "tensor peak vs QLoRA", "tokens_per_s", "ok"]

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    print(table(["section", "row", *keys], [[r["section"], r["row"], *(cell(r.get(k)) for k in keys)] for r in rows]))
    print(f"wrote {RESULTS / (name + '.json')}")
    if not all(r.get("ok", True) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()

"""QLoRA two ways, one recipe: real peft + bitsandbytes against autoqra's ``bnb``-format QLoRA row.

The quality benchmark's ``qlora`` row runs the QLoRA recipe (NF4 block 64, LoRA r16 on every projection,
B = 0 init, alpha = 2r) on autoqra's ``bnb`` backend, which stores bitsandbytes' own NF4 codes with the
block absmax rounded to fp16. This script checks that stand-in against the real thing: the same SmolLM2
weights put into ``bitsandbytes.nn.Linear4bit`` (NF4, block 64, double-quantized absmax, fp32 compute)
and wrapped by ``peft.get_peft_model``; both models then train with one loop (same windows of the Lee
training split in the same seeded order, AdamW, constant lr, mean next-token loss) and are evaluated on
the Lee evaluation split at step 0 and after the last step. The adapters' random ``A`` draws differ
(each library draws its own), so equal means "within the spread of seeds", which ``--seeds`` measures.

    python benchmarks/qlora_parity.py                      # 10 steps, seed 0 (minutes on 2 cores)
    python benchmarks/qlora_parity.py --steps 10 --seeds 0,1
    python benchmarks/qlora_parity.py --quick              # a tiny Llama, random tokens (CI smoke)

Results: ``benchmarks/results/qlora_parity.json`` (per step losses and perplexities of both).
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import autoqra  # noqa: E402
from autoqra.evaluate import perplexity  # noqa: E402
from autoqra.loss import auto_chunk_tokens, causal_lm_loss  # noqa: E402
from autoqra.train import _window_batches  # noqa: E402
from benchmarks.common import write_json  # noqa: E402

#: the projections QLoRA adapts (every linear layer of a Llama block)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA, BLOCK = 16, 32.0, 64


def peft_bnb_qlora(model: nn.Module) -> nn.Module:
    """``model`` with every target ``nn.Linear`` replaced by a bitsandbytes NF4 ``Linear4bit`` (block 64,
    double-quantized absmax, fp32 compute) and wrapped by peft LoRA r16, alpha 32, B = 0."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in TARGETS:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
                layer.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                                 blocksize=BLOCK, compress_statistics=True)
                if child.bias is not None:
                    layer.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
                layer = layer.to("cpu")  # quantizes the weight
                if layer.weight.dtype != torch.uint8:
                    raise RuntimeError(f"bitsandbytes did not quantize {name}.{child_name} on CPU")
                setattr(module, child_name, layer)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS), bias="none",
                        init_lora_weights=True)
    return get_peft_model(model, config)


def autoqra_qlora(model: nn.Module) -> nn.Module:
    """The quality benchmark's ``qlora`` row: autoqra's ``bnb`` backend, r16, alpha 32, plain init (B = 0)."""
    autoqra.compile(model, "100GB", bits=(4,), ranks=(RANK,), backend="bnb", alpha=ALPHA, loftq_iters=0,
                    cache_dir=None, progress=False)
    return model


def train(model: nn.Module, windows: torch.Tensor, *, steps: int, lr: float, batch_size: int, seed: int,
          evals: torch.Tensor, ppl0: float) -> dict[str, Any]:
    """The one loop both models run: AdamW over what requires grad, constant lr, mean next-token loss.
    ``model`` must not have run a no-grad forward in eval mode (see `main`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("nothing to train: no parameter requires grad")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batches = _window_batches(windows, batch_size, seed)
    losses = []
    t = time.perf_counter()
    model.train()
    for _ in range(steps):
        mean, _count = causal_lm_loss(model, {"input_ids": next(batches)}, use_cache_flag=True,
                                      chunk_tokens=auto_chunk_tokens(model))
        optimizer.zero_grad(set_to_none=True)
        mean.backward()
        optimizer.step()
        losses.append(float(mean))
    seconds = time.perf_counter() - t
    model.eval()
    return {"losses": losses, "ppl": {"0": ppl0, str(steps): perplexity(model, evals, progress=False)},
            "trainable": sum(p.numel() for p in params), "train_seconds": seconds}


def _data(quick: bool, eval_windows: int, seq_len: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    if quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny_models import tiny_llama

        gen = torch.Generator().manual_seed(0)
        stream = torch.randint(3, 128, (37,), generator=gen).repeat(60)
        return tiny_llama(), stream[:1024].view(-1, 32), stream[1024:1024 + 4 * 32].view(4, 32)
    from autoqra.data import lee_corpus_text, split_tokens, window_bos_id, windows
    from autoqra.zoo import load_default_model

    model, tokenizer = load_default_model()
    splits = split_tokens(lee_corpus_text(), tokenizer)
    evals = windows(splits.evaluation, seq_len=512, max_windows=eval_windows, bos_token_id=window_bos_id(tokenizer))
    n = splits.calibration.numel() // seq_len
    return model, splits.calibration[: n * seq_len].view(n, seq_len), evals


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=16)
    args = parser.parse_args(argv)
    seq_len = 32 if args.quick else args.seq_len
    model, train_windows, evals = _data(args.quick, args.eval_windows, seq_len)
    payload: dict[str, Any] = {"quick": args.quick, "steps": args.steps, "recipe": {
        "lr": args.lr, "batch_size": args.batch_size, "seq_len": seq_len, "rank": RANK, "alpha": ALPHA,
        "block": BLOCK, "eval_windows": int(evals.shape[0])}, "rows": []}
    name = "qlora_parity_quick" if args.quick else "qlora_parity"
    for seed in [int(s) for s in args.seeds.split(",")]:
        for label, build in (("peft + bitsandbytes", peft_bnb_qlora), ("autoqra bnb format", autoqra_qlora)):
            torch.manual_seed(seed)  # the adapters' A draws
            record: dict[str, Any] = {"row": label, "seed": seed}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    # step 0 is measured on a second build: on CPU, bitsandbytes (0.50) converts a Linear4bit
                    # to its inference layout on the first no-grad forward in eval mode, after which the
                    # backward passes *no gradient* through it (silently: only the adapters above the last
                    # converted layer would learn). B = 0, so every build has the same step-0 logits.
                    probe = build(copy.deepcopy(model))
                    ppl0 = perplexity(probe, evals, progress=False)
                    probe = None
                    gc.collect()
                    torch.manual_seed(seed)
                    work = build(copy.deepcopy(model))
                    record.update(train(work, train_windows, steps=args.steps, lr=args.lr,
                                        batch_size=args.batch_size, seed=seed, evals=evals, ppl0=ppl0))
            except Exception as exc:  # noqa: BLE001 -- a row that cannot run here is recorded, not fatal
                record["error"] = f"{type(exc).__name__}: {exc}"
            payload["rows"].append(record)
            write_json(name, payload)
            print(record["row"], f"seed {seed}:", record.get("error") or
                  f"ppl {record['ppl']}, losses {[round(v, 4) for v in record['losses']]}, "
                  f"{record['train_seconds']:.1f} s", flush=True)
            work = None
            gc.collect()
    write_json(name, payload)
    return payload


if __name__ == "__main__":
    main()

"""Distributed LoRA fine-tuning of a compiled model with DDP: compile on every rank, wrap, train.

    torchrun --nproc_per_node 2 scripts/finetune_ddp.py --tiny           # CPU (gloo), seconds
    torchrun --nproc_per_node 2 scripts/finetune_ddp.py --steps 50       # SmolLM2-135M + Lee text
    accelerate launch --num_processes 2 scripts/finetune_ddp.py --tiny   # the same through accelerate
    python scripts/finetune_ddp.py --tiny                                # one process, no process group

The launcher sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; the script starts
the process group from them (NCCL when CUDA is available, one GPU per process, gloo on CPU).
Every rank compiles the same model with the same budget, calibration windows and seed, so every
rank holds the same plan (the sensitivity estimation is sharded by layer across the ranks and
gathered); `wrap_ddp` checks that and broadcasts rank 0's bases once. `batch_size` is the global
batch: each rank trains on batch_size / world_size windows of it, and DDP averages the adapter
gradients. Rank 0 prints the result and writes `--out` (`autoqra.save`) when given.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import autoqra  # noqa: E402
from autoqra.train import finetune, unwrap_model, wrap_ddp  # noqa: E402


def tiny_model_and_data(seed: int):
    """A 2-block Llama from a config (no download) and a learnable token stream."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    tokens = torch.randperm(125, generator=torch.Generator().manual_seed(seed))[:40].add(3).repeat(64)
    calib = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(seed + 1))
    return model, tokens, calib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama built in code instead of SmolLM2")
    parser.add_argument("--budget", default=None, help="compile budget (default 4bits; 8bits with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 20, 10 with --tiny)")
    parser.add_argument("--batch-size", type=int, default=4, help="global batch (windows); divisible by the world size")
    parser.add_argument("--seq-len", type=int, default=None, help="window length (default 256, 32 with --tiny)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default 5e-4, 1e-2 with --tiny)")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--calib-windows", type=int, default=8, help="calibration windows (SmolLM2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="rank 0 saves the fine-tuned model here (autoqra.save)")
    args = parser.parse_args()

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    try:
        if args.tiny:
            model, train, calib = tiny_model_and_data(args.seed)
            budget, steps, seq_len, lr = args.budget or "8bits", args.steps or 10, args.seq_len or 32, args.lr or 1e-2
            ranks = (4, 8)
        else:
            from autoqra.data import lee_windows
            from autoqra.zoo import load_default_model

            seq_len = args.seq_len or 256
            model, tokenizer = load_default_model()
            calib = lee_windows(tokenizer, split="calib", seq_len=seq_len, n=args.calib_windows)
            train = lee_windows(tokenizer, split="calib", seq_len=seq_len, n=None)
            budget, steps, lr = args.budget or "4bits", args.steps or 20, args.lr or 5e-4
            ranks = (0, 4, 8, 16, 32)
        result = autoqra.compile(model, budget, calib=calib, ranks=ranks, seed=args.seed, cache_dir=None,
                                 progress=rank == 0)
        model.to(device)
        if rank == 0:
            print(f"{world} process(es) on {device.type}; compiled to {result.plan.total_bytes / 2**20:.2f} MiB; "
                  f"global batch {args.batch_size} = {world} x {args.batch_size // world} windows of {seq_len}")
        trained = wrap_ddp(model) if distributed else model
        res = finetune(trained, train, steps=steps, lr=lr, batch_size=args.batch_size, seq_len=seq_len,
                       grad_accum=args.grad_accum, seed=args.seed, progress=rank == 0)
        if rank == 0:
            print(f"loss {res.losses[0]:.4f} (step 1) -> {res.losses[-1]:.4f} (step {res.steps}); "
                  f"{res.tokens_per_second:.0f} tokens/s over all ranks")
            if args.out:
                print(f"wrote {autoqra.save(unwrap_model(trained), args.out)}")
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How the peak RSS of a short fine-tune climbs step by step, with and without `finetune(trim_memory=...)`.

SmolLM2-135M compiled at uniform 3-bit r8 (8×512 Lee calibration windows), then the selection's short
fine-tune recipe (8 AdamW steps of 2×256 tokens of the 6 statistics windows) from the same initial adapters,
alternating ``trim_memory=False`` / ``True`` ``--repeats`` times (``--compare checkpointing``: with
``trim_memory=True``, ``gradient_checkpointing=False`` / ``True``). A thread samples ``VmRSS`` every 50 ms;
after each step the peak so far above the live memory before the fine-tune is recorded.

    python benchmarks/finetune_step_memory.py                     # ~4 min on 2 cores
    python benchmarks/finetune_step_memory.py --compare checkpointing --out finetune_step_memory_checkpointing
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import autoqra  # noqa: E402
from autoqra.data import lee_corpus_text, split_tokens, window_bos_id, windows  # noqa: E402
from autoqra.memory import jemalloc_loaded, trim_heap  # noqa: E402
from autoqra.train import StepInfo, adapter_state, finetune, load_adapter_state  # noqa: E402
from autoqra.zoo import load_default_model  # noqa: E402
from benchmarks.common import rss, write_json  # noqa: E402

MIB = 2**20


class Peak:
    """The highest ``VmRSS`` seen since the last `reset`, sampled in a background thread."""

    def __init__(self) -> None:
        self.value = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            self.value = max(self.value, rss())
            time.sleep(0.05)

    def reset(self) -> int:
        self.value = rss()
        return self.value

    def stop(self) -> None:
        self._stop = True
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="finetune_step_memory")
    parser.add_argument("--compare", choices=("trim", "checkpointing"), default="trim")
    args = parser.parse_args()
    peak = Peak()
    model, tokenizer = load_default_model()
    splits = split_tokens(lee_corpus_text(), tokenizer)
    calib = windows(splits.calibration, seq_len=512, max_windows=8, bos_token_id=window_bos_id(tokenizer))
    autoqra.compile(model, "4.24bits", calib=calib, bits=(3,), ranks=(8,), cache_dir=None, progress=False)
    tokens = torch.cat([b.reshape(-1) for b in calib[:6]])
    init = adapter_state(model)
    runs = []
    for _ in range(args.repeats):
        for flag in (False, True):
            trim, ckpt = (flag, False) if args.compare == "trim" else (True, flag)
            load_adapter_state(model, init)
            gc.collect()
            trim_heap()
            live = peak.reset()
            rises: list[int] = []

            def record(info: StepInfo, live: int = live, rises: list[int] = rises) -> None:
                rises.append(peak.value - live)

            start = time.perf_counter()
            result = finetune(model, tokens, steps=8, lr=5e-4, batch_size=2, seq_len=256, seed=0, progress=False,
                              trim_memory=trim, gradient_checkpointing=ckpt, callbacks=[record])
            runs.append({"trim_memory": trim, "gradient_checkpointing": ckpt, "seconds": time.perf_counter() - start,
                         "live": live, "rise_by_step": rises, "losses": list(result.losses)})
            print(f"trim_memory={trim!s:<5} checkpointing={ckpt!s:<5} {runs[-1]['seconds']:5.1f} s; live "
                  f"{live / MIB:.0f} MiB; peak rise by step (MiB): {' '.join(f'{r / MIB:.0f}' for r in rises)}; "
                  f"last loss {result.losses[-1]:.6f}", flush=True)
    peak.stop()
    write_json(args.out, {"allocator": "jemalloc" if jemalloc_loaded() else "default (glibc)", "runs": runs})


if __name__ == "__main__":
    main()

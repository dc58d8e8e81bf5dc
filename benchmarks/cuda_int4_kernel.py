"""The CUDA int4 layout on a GPU: its check against torch's kernel, round trips, and the timings that set
``CUDA_KERNEL_MAX_ROWS`` (raw tinygemm vs bf16 ``F.linear`` vs dequantizing, at 1-4096 rows; whole-layer
forward with the kernel forced on / off). Needs a CUDA GPU and triton (``triton.testing.do_bench``).

    python benchmarks/cuda_int4_kernel.py   # writes $OUT/probe.json, else benchmarks/results/cuda_int4_kernel.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import autoqra.modules.quant_lora_linear as qll  # noqa: E402
from autoqra.modules.quant_lora_linear import QuantLoRALinear  # noqa: E402
from autoqra.quant import int4_cuda  # noqa: E402
from autoqra.quant.base import dequantize_codes  # noqa: E402
from autoqra.quant.pack import pack, unpack  # noqa: E402


def bench(fn: Callable[[], Any]) -> float:
    """Milliseconds (triton's do_bench: CUDA events, L2 flushed between runs)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=40)


def checks(dev: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {f"check t={t}": int4_cuda._check(t, str(dev)) for t in (2, 4, 8)}
    for n, k in ((4096, 4096), (1536, 576), (576, 1536), (8, 32)):
        c = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=dev)
        lay = int4_cuda.encode(c)
        out[f"roundtrip {n}x{k}"] = [
            torch.equal(int4_cuda.decode(lay, k), c),
            torch.equal(int4_cuda.decode(lay, k, 8, 24), c[8:24]) if n >= 24 else None,
            torch.equal(int4_cuda.decode(lay.cpu(), k), c.cpu()),
            str(lay.dtype), list(lay.shape), lay.numel() * lay.element_size() == n * k // 2,
        ]
    torch.manual_seed(0)
    layer = QuantLoRALinear.from_linear(torch.nn.Linear(1024, 768, bias=False), 4, 0, fast_path=False)
    lay = int4_cuda.encode(layer._codes(0, 768).to(dev))
    x = torch.randn(7, 1024, device=dev, dtype=torch.bfloat16)
    y = int4_cuda.kernel_mm(x, lay, 64, layer._scale_offset().to(dev)).float()
    ref = x.float() @ layer.dequantized_weight().to(dev).T
    out["kernel rel err"] = float((y - ref).norm() / ref.norm())
    return out


def op_times(dev: torch.device, n: int, k: int) -> dict[str, Any]:
    torch.manual_seed(0)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    c = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=dev)
    g = k // 64
    scale = torch.rand(n, g, device=dev, dtype=torch.float16) * 0.01
    zero = torch.rand(n, g, device=dev, dtype=torch.float16) * 15
    lay = int4_cuda.encode(c)
    packed = pack(c, 4)
    so = torch.stack([scale.float().T, ((8 - zero.float()) * scale.float()).T], -1).to(torch.bfloat16).contiguous()

    def derive() -> torch.Tensor:
        s = scale.float()
        return torch.stack([s.T, ((8 - zero.float()) * s).T], -1).to(torch.bfloat16).contiguous()

    def deq_layout() -> torch.Tensor:
        return dequantize_codes(int4_cuda.decode(lay, k), scale, zero, (n, k), 64, None, torch.bfloat16)

    def deq_packed() -> torch.Tensor:
        return dequantize_codes(unpack(packed, 4, n * k).view(n, k), scale, zero, (n, k), 64, None, torch.bfloat16)

    row: dict[str, Any] = {"derive so": bench(derive), "decode+dequant (layout)": bench(deq_layout),
                           "unpack+dequant (packed)": bench(deq_packed)}
    compiled = torch.compile(deq_layout)
    start = time.time()
    compiled()
    row["compile s"] = time.time() - start
    row["compiled decode+dequant"] = bench(compiled)
    row["compiled equal"] = torch.equal(compiled(), deq_layout())
    wd = deq_layout()
    for m in (1, 8, 32, 128, 512, 2048, 4096):
        xm = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        gm = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
        row[f"M={m} bf16 linear"] = bench(lambda xm=xm: F.linear(xm, w))
        row[f"M={m} tinygemm"] = bench(lambda xm=xm: int4_cuda.kernel_mm(xm, lay, 64, so))
        row[f"M={m} grad@W (bf16)"] = bench(lambda gm=gm: gm @ wd)
    return row


def layer_times(dev: torch.device, n: int, k: int) -> dict[str, Any]:
    torch.manual_seed(0)
    layer = QuantLoRALinear.from_linear(torch.nn.Linear(k, n, bias=False), 4, 8, loftq_iters=0).to(dev)
    row: dict[str, Any] = {"layout": layer.layout}
    kept = qll.CUDA_KERNEL_MAX_ROWS
    try:
        for m in (1, 8, 16, 32, 64, 128, 256, 512):
            xm = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            for label, limit in (("kernel", 10**9), ("dequant", 0)):
                qll.CUDA_KERNEL_MAX_ROWS = limit
                with torch.no_grad():
                    row[f"M={m} {label}"] = bench(lambda xm=xm: layer(xm))
    finally:
        qll.CUDA_KERNEL_MAX_ROWS = kept
    return row


def main() -> None:
    dev = torch.device("cuda")
    out: dict[str, Any] = {"torch": torch.__version__, "device": torch.cuda.get_device_name(dev), **checks(dev)}
    times: dict[str, Any] = {}
    for n, k in ((4096, 4096), (11008, 4096), (1536, 576)):
        times[f"{n}x{k}"] = op_times(dev, n, k)
    for n, k in ((4096, 4096), (1536, 576)):
        times[f"layer {n}x{k}"] = layer_times(dev, n, k)
    out["times_ms"] = times
    target = (Path(os.environ["OUT"]) / "probe.json" if "OUT" in os.environ
              else Path(__file__).resolve().parent / "results" / "cuda_int4_kernel.json")
    target.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""The demo's last step: the fine-tuned default plan exported to ONNX and run in onnxruntime.

`export_onnx` writes the KV-cache graph (packed layers as ``MatMulNBits``, adapters beside them,
``genai_config.json`` and the tokenizer) and verifies it (logits against PyTorch, 16 greedy tokens,
and onnxruntime-genai's tokens when it is installed). Then, in one run on this machine: the file's
size against the plan's bytes plus the untouched parameters, the per-token decode latency of the file
against PyTorch eager (the fp32 model and the compiled one; ``fp32_onnx=True`` also exports the fp32
model and compares with that file, the ratio `benchmarks/onnx_export.py` measures), and a greedy
continuation of a sentence from the Lee evaluation split decoded by onnxruntime.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autoqra.errors import ExportVerificationError
from autoqra.export import export_onnx
from autoqra.export.background import BackgroundExport
from autoqra.export.decoder import decoder_shape, probe_cache
from autoqra.export.latency import onnx_latency, torch_latency
from autoqra.export.verify import greedy_onnx, session

__all__ = ["DemoExport", "export_demo"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoExport:
    """What the demo's export measured (milliseconds per decoded token; ``None``: not measured)."""

    directory: str
    file_bytes: int
    expected_bytes: int
    max_rel: float
    mean_rel: float
    tokens_checked: int
    tokens_matched: int
    genai_tokens_match: bool | None
    onnx_decode_ms: float
    torch_decode_ms: float
    fp32_torch_decode_ms: float
    fp32_onnx_decode_ms: float | None
    prompt: str
    continuation: str
    seconds: float
    #: the export's own seconds (trace, write, checks) and whether it ran in a background process
    export_seconds: float = 0.0
    background: bool = False

    def lines(self) -> list[str]:
        """The demo's printed summary of the export."""
        genai = {None: "", True: "; onnxruntime-genai decodes the same tokens",
                 False: "; onnxruntime-genai decodes OTHER tokens"}[self.genai_tokens_match]
        decode = (f"decode {self.onnx_decode_ms:.1f} ms/token in onnxruntime = "
                  f"{self.onnx_decode_ms / self.fp32_torch_decode_ms:.2f}× the fp32 model in PyTorch "
                  f"({self.fp32_torch_decode_ms:.1f} ms), {self.onnx_decode_ms / self.torch_decode_ms:.2f}× the "
                  f"compiled model in PyTorch ({self.torch_decode_ms:.1f} ms)")
        if self.fp32_onnx_decode_ms is not None:
            decode += (f", {self.onnx_decode_ms / self.fp32_onnx_decode_ms:.2f}× the fp32 ONNX export "
                       f"({self.fp32_onnx_decode_ms:.1f} ms)")
        return [
            f"ONNX export of the fine-tuned autoqra default: {self.directory} ({self._time()})",
            f"  size {self.file_bytes / 2**20:.2f} MiB = {self.file_bytes / self.expected_bytes:.3f}× the plan's "
            f"bytes + the untouched parameters ({self.expected_bytes / 2**20:.2f} MiB)",
            f"  parity with PyTorch: logits max rel {self.max_rel:.1e}, mean rel {self.mean_rel:.1e}; greedy tokens "
            f"{self.tokens_matched}/{self.tokens_checked} equal{genai}",
            f"  {decode} (one run on this machine)",
            f"  onnxruntime continues {self.prompt!r} → {self.continuation!r}",
        ]

    def _time(self) -> str:
        if not self.background:
            return f"{self.seconds:.0f} s"
        return (f"exported in {self.export_seconds:.0f} s by a background process while the demo went on; "
                f"{self.seconds:.0f} s here for the rest of the export and the measurements")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_demo(model: nn.Module, fp32_model: nn.Module, tokenizer: Any, prompt_ids: torch.Tensor,
                out_dir: Path, expected_bytes: int, *, fp32_onnx: bool = False, new_tokens: int = 24,
                prompt_len: int = 128, decode_steps: int = 16, repeats: int = 3,
                progress: bool | None = None, exported: BackgroundExport | None = None) -> DemoExport:
    """Export ``model`` (compiled, fine-tuned) to ``out_dir`` and measure it against ``fp32_model``;
    ``prompt_ids [1, n]`` start the continuation; ``expected_bytes``: the plan's bytes + untouched.
    ``exported``: the same export already started in the background (`export_in_background` of ``model``
    to ``out_dir``): waited for instead of exporting here; the timings run after it, on a quiet machine."""
    start = time.perf_counter()
    if exported is not None:
        result = exported.wait()  # verified in the child: raises its error if the file disagrees
    else:
        result = export_onnx(model, out_dir, tokenizer=tokenizer, progress=progress,  # verified: raises if it
                             overwrite=True)  # disagrees; the demo's own folder, replaced every run
    shape = probe_cache(model, decoder_shape(model))
    parity = result.parity
    if parity is None:  # verify_export=True always measures it
        raise ExportVerificationError("the demo's export was not verified")
    timing = {"prompt_len": prompt_len, "decode_steps": decode_steps, "repeats": repeats, "prompt": False}
    sess = session(result.model_file)  # one session for the timing and the continuation
    onnx_t = onnx_latency(sess, shape, **timing)
    torch_t = torch_latency(model, shape.vocab, **timing)
    fp32_t = torch_latency(fp32_model, shape.vocab, **timing)
    fp32_onnx_ms = None
    if fp32_onnx:
        fp32_dir = out_dir.parent / (out_dir.name + "_fp32")
        fp32 = export_onnx(fp32_model, fp32_dir, accuracy_level=0, verify_export=False, progress=progress,
                           overwrite=True)
        fp32_onnx_ms = onnx_latency(fp32.model_file, shape, **timing).decode_s * 1e3
        shutil.rmtree(fp32_dir, ignore_errors=True)  # 0.5 GB that only served the timing
    tokens = greedy_onnx(sess, prompt_ids, shape, new_tokens, np.dtype("float32"))
    return DemoExport(
        directory=str(result.directory), file_bytes=result.file_bytes, expected_bytes=expected_bytes,
        max_rel=parity.max_rel, mean_rel=parity.mean_rel, tokens_checked=parity.tokens_checked,
        tokens_matched=parity.tokens_matched, genai_tokens_match=parity.genai_tokens_match,
        onnx_decode_ms=onnx_t.decode_s * 1e3, torch_decode_ms=torch_t.decode_s * 1e3,
        fp32_torch_decode_ms=fp32_t.decode_s * 1e3, fp32_onnx_decode_ms=fp32_onnx_ms,
        prompt=tokenizer.decode(prompt_ids[0].tolist(), skip_special_tokens=True),
        continuation=tokenizer.decode(tokens, skip_special_tokens=True),
        seconds=time.perf_counter() - start, export_seconds=result.seconds, background=exported is not None,
    )

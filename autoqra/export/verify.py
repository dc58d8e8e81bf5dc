"""Checks that an exported ONNX file computes what the PyTorch model computes.

* **Logits**: onnxruntime and PyTorch on the same inputs; ``max_rel = max|o - r| / max|r|`` and
  ``mean_rel = mean|o - r| / mean|r|``. The PyTorch reference runs every packed layer on its exact
  float path (the int4 CPU kernel, which computes in bf16, is switched off for the reference).
* **Greedy decoding** through the KV-cache graph: the prompt, then one token a step, each step's
  ``present`` fed back as ``past``; the tokens must equal PyTorch's greedy tokens (what
  ``generate(do_sample=False)`` picks). Where they differ, the step is accepted only if PyTorch's
  top-2 logit margin there is within twice the measured logit error (a near-tie that the
  ``accuracy_level`` may legitimately flip; decoding after it diverges and is not compared);
  otherwise :class:`ExportVerificationError`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autoqra.errors import ExportVerificationError
from autoqra.export.decoder import PAST_KEY, PAST_VALUE, DecoderShape, _cache_argument
from autoqra.modules.quant_lora_linear import QuantLoRALinear

__all__ = ["Parity", "exact_reference", "greedy_onnx", "greedy_torch", "logits_parity", "session"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parity:
    """What verification measured (see the module docstring)."""

    max_rel: float
    mean_rel: float
    max_abs: float
    tolerance: float
    tokens_checked: int = 0
    tokens_matched: int = 0
    near_tie_at: int | None = None
    genai_tokens_match: bool | None = None

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@contextlib.contextmanager
def exact_reference(model: nn.Module) -> Iterator[None]:
    """Run every packed layer on its exact float path (int4 kernel off) inside the block."""
    layers = [m for m in model.modules() if isinstance(m, QuantLoRALinear)]
    before = [m.fast_path for m in layers]
    for m in layers:
        if m.fast_path:
            m.fast_path = False
    try:
        yield
    finally:
        for m, fast in zip(layers, before, strict=True):
            if m.fast_path != fast:
                m.fast_path = fast


def session(path: str | Path, threads: int | None = None):  # type: ignore[no-untyped-def]
    """An onnxruntime CPU session (``threads`` intra-op threads; default: onnxruntime's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(ids: torch.Tensor, shape: DecoderShape | None, dtype: np.dtype, past: list[np.ndarray] | None = None,
           offset: int = 0) -> dict[str, np.ndarray]:
    batch, seq = ids.shape
    feeds = {"input_ids": ids.numpy().astype(np.int64),
             "attention_mask": np.ones((batch, offset + seq), dtype=np.int64)}
    if shape is not None:
        feeds["position_ids"] = np.broadcast_to(np.arange(offset, offset + seq, dtype=np.int64), (batch, seq)).copy()
        if past is None:
            past = [np.zeros((batch, shape.kv_heads, 0, shape.head_dim), dtype=dtype)] * (2 * shape.layers)
        for i in range(shape.layers):
            feeds[PAST_KEY % i], feeds[PAST_VALUE % i] = past[2 * i], past[2 * i + 1]
    return feeds


def _run(sess, names: list[str], feeds: dict[str, np.ndarray], what: str) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    """``sess.run`` with onnxruntime's own failures (a shape the graph cannot take, a kernel error)
    raised as :class:`ExportVerificationError`: the written file does not run."""
    try:
        return sess.run(names, feeds)
    except Exception as exc:  # onnxruntime's pybind exceptions share no public base class
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ExportVerificationError(
            f"onnxruntime failed to run the exported graph ({what}): {type(exc).__name__}: {first}; the file "
            "does not run as written: export with with_past=False (no KV cache), or report this with the "
            "model's config"
        ) from exc


@torch.no_grad()
def logits_parity(sess, model: nn.Module, ids: torch.Tensor, shape: DecoderShape | None,  # type: ignore[no-untyped-def]
                  tolerance: float) -> Parity:
    """Logits of onnxruntime vs PyTorch on ``ids`` (``shape`` set: the KV-cache graph, past = 0)."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    got = _run(sess, ["logits"], _feeds(ids, shape, np.dtype(str(dtype).removeprefix("torch."))), "logits")[0]
    with exact_reference(model):
        ref = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float().numpy()
    diff = np.abs(got.astype(np.float32) - ref)
    parity = Parity(
        max_rel=float(diff.max() / max(np.abs(ref).max(), 1e-30)),
        mean_rel=float(diff.mean() / max(np.abs(ref).mean(), 1e-30)),
        max_abs=float(diff.max()),
        tolerance=tolerance,
    )
    logger.info("ONNX logits vs PyTorch: max rel %.2e, mean rel %.2e (tolerance %.0e)",
                parity.max_rel, parity.mean_rel, tolerance)
    if not parity.max_rel <= tolerance:
        raise ExportVerificationError(
            f"onnxruntime's logits differ from PyTorch's by {parity.max_rel:.2e} (max relative; mean "
            f"{parity.mean_rel:.2e}), above the tolerance {tolerance:.0e}; export with accuracy_level=0 for "
            "exact fp32 kernels, or pass a larger rtol if this accuracy level is intended",
            measured={"max_rel": parity.max_rel, "mean_rel": parity.mean_rel, "max_abs": parity.max_abs,
                      "tolerance": tolerance},
        )
    return parity


@torch.no_grad()
def greedy_torch(model: nn.Module, prompt: torch.Tensor, steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens after ``prompt [1, seq]`` (PyTorch, with the model's cache, exact reference
    path) and each step's top-2 logit margin."""
    cache_arg = _cache_argument(model)
    tokens: list[int] = []
    margins: list[float] = []
    with exact_reference(model):
        out = model(input_ids=prompt, use_cache=True)
        for _ in range(steps):
            logits = out.logits[0, -1].float()
            top = torch.topk(logits, 2).values
            token = int(logits.argmax())
            tokens.append(token)
            margins.append(float(top[0] - top[1]))
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            out = model(input_ids=torch.tensor([[token]]), use_cache=True, **{cache_arg: cache})
    return tokens, margins


def greedy_onnx(sess, prompt: torch.Tensor, shape: DecoderShape, steps: int,  # type: ignore[no-untyped-def]
                dtype: np.dtype) -> list[int]:
    """Greedy tokens through the exported KV-cache graph (prompt once, then one token a step)."""
    names = [o.name for o in sess.get_outputs()]
    outs = _run(sess, names, _feeds(prompt, shape, dtype), "the prompt through the KV-cache graph")
    tokens: list[int] = []
    offset = prompt.shape[1]
    for _ in range(steps):
        token = int(np.argmax(outs[0][0, -1]))
        tokens.append(token)
        past = list(outs[1:])
        outs = _run(sess, names, _feeds(torch.tensor([[token]]), shape, dtype, past=past, offset=offset),
                    f"decode step {len(tokens)} with the cache fed back")
        offset += 1
    return tokens


def compare_tokens(onnx_tokens: list[int], torch_tokens: list[int], margins: list[float],
                   max_abs: float) -> tuple[int, int | None]:
    """(tokens matched, step of an accepted near-tie or None); raises on a real divergence."""
    for step, (a, b) in enumerate(zip(onnx_tokens, torch_tokens, strict=True)):
        if a == b:
            continue
        if margins[step] <= 2 * max_abs:
            logger.info("greedy tokens diverge at step %d at a near-tie (margin %.2e <= 2 x logit error %.2e)",
                        step, margins[step], max_abs)
            return step, step
        raise ExportVerificationError(
            f"greedy decoding through the ONNX KV-cache graph picked token {a} at step {step} where PyTorch "
            f"picked {b} (PyTorch's top-2 margin {margins[step]:.3g} > 2 x the logit error {max_abs:.3g}): the "
            "cache inputs/outputs are wired wrongly; report this with the model's config"
        )
    return len(torch_tokens), None


def genai_tokens(directory: Path, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens from ``onnxruntime_genai.Model(directory)`` (stops early at end of sequence)."""
    import onnxruntime_genai as og

    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt):]

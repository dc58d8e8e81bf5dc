"""Prompt and per-token decode latency of an exported KV-cache graph (onnxruntime CPU) and of a
PyTorch model (eager, its own cache), measured the same way: a prompt of ``prompt_len`` random
tokens, then ``decode_steps`` greedy tokens one at a time; medians over ``repeats`` runs after a
warm-up. ``prompt=False`` skips timing the prompt on its own (``prompt_s`` is then None; the demo shows
decode only). Used by ``autoqra demo`` and ``benchmarks/onnx_export.py``. Absolute times depend on the
machine and its load: compare figures measured in one run.

:func:`genai_latency` measures the same two figures under onnxruntime-genai's own runtime (``og.Generator``,
greedy search), the runtime the exported folder targets: the prompt is the time of ``append_tokens``, the decode
the time per ``generate_next_token``.

:func:`paired_decode` times several exported files *in turns* (each round decodes every file once, the order
rotating), so that a slow spell of a shared machine falls on all of them: the ratio of two files' decode
latency is then read per round, and its median and range say how far one run can be trusted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autoqra.errors import ConfigError
from autoqra.export.decoder import DecoderShape, _cache_argument
from autoqra.export.verify import _feeds, session

__all__ = ["Latency", "PairedDecode", "genai_latency", "onnx_latency", "paired_decode", "torch_latency"]


@dataclass(frozen=True)
class Latency:
    """Seconds for the prompt's forward (None when not timed) and per decoded token (medians)."""

    prompt_s: float | None
    decode_s: float


def _check(**counts: int) -> None:
    """Each of ``counts`` (prompt_len, decode_steps, repeats, rounds) must be an int >= 1."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"latency: {name} must be an int >= 1, got {value!r}")


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _median_of(fn: Callable[[], float], repeats: int) -> float:
    """Median of what ``fn`` returns (seconds it timed itself), after one warm-up call."""
    fn()
    return float(np.median([fn() for _ in range(repeats)]))


def _prompt(vocab: int, prompt_len: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))


def onnx_latency(path: str | Path | Any, shape: DecoderShape, *, prompt_len: int = 128, decode_steps: int = 32,
                 repeats: int = 5, threads: int | None = None, prompt: bool = True) -> Latency:
    """Latency of the KV-cache graph ``path`` (written by `export_onnx` with ``with_past=True``), or of an
    open onnxruntime session of it (``threads`` then ignored)."""
    _check(prompt_len=prompt_len, decode_steps=decode_steps, repeats=repeats)
    sess = session(path, threads) if isinstance(path, (str, Path)) else path
    names = [o.name for o in sess.get_outputs()]
    feeds = _feeds(_prompt(shape.vocab, prompt_len), shape, np.dtype("float32"))
    prompt_s = _median_seconds(lambda: sess.run(names, feeds), repeats) if prompt else None

    def decode() -> float:
        outs = sess.run(names, feeds)
        start = time.perf_counter()
        for step in range(decode_steps):
            token = torch.tensor([[int(np.argmax(outs[0][0, -1]))]])
            outs = sess.run(names, _feeds(token, shape, np.dtype("float32"), past=list(outs[1:]),
                                          offset=prompt_len + step))
        return (time.perf_counter() - start) / decode_steps

    return Latency(prompt_s, _median_of(decode, repeats))


@torch.no_grad()
def torch_latency(model: nn.Module, vocab: int, *, prompt_len: int = 128, decode_steps: int = 32,
                  repeats: int = 5, prompt: bool = True) -> Latency:
    """The same two figures for a Hugging Face causal LM in PyTorch eager (its cache, its fast CPU
    paths); the decode median is over ``max(1, repeats // 2)`` runs (eager decoding is slow)."""
    _check(prompt_len=prompt_len, decode_steps=decode_steps, repeats=repeats)
    ids = _prompt(vocab, prompt_len)
    prompt_s = _median_seconds(lambda: model(input_ids=ids, use_cache=True), repeats) if prompt else None
    cache_arg = _cache_argument(model)

    def decode() -> float:
        out = model(input_ids=ids, use_cache=True)
        start = time.perf_counter()
        for _ in range(decode_steps):
            token = out.logits[:, -1:].argmax(-1)
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            out = model(input_ids=token, use_cache=True, **{cache_arg: cache})
        return (time.perf_counter() - start) / decode_steps

    return Latency(prompt_s, _median_of(decode, max(1, repeats // 2)))


def genai_latency(directory: str | Path, *, prompt_len: int = 128, decode_steps: int = 32, repeats: int = 5,
                  threads: int | None = None, prompt: bool = True) -> Latency:
    """Latency of an exported folder (``genai_config.json`` + ``model.onnx``) under onnxruntime-genai:
    ``threads`` overrides the config's intra-op threads for this measurement only (None: the folder's
    setting, or onnxruntime's default). Tokens are drawn as in :func:`onnx_latency`; generation cannot stop
    early (``min_length`` = the whole length)."""
    _check(prompt_len=prompt_len, decode_steps=decode_steps, repeats=repeats)
    run = _genai_runner(directory, prompt_len, decode_steps, threads)
    run()  # warm-up
    timings = [run() for _ in range(repeats)]
    return Latency(float(np.median([t[0] for t in timings])) if prompt else None,
                   float(np.median([t[1] for t in timings])))


def _genai_runner(directory: str | Path, prompt_len: int, decode_steps: int,
                  threads: int | None) -> Callable[[], tuple[float, float]]:
    """The folder's model loaded once under onnxruntime-genai, and a function that generates once and returns
    (prompt seconds, seconds per decoded token)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"latency: threads must be None or an int >= 1, got {threads!r}")
    folder = Path(directory)
    if not (folder / "genai_config.json").is_file():
        raise ConfigError(f"latency: {folder} has no genai_config.json; give the folder export_onnx wrote with "
                          "with_past=True")
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise ConfigError("genai_latency needs onnxruntime-genai: pip install onnxruntime-genai") from exc
    vocab = int(json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"])
    config = og.Config(str(folder))
    if threads is not None:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    ids = _prompt(vocab, prompt_len)[0].numpy().astype(np.int32)
    length = prompt_len + decode_steps

    def run() -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(ids)
        appended = time.perf_counter()
        for _ in range(decode_steps):
            generator.generate_next_token()
        return appended - start, (time.perf_counter() - appended) / decode_steps

    return run


@dataclass(frozen=True)
class PairedDecode:
    """Per-token decode seconds of several files, one figure a round each (:func:`paired_decode`)."""

    seconds: dict[str, tuple[float, ...]]

    def ratio(self, name: str, reference: str) -> tuple[float, float, float]:
        """``name``'s decode time over ``reference``'s, round by round: (median, smallest, largest)."""
        ratios = np.array(self.seconds[name]) / np.array(self.seconds[reference])
        return float(np.median(ratios)), float(ratios.min()), float(ratios.max())


def paired_decode(paths: Mapping[str, str | Path], shape: DecoderShape, *, rounds: int = 9, prompt_len: int = 128,
                  decode_steps: int = 32, threads: int | None = None, runtime: str = "onnxruntime") -> PairedDecode:
    """Decode latency of the KV-cache graphs ``paths`` (``{name: model.onnx}``, each written by `export_onnx`
    with ``with_past=True`` for a model of ``shape``), timed in turns: ``rounds`` rounds, each timing every
    file once as :func:`onnx_latency` does (one warm-up decode, one timed), starting one file later each
    round. All sessions stay open for the whole measurement. ``runtime="genai"``: each file's folder under
    onnxruntime-genai instead, as :func:`genai_latency` times it (one model loaded per folder)."""
    if runtime not in ("onnxruntime", "genai"):
        raise ConfigError(f"paired_decode: runtime must be 'onnxruntime' or 'genai', got {runtime!r}")
    _check(prompt_len=prompt_len, decode_steps=decode_steps, rounds=rounds)
    if not paths:
        raise ConfigError("paired_decode: give at least one file")
    timers = {name: (_genai_timer(Path(path).parent, prompt_len, decode_steps, threads) if runtime == "genai"
                     else _onnx_timer(session(path, threads), shape, prompt_len, decode_steps))
              for name, path in paths.items()}
    names = list(timers)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            seconds[name].append(timers[name]())
    return PairedDecode({name: tuple(v) for name, v in seconds.items()})


def _genai_timer(folder: Path, prompt_len: int, decode_steps: int, threads: int | None) -> Callable[[], float]:
    """Seconds per decoded token of one generation under onnxruntime-genai, after one warm-up generation."""
    run = _genai_runner(folder, prompt_len, decode_steps, threads)

    def timed() -> float:
        run()
        return run()[1]

    return timed


def _onnx_timer(sess: Any, shape: DecoderShape, prompt_len: int, decode_steps: int) -> Callable[[], float]:
    """Seconds per decoded token of one decode in an open onnxruntime session, as :func:`onnx_latency` times it."""

    def timed() -> float:
        return onnx_latency(sess, shape, prompt_len=prompt_len, decode_steps=decode_steps, repeats=1,
                            prompt=False).decode_s

    return timed

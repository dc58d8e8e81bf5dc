"""``export_onnx``: a compiled model as an ONNX file that onnxruntime (and onnxruntime-genai) runs.

The graph is captured with torch's dynamo ONNX exporter (``torch.onnx.export(dynamo=True)``, which
uses ``torch.export`` and onnxscript); every packed layer is swapped for an
:class:`~autoqra.export.layers.OnnxQuantLinear` for the duration of the export (the model is
restored afterwards, also on failure), whose ``autoqra::quant_linear`` op the exporter translates
into one ``com.microsoft::MatMulNBits`` node holding the layer's own codes, scales and zero points,
plus the adapter / zero-fraction side path and the bias.
Then the written file is run in onnxruntime and compared with the PyTorch model
(:mod:`autoqra.export.verify`).

Output folder: ``model.onnx`` (+ ``model.onnx.data`` when the weights pass 2 GB: ONNX external
data), ``genai_config.json`` and the tokenizer files when ``with_past`` (for
``onnxruntime_genai.Model(DIR)``), and ``export_report.json`` (layers, bytes, parity).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from autoqra.errors import ConfigError, ExportError, MissingDependencyError, require_module
from autoqra.export import gqa, verify
from autoqra.export.attention import ATTENTION_MODES, switched_attention
from autoqra.export.decoder import DecoderLogits, DecoderShape, DecoderWithPast, decoder_shape, probe_cache
from autoqra.export.fuse import fuse_shared_inputs
from autoqra.export.genai import write_genai_config
from autoqra.export.layers import (
    ACCURACY_LEVELS,
    ADAPTER_MODES,
    OnnxQuantLinear,
    OnnxTiedEmbedding,
    container_bytes,
)
from autoqra.export.ops import onnx_translation_table
from autoqra.ir.cost import DENSE_BITS
from autoqra.modules.quant_lora_linear import QuantLoRALinear
from autoqra.modules.tied_embedding import TiedQuantEmbedding
from autoqra.passes.materialize import restore
from autoqra.progress import tqdm_disable

__all__ = ["DEFAULT_RTOL", "OnnxExportResult", "check_export_target", "export_onnx"]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
#: default logits tolerance (max relative error) per MatMulNBits accuracy level
#: (level 4 quantizes every layer's activations to int8: on SmolLM2 the logits moved 12% at most, 4% on
#: average — the usual cost of onnxruntime's fast CPU path, checked here against gross errors only)
DEFAULT_RTOL = {0: 1e-3, 1: 1e-3, 2: 5e-2, 3: 1e-1, 4: 2e-1}
_EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB: leave room for the graph
_SUPPORTED_DTYPES = (torch.float32, torch.float16)


@dataclass(frozen=True)
class OnnxExportResult:
    """Where the export went and what it measured."""

    directory: Path
    model_file: Path
    file_bytes: int
    layers: dict[str, int]
    container_extra_bytes: int
    parity: verify.Parity | None
    seconds: float
    files: tuple[str, ...] = field(default=())
    fused_groups: int = 0
    attention: str = "model"

    def as_dict(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "model_file": str(self.model_file),
            "file_bytes": self.file_bytes,
            "layers": self.layers,
            "container_extra_bytes": self.container_extra_bytes,
            "parity": None if self.parity is None else self.parity.as_dict(),
            "seconds": self.seconds,
            "files": list(self.files),
            "fused_groups": self.fused_groups,
            "attention": self.attention,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OnnxExportResult:
        """The inverse of :meth:`as_dict` (a background export's result comes back this way)."""
        parity = data.get("parity")
        return cls(
            directory=Path(data["directory"]), model_file=Path(data["model_file"]), file_bytes=int(data["file_bytes"]),
            layers={str(k): int(v) for k, v in data["layers"].items()},
            container_extra_bytes=int(data["container_extra_bytes"]),
            parity=None if parity is None else verify.Parity(**parity), seconds=float(data["seconds"]),
            files=tuple(data.get("files", ())), fused_groups=int(data.get("fused_groups", 0)),
            attention=str(data.get("attention", "model")),
        )


def _check_dependencies(with_genai: bool) -> None:
    for module in ("onnx", "onnxscript", "onnxruntime"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(
                f"ONNX export needs the package {module!r}: pip install 'autoqra[onnx]' "
                "(onnx, onnxscript, onnxruntime)"
            )
    if with_genai and importlib.util.find_spec("onnxruntime_genai") is None:
        raise MissingDependencyError(
            "verify_genai=True needs onnxruntime-genai: pip install onnxruntime-genai (or verify_genai=False)"
        )


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The model's float dtype; bfloat16 is exported as float32 (see :func:`_float32_copies`)."""
    dtypes = {p.dtype for n, p in model.named_parameters() if p.is_floating_point() and "lora_" not in n}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (*_SUPPORTED_DTYPES, torch.bfloat16):
        raise ExportError(
            f"ONNX export needs one float dtype for the model's parameters (float32, float16 or bfloat16), got "
            f"{sorted(map(str, dtypes))}; cast it first, e.g. model.float() (packed layers keep their format)"
        )
    return next(iter(dtypes))


@contextlib.contextmanager
def _float32_copies(model: nn.Module) -> Iterator[int]:
    """Every bfloat16 parameter and buffer as a float32 copy while the block runs, then the
    original tensors back (same objects, same bits): onnxruntime's CPU kernels have no bfloat16,
    and bfloat16 widens to float32 exactly, so the file computes the bf16 model's weights in
    float32. Yields the bytes the copies take."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    for tensor in (*model.parameters(), *model.buffers()):  # each tied tensor once
        if tensor.dtype == torch.bfloat16:
            saved.append((tensor, tensor.data))
            tensor.data = tensor.data.float()
    try:
        yield sum(t.numel() * 4 for t, _ in saved)
    finally:
        for tensor, data in saved:
            tensor.data = data


def _layer_kind(layer: QuantLoRALinear) -> str:
    if layer.bits == DENSE_BITS:
        return "16-bit (float MatMul)"
    if layer.bits == 3:
        return "3-bit (MatMulNBits 4-bit container)"
    return f"{layer.bits}-bit (MatMulNBits)"


def _swap_for_export(model: nn.Module, adapters: str, accuracy_level: int, dtype: torch.dtype,
                     swapped: list[tuple[str, nn.Module]]) -> dict[str, int]:
    """Build every export module first, then swap them in (aliases share one); returns layer counts."""
    built: dict[int, OnnxQuantLinear] = {}
    places: list[tuple[str, nn.Module]] = []
    counts: dict[str, int] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, QuantLoRALinear):
            if id(module) not in built:
                built[id(module)] = OnnxQuantLinear(module, name=name, adapters=adapters,
                                                    accuracy_level=accuracy_level, dtype=dtype)
                kind = _layer_kind(module)
                counts[kind] = counts.get(kind, 0) + 1
            places.append((name, module))
    tied = [(name, module) for name, module in model.named_modules(remove_duplicate=False)
            if isinstance(module, TiedQuantEmbedding)]
    embeddings: dict[str, OnnxTiedEmbedding] = {}
    for name, module in tied:
        if id(module.source) not in built:
            raise ExportError(f"{name!r} reads its rows from {module.source_name!r}, which is not in this model; "
                              "export the whole compiled model")
        embeddings[name] = OnnxTiedEmbedding(built[id(module.source)], module, name=name, dtype=dtype,
                                             merged_rank=bool(module.source.rank) and (adapters == "merged" or module.source.merged))
    for name, module in places + tied:
        swapped.append((name, module))
        model.set_submodule(name, embeddings[name] if name in embeddings else built[id(module)])
    return counts


def _trace_inputs(wrapper: nn.Module, shape: DecoderShape | None, vocab: int, dtype: torch.dtype
                  ) -> tuple[tuple[Any, ...], Any, list[str], list[str]]:
    from torch.export import Dim

    gen = torch.Generator().manual_seed(0)
    batch, seq, past = 2, 8, 3
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    b, s = Dim("batch"), Dim("sequence_length")
    if shape is None:
        mask = torch.ones(batch, seq, dtype=torch.int64)
        dynamic = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}}
        return (ids, mask), dynamic, ["input_ids", "attention_mask"], ["logits"]
    p, t = Dim("past_sequence_length"), Dim("total_sequence_length")
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    cache = wrapper.empty_past(batch, dtype, past)
    dynamic = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: t}, "position_ids": {0: b, 1: s},
               "past": [{0: b, 2: p} for _ in cache]}
    inputs, outputs = wrapper.names()
    return (ids, mask, positions, cache), dynamic, inputs, outputs


#: initializers the file keeps as they are: the fp16 scales / zero fractions (folding their casts would
#: double them) and the adapters (swappable by name, not folded into the side path's right factor);
#: onnxruntime folds these at load
_KEPT = (".scales", ".zero_fraction", ".lora_A_t", ".lora_B_t")


def _keep_format(node: Any) -> bool | None:
    """onnxscript's constant folder must not fold a node that reads one of :data:`_KEPT`."""
    if any(v is not None and (v.name or "").endswith(_KEPT) for v in node.inputs):
        return False
    return None


def _optimize(program: Any, fuse_layers: bool) -> int:
    """Constant folding (minus :func:`_keep_format`), dead code and initializer/common-subexpression
    clean-up, through onnxscript's and onnx_ir's public passes; then the per-node debugging metadata
    (source stack traces with local paths, FX node text) is dropped: it is most of a small model's graph
    bytes and does not belong in a shipped file.

    Not onnxscript's ``optimize_ir``: its pattern rewriter (the rest of what it runs) took 321 of the
    499 s of exporting SmolLM2 (a uniform 3/4-bit r8 plan) on a 2-core VM, where this export takes 179 s;
    it grows faster than the graph (10 s for 6 blocks). It removed 2.7% of the nodes (5,007 vs 5,142),
    left the file size unchanged (58 bytes) and did not change the decode latency in onnxruntime, whose
    own graph optimizer runs at load anyway (interleaved: 39.8 / 42.0 ms a token with it, 34.0 / 44.9
    without; the VM's noise).

    ``fuse_layers``: :func:`~autoqra.export.fuse.fuse_shared_inputs` (layers that read one input → one
    ``MatMulNBits``), between the folding and the clean-up. Returns the number of groups it fused."""
    import onnx_ir
    import onnx_ir.passes.common as common
    import onnxscript.optimizer

    model = program.model
    onnxscript.optimizer.inline(model)
    onnxscript.optimizer.fold_constants(model, should_fold=_keep_format)
    onnxscript.optimizer.remove_unused_nodes(model)
    fused = fuse_shared_inputs(model) if fuse_layers else 0
    onnx_ir.passes.Sequential(
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)
    for node in onnx_ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()
    return fused


def _attention_taken(switched: str, fused: int, layers: int) -> str:
    """What the trace ran: ``"onnxruntime"`` when any layer became a ``GroupQueryAttention`` node (the others,
    logged, took the grouped form), ``"grouped"`` when none did but the model switched, else ``"model"``."""
    if switched != "onnxruntime":
        return switched
    if fused == 0:
        logger.info("no attention layer took onnxruntime's GroupQueryAttention: the grouped form instead")
        return "grouped"
    if fused < layers:
        logger.info("%d of %d attention layers as GroupQueryAttention, the others in the grouped form", fused, layers)
    return "onnxruntime"


def _verification_ids(tokenizer: Any, vocab: int, seq: int) -> torch.Tensor:
    if tokenizer is not None:
        text = ("The quick brown fox jumps over the lazy dog. Edge runtimes read quantized weights "
                "straight from the file, so the model that was fine-tuned is the model that runs.")
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :seq]
        return torch.cat([ids, ids.flip(1)], dim=0)
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (2, seq), generator=gen)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's notices that say nothing about this model (torchvision's ops skipped when it is not
    installed; a pytree deprecation inside torch; shared dynamic axes named once) stay out of the user's output; its errors still raise."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            # dynamic axes that share one constraint (batch of input_ids and of the cache): named once
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used", category=UserWarning)
            yield
    finally:
        registration.setLevel(level)


class _Stages:
    """The export's progress bar: one step per stage, the current stage in its postfix."""

    def __init__(self, with_past: bool, verify_export: bool, decode_steps: int, verify_genai: bool,
                 progress: bool | None) -> None:
        total = 3 + (verify_export + (verify_export and with_past and decode_steps > 0) + verify_genai)
        self._bar = tqdm(total=total, desc="ONNX export", unit="stage", disable=tqdm_disable(progress))
        self._started = False

    def next(self, stage: str) -> None:
        if self._started:
            self._bar.update(1)
        self._started = True
        self._bar.set_postfix_str(stage)

    def finish(self) -> None:
        """The last stage is done (the bar is full)."""
        self._bar.update(self._bar.total - self._bar.n)

    def close(self) -> None:
        self._bar.close()


def _file_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.name.startswith(MODEL_FILE))


def check_export_target(path: str | Path, overwrite: bool) -> Path:
    """The export folder, checked before any work: not a file; empty or new unless ``overwrite``; in a place
    that can be written (its nearest existing parent is a writable folder). Raises :class:`ConfigError`
    naming the fix."""
    if not isinstance(overwrite, bool):
        raise ConfigError(f"overwrite must be True or False, got {overwrite!r}")
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"export path {directory} is a file; give a folder for the ONNX files")
    if directory.is_dir() and not overwrite and any(directory.iterdir()):
        raise ConfigError(f"export folder {directory} exists and is not empty; pass overwrite=True (CLI: --overwrite) "
                          "to replace its contents, or give a new folder")
    parent = directory.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"export folder {directory} cannot be written ({parent} is not a writable folder); give "
                          "a folder in a writable place")
    return directory


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    with_past: bool = True,
    adapters: str = "separate",
    opset: int | None = None,
    accuracy_level: int = 4,
    verify_export: bool = True,
    rtol: float | None = None,
    decode_steps: int = 16,
    tokenizer: Any = None,
    verify_genai: bool | None = None,
    progress: bool | None = None,
    fuse_layers: bool = True,
    attention: str = "grouped",
    genai_threads: int | None = None,
    overwrite: bool = False,
) -> OnnxExportResult:
    """Export ``model`` (a compiled Hugging Face causal LM, or a plain one) to the folder ``path``.

    ``with_past``: KV-cache inputs/outputs in onnxruntime-genai's layout + ``genai_config.json``
    (and the tokenizer files when ``tokenizer`` is given); else a plain logits model.
    ``adapters``: ``"separate"`` (each adapter its own ``MatMul`` pair) or ``"merged"`` (16-bit
    layers only). ``accuracy_level``: ``MatMulNBits``'s compute precision on CPU — 4 (int8
    activations, default: the fast kernels; without it 2/8-bit run ~40× slower) or 0 (exact fp32).
    A bfloat16 model is exported in float32 (onnxruntime's CPU kernels have no bfloat16; its weights
    widen exactly) and left as it was. ``verify_export``: run the file in onnxruntime and compare
    logits (tolerance ``rtol``, default :data:`DEFAULT_RTOL` for the level) and ``decode_steps`` greedy tokens with PyTorch;
    ``verify_genai`` (default: when onnxruntime-genai is installed and ``with_past``) also decodes
    with ``onnxruntime_genai``. ``progress``: a bar over the stages (trace, clean-up, write, checks;
    ``False`` hides it, ``None`` leaves it to tqdm: hidden when not a terminal or with ``TQDM_DISABLE``).
    ``fuse_layers`` (default True): the quantized layers that read one input (q/k/v, gate/up) run as one
    ``MatMulNBits`` with one side path (:mod:`autoqra.export.fuse`; the file keeps each layer's
    initializers under its name, so adapters stay swappable); False keeps one node per layer.
    ``attention``: ``"grouped"`` (default) traces grouped-query attention without repeating the KV
    cache (:mod:`autoqra.export.attention`; Hugging Face models on ``sdpa``/``eager``); ``"onnxruntime"``
    one ``com.microsoft::GroupQueryAttention`` node a layer (:mod:`autoqra.export.gqa`; with every layer
    covered, ``genai_config.json`` lets onnxruntime-genai share one past/present buffer: faster there, but
    slower at long contexts in plain onnxruntime, and a batch above 1 cannot add several tokens to a past);
    ``"model"`` the model's own attention implementation.
    ``genai_threads``: onnxruntime-genai's intra-op threads, written into ``genai_config.json``
    (``session_options.intra_op_num_threads``); default None leaves onnxruntime's own choice, half the
    hardware threads — set it to the deployment machine's cores for faster decoding and prompts.
    Raises :class:`~autoqra.errors.ExportError` (unsupported input) or
    :class:`~autoqra.errors.ExportVerificationError` (the file disagrees: ``path`` is not written, the files
    are kept for inspection in ``<path>.failed`` with ``EXPORT_FAILED.json``, the error's ``directory``;
    its ``measured`` holds the logit error); the model is unchanged.
    """
    require_module(model, "export_onnx", hint="pass the compiled model (CompileResult.model or autoqra.load's)")
    if adapters not in ADAPTER_MODES:
        raise ConfigError(f"adapters must be one of {ADAPTER_MODES}, got {adapters!r}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ConfigError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level!r}")
    if rtol is not None and not rtol > 0:
        raise ConfigError(f"rtol must be > 0, got {rtol!r}")
    if not isinstance(decode_steps, int) or decode_steps < 0:
        raise ConfigError(f"decode_steps must be an int >= 0, got {decode_steps!r}")
    if not isinstance(fuse_layers, bool):
        raise ConfigError(f"fuse_layers must be True or False, got {fuse_layers!r}")
    if attention not in ATTENTION_MODES:
        raise ConfigError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if genai_threads is not None and (isinstance(genai_threads, bool) or not isinstance(genai_threads, int)
                                      or genai_threads < 1):
        raise ConfigError(f"genai_threads must be None or an int >= 1 (the deployment machine's cores), "
                          f"got {genai_threads!r}")
    if genai_threads is not None and not with_past:
        raise ConfigError("genai_threads needs with_past=True (genai_config.json is written with the KV cache)")
    if verify_genai is None:
        verify_genai = verify_export and with_past and importlib.util.find_spec("onnxruntime_genai") is not None
    if verify_genai and not with_past:
        raise ConfigError("verify_genai=True needs with_past=True (onnxruntime-genai decodes with the KV cache)")
    directory = check_export_target(path, overwrite)
    _check_dependencies(verify_genai)
    dtype = _model_dtype(model)
    shape = decoder_shape(model)
    if with_past:
        shape = probe_cache(model, shape)  # the geometry the model produces, whatever its config says
    tolerance = rtol if rtol is not None else DEFAULT_RTOL[accuracy_level]
    stages = _Stages(with_past, verify_export, decode_steps, verify_genai, progress)
    args = (directory, with_past, adapters, opset, accuracy_level, verify_export, tolerance, decode_steps, tokenizer,
            verify_genai, shape, stages, fuse_layers, attention, genai_threads, overwrite)
    try:
        if dtype != torch.bfloat16:
            result = _write(model, dtype, *args)
        else:
            with _float32_copies(model) as extra:
                logger.info("bfloat16 model: exported with float32 activations and weights (bf16 widens exactly; "
                            "%.1f MiB of float32 copies held during the export)", extra / 2**20)
                result = _write(model, torch.float32, *args)
        stages.finish()
        return result
    finally:
        stages.close()


def _write(model: nn.Module, dtype: torch.dtype, directory: Path, with_past: bool, adapters: str, opset: int | None,
           accuracy_level: int, verify_export: bool, tolerance: float, decode_steps: int, tokenizer: Any,
           verify_genai: bool, shape: DecoderShape, stages: _Stages, fuse_layers: bool,
           attention: str, genai_threads: int | None, overwrite: bool) -> OnnxExportResult:
    """`export_onnx` after its checks: trace, write to a temporary folder, verify, move into place."""
    start = time.perf_counter()
    layers = [m for m in {id(m): m for m in model.modules() if isinstance(m, QuantLoRALinear)}.values()]
    extra = sum(container_bytes(m) for m in layers if m.bits != DENSE_BITS)
    weight_bytes = sum(t.numel() * t.element_size() for t in {
        t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}.values())
    was_training = model.training
    swapped: list[tuple[str, nn.Module]] = []
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    except OSError as exc:
        raise ConfigError(f"export folder {directory} cannot be written ({exc.strerror or exc}); give a folder in a "
                          "writable place") from exc
    try:
        counts = _swap_for_export(model, adapters, accuracy_level, dtype, swapped)
        model.eval()
        wrapper = (DecoderWithPast(model, shape, split_cache=attention == "onnxruntime") if with_past
                   else DecoderLogits(model)).eval()  # no training-mode warning
        args, dynamic, input_names, output_names = _trace_inputs(wrapper, shape if with_past else None,
                                                                 shape.vocab, dtype)
        logger.info("exporting to ONNX (%d packed layers: %s)", len(layers), counts)
        stages.next("trace + translate (torch.onnx)")
        try:
            with _quiet_exporter(), switched_attention(model, attention) as taken:
                program = torch.onnx.export(
                    wrapper, args, dynamo=True,
                    custom_translation_table={**onnx_translation_table(), **gqa.onnx_translation_table()},
                    input_names=input_names, output_names=output_names, dynamic_shapes=dynamic,
                    opset_version=opset, optimize=False, verbose=False,
                )
            stages.next("graph clean-up")
            fused = _optimize(program, fuse_layers)
            fused_attention = sum(n.op_type == "GroupQueryAttention" for n in program.model.graph)
            taken = _attention_taken(taken, fused_attention, shape.layers)
        except Exception as exc:  # the exporter's errors are long; keep the cause, name the fix
            raise ExportError(
                f"torch's ONNX exporter failed on {type(model).__name__} ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:300]}); try with_past=False, or report the model type"
            ) from exc
        stages.next("write")
        program.save(str(tmp / MODEL_FILE), external_data=weight_bytes > _EXTERNAL_DATA_BYTES)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        restore(model, swapped)
        model.train(was_training)

    try:
        if with_past:
            write_genai_config(tmp, model, shape, MODEL_FILE, threads=genai_threads,
                               share_buffer=taken == "onnxruntime" and fused_attention == shape.layers)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        parity = None
        if verify_export:
            try:
                parity = _verify(tmp, model, shape if with_past else None, tolerance, decode_steps, tokenizer,
                                 verify_genai, dtype, stages)
            except verify.ExportVerificationError as exc:
                kept = _keep_failed(tmp, directory, exc, {
                    "accuracy_level": accuracy_level, "attention": taken, "fused_groups": fused,
                    "layers": counts, "container_extra_bytes": extra})
                raise verify.ExportVerificationError(
                    f"{exc}. The files are kept for inspection in {kept} (EXPORT_FAILED.json says why); "
                    f"{directory} was not written", measured=exc.measured, directory=kept) from exc
        directory.mkdir(parents=True, exist_ok=True)
        for old in sorted(directory.iterdir()) if overwrite else ():  # verified: the old contents go (no stale data)
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
        for item in sorted(tmp.iterdir()):
            item.replace(directory / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = OnnxExportResult(
        directory=directory,
        model_file=directory / MODEL_FILE,
        file_bytes=_file_bytes(directory),
        layers=counts,
        container_extra_bytes=extra,
        parity=parity,
        seconds=time.perf_counter() - start,
        files=tuple(sorted(p.name for p in directory.iterdir())),
        fused_groups=fused,
        attention=taken,
    )
    (directory / "export_report.json").write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    logger.info("wrote %s (%.1f MB) in %.0f s", result.model_file, result.file_bytes / 1e6, result.seconds)
    return result


#: the marker a failed export's kept folder holds (what failed, the measured error)
FAILED_MARKER = "EXPORT_FAILED.json"


def _keep_failed(tmp: Path, directory: Path, exc: Exception, details: dict[str, Any]) -> Path:
    """Move a failed export's files from ``tmp`` to ``<directory>.failed`` (replacing an earlier failed
    export there, never a folder without the marker: then ``.failed-2``, …) with :data:`FAILED_MARKER`
    (the error, what it measured, ``details``: the export's settings and counts)."""
    for n in range(1, 100):
        kept = directory.with_name(directory.name + (".failed" if n == 1 else f".failed-{n}"))
        if not kept.exists():
            break
        if (kept / FAILED_MARKER).is_file():
            shutil.rmtree(kept)
            break
    else:
        raise ExportError(f"too many failed exports beside {directory}: remove the {directory.name}.failed* folders")
    tmp.replace(kept)
    marker = {"error": type(exc).__name__, "message": str(exc), "measured": getattr(exc, "measured", {}),
              "intended_directory": str(directory), "file_bytes": _file_bytes(kept), **details}
    (kept / FAILED_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    logger.warning("the export failed verification; its files are kept in %s", kept)
    return kept


def _verify(directory: Path, model: nn.Module, shape: DecoderShape | None, tolerance: float, steps: int,
            tokenizer: Any, with_genai: bool, dtype: torch.dtype, stages: _Stages) -> verify.Parity:
    # one switch to the exact float path for every PyTorch reference below (each switch re-lays out
    # every 4-bit layer's codes; the nested switches inside are then no-ops)
    with verify.exact_reference(model):
        return _verify_exact(directory, model, shape, tolerance, steps, tokenizer, with_genai, dtype, stages)


def _verify_exact(directory: Path, model: nn.Module, shape: DecoderShape | None, tolerance: float, steps: int,
                  tokenizer: Any, with_genai: bool, dtype: torch.dtype, stages: _Stages) -> verify.Parity:
    stages.next("onnxruntime vs PyTorch logits")
    sess = verify.session(directory / MODEL_FILE)
    ids = _verification_ids(tokenizer, shape.vocab if shape else model.config.vocab_size, 16)
    parity = verify.logits_parity(sess, model, ids, shape, tolerance)
    if shape is None or steps == 0:
        return parity
    np_dtype = np.dtype(str(dtype).removeprefix("torch."))
    prompt = ids[:1]
    stages.next(f"greedy decode {steps} tokens")
    torch_tokens, margins = verify.greedy_torch(model, prompt, steps)
    onnx_tokens = verify.greedy_onnx(sess, prompt, shape, steps, np_dtype)
    matched, tie = verify.compare_tokens(onnx_tokens, torch_tokens, margins, parity.max_abs)
    genai_match = None
    if with_genai:
        stages.next("onnxruntime-genai decode")
        genai = verify.genai_tokens(directory, prompt[0].tolist(), steps)
        # genai stops at the end-of-sequence token: compare what it produced
        genai_match = genai == onnx_tokens[: len(genai)] and len(genai) > 0
        if not genai_match:
            raise verify.ExportVerificationError(
                f"onnxruntime-genai decoded {genai} but the ONNX graph run step by step gives "
                f"{onnx_tokens[: len(genai)]}: genai_config.json does not describe the graph; report this"
            )
    return verify.Parity(parity.max_rel, parity.mean_rel, parity.max_abs, tolerance, len(torch_tokens), matched,
                         tie, genai_match)

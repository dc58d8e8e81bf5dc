"""Save / load a compiled model: safetensors + JSON only (never unpickled).

``save(model, dir)`` writes
* ``model.safetensors``: the whole state dict (packed codes, scales, zeros, adapters, and the
  untouched parameters), each shared tensor once;
* ``autoqra_plan.json``: format version, autoqra/torch versions, every ``QuantLoRALinear``'s
  constructor arguments, tied-parameter aliases, the embeddings that read a compiled layer's rows
  (``shared_embeddings``: `autoqra.modules.tied_embedding`), the `Plan` when the model carries one, and
  ``model_dtype``: the dtype of the untouched parameters (`saved_model_dtype`; load the base in it).

``load(dir, base)`` rebuilds the layers on ``base`` (an ``nn.Module`` of the same architecture,
or a transformers config to instantiate) and loads the tensors. Everything is read and checked
(format version, tensor file, every key and shape) before the first module is swapped: a missing
or corrupt file, or a newer format, raises `SaveFormatError` and leaves ``base`` untouched.

Adapters are stored in the dtype they are held in (float32 by default, the training dtype), so a
loaded model's logits equal the saved model's exactly, and the cost model counts them at that
size. 4-bit codes held in the int4 kernel layout are saved in the packed form.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoqra.data import sha256_file
from autoqra.errors import AutoQRAError, require_module
from autoqra.modules.quant_lora_linear import QuantLoRALinear
from autoqra.modules.tied_embedding import TiedQuantEmbedding
from autoqra.passes.materialize import INIT_ATTR, shared_embeddings

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: manifest.json with every file's size and sha256
TENSORS = "model.safetensors"
META = "autoqra_plan.json"
MANIFEST = "manifest.json"
#: key prefix of the adapters as initialized (kept for fp32-base peft export), beside the state dict
INIT_PREFIX = "__autoqra_init__."
PLAN_ATTR = "autoqra_plan"


class SaveFormatError(AutoQRAError):
    """A saved directory cannot be loaded; nothing was changed."""


def _layer_config(module: QuantLoRALinear) -> dict[str, Any]:
    return {
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bits": module.bits,
        "rank": module.rank,
        "alpha": module.alpha,
        "dropout": float(getattr(module.lora_dropout, "p", 0.0)),
        "group_size": module.group_size,
        "backend": module.backend_name,
        "bias": module.bias is not None,
        "adapter_dtype": str(module.lora_A.dtype).removeprefix("torch.") if module.rank else "float32",
        "merged": module.merged,
    }


def _model_dtype(model: nn.Module) -> str | None:
    """The dtype most of the model's untouched floating-point parameters are held in (adapters left out)."""
    sizes: dict[torch.dtype, int] = {}
    for name, p in model.named_parameters():
        if p.is_floating_point() and not name.endswith(("lora_A", "lora_B")):
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return str(max(sizes, key=lambda d: sizes[d])).removeprefix("torch.") if sizes else None


def saved_model_dtype(directory: str | Path) -> torch.dtype | None:
    """The dtype the saved model's untouched parameters were held in (``model_dtype`` of its
    ``autoqra_plan.json``), None for a folder saved before autoqra recorded it; load the base in it.

    Raises:
        SaveFormatError: ``directory`` holds no readable ``autoqra_plan.json``.
    """
    path = Path(directory) / META
    try:
        name = json.loads(path.read_text()).get("model_dtype")
    except (OSError, ValueError) as exc:
        raise SaveFormatError(f"{path} cannot be read ({exc}); is {directory} a directory written by autoqra.save?") \
            from exc
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def save(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` (compiled by `autoqra.compile`) to ``directory``; returns the directory."""
    from safetensors.torch import save_file

    import autoqra

    require_module(model, "save", hint="pass the compiled model returned in CompileResult.model")
    out = Path(directory)
    layers = {n: _layer_config(m) for n, m in model.named_modules() if isinstance(m, QuantLoRALinear)}
    if not layers:
        raise AutoQRAError("the model has no QuantLoRALinear layer: call autoqra.compile(model, budget) first")
    state = model.state_dict(keep_vars=False)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident in seen and tensor.numel() > 0:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = tensor.detach().contiguous().cpu()
    for name, (a0, b0) in sorted(getattr(model, INIT_ATTR, {}).items()):
        tensors[f"{INIT_PREFIX}{name}.lora_A"] = a0.detach().contiguous().cpu()
        tensors[f"{INIT_PREFIX}{name}.lora_B"] = b0.detach().contiguous().cpu()
    plan = getattr(model, PLAN_ATTR, None)
    meta = {
        "format_version": FORMAT_VERSION,
        "autoqra_version": autoqra.__version__,
        "torch_version": torch.__version__,
        "model_class": type(model).__name__,
        "layers": layers,
        "aliases": aliases,
        "shared_embeddings": shared_embeddings(model),
        "plan": None if plan is None else plan.to_dict(),
        "model_dtype": _model_dtype(model),
    }
    # written to a temporary sibling folder with a manifest (sizes + sha256), then moved in file by
    # file: the old manifest goes first and the new one comes last, and a format-2 plan needs its
    # manifest, so an interrupted save never leaves a folder that `load` accepts. Other files in
    # the folder are left alone.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": "autoqra", "format_version": str(FORMAT_VERSION)})
        (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                    for name in (TENSORS, META)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        out.mkdir(exist_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
        for name in (META, TENSORS, MANIFEST):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved %d quantized layers, %d tensors to %s", len(layers), len(tensors), out)
    return out


def _check_manifest(directory: Path, version: int) -> None:
    """Every file listed with its size and sha256 (folders saved before manifests existed load as is)."""
    path = directory / MANIFEST
    if not path.exists():
        if version >= 2:
            raise SaveFormatError(f"{path} is missing: the save was interrupted or the folder was edited; re-save it")
        logger.warning("%s has no %s (saved by autoqra format 1): file integrity not checked", directory, MANIFEST)
        return
    try:
        manifest = json.loads(path.read_text())
        entries = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in manifest.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SaveFormatError(f"{path} is not a valid manifest ({exc}); re-save the model") from exc
    for name, (size, digest) in sorted(entries.items()):
        file = directory / name
        if not file.exists():
            raise SaveFormatError(f"{file} is missing; is {directory} a complete autoqra.save folder? re-save it")
        if file.stat().st_size != size or sha256_file(file) != digest:
            raise SaveFormatError(f"{file} does not match its manifest (truncated or modified); re-save the model")


def _read(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    meta_path, tensor_path = directory / META, directory / TENSORS
    for path in (meta_path, tensor_path):
        if not path.exists():
            raise SaveFormatError(f"{path} is missing; is {directory} a directory written by autoqra.save?")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise SaveFormatError(f"{meta_path} is not valid JSON ({exc}); re-save the model") from exc
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SaveFormatError(
            f"{meta_path} has format version {version!r}; this autoqra reads up to {FORMAT_VERSION}: upgrade autoqra"
        )
    _check_manifest(directory, version)
    try:
        tensors = load_file(str(tensor_path))
    except Exception as exc:  # safetensors raises its own error types for truncated / corrupt files
        raise SaveFormatError(f"{tensor_path} cannot be read ({type(exc).__name__}: {exc}); re-save the model") from exc
    return meta, tensors


def load(directory: str | Path, base: nn.Module | Any) -> nn.Module:
    """Restore a model saved by `save` onto ``base`` (a module or a transformers config)."""
    directory = Path(directory)
    meta, tensors = _read(directory)
    init = {k[len(INIT_PREFIX):]: tensors.pop(k) for k in sorted(tensors) if k.startswith(INIT_PREFIX)}
    if not isinstance(base, nn.Module):
        from transformers import AutoModelForCausalLM, PretrainedConfig

        if not isinstance(base, PretrainedConfig):
            raise SaveFormatError(f"base must be an nn.Module or a transformers config, got {type(base).__name__}")
        base = AutoModelForCausalLM.from_config(base)
    modules = dict(base.named_modules(remove_duplicate=False))
    new_modules: dict[str, QuantLoRALinear] = {}
    for name, cfg in meta["layers"].items():
        if name not in modules:
            raise SaveFormatError(f"layer {name!r} of the saved model does not exist in {type(base).__name__}; "
                                  "load onto the same architecture it was saved from")
        replaced = modules[name]  # the new layer lives where the one it replaces does (a GPU base stays there)
        device = next((t.device for t in (*replaced.parameters(), *replaced.buffers())), None)
        layer = QuantLoRALinear(
            cfg["in_features"], cfg["out_features"], cfg["bits"], cfg["rank"], alpha=cfg["alpha"],
            dropout=cfg["dropout"], group_size=cfg["group_size"], backend=cfg["backend"], bias=cfg["bias"],
            adapter_dtype=getattr(torch, cfg["adapter_dtype"]), device=device,
        )
        layer.merged = bool(cfg.get("merged", False))
        new_modules[name] = layer
    shared = meta.get("shared_embeddings", {})  # embedding -> the compiled layer whose rows it reads
    for embedding, source in shared.items():
        if embedding not in modules or source not in new_modules:
            raise SaveFormatError(f"the saved embedding {embedding!r} reads {source!r}, which "
                                  f"{type(base).__name__} or the saved layers lack; load onto the same architecture")
    # expected state dict = base's, with the replaced layers' entries swapped for the new ones
    expected: dict[str, tuple[int, ...]] = {}
    formats: dict[str, torch.dtype] = {}  # the compiled layers' tensors must come back in their own dtype
    for key, tensor in base.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner not in new_modules and owner not in shared:
            expected[key] = tuple(tensor.shape)
    for name, layer in new_modules.items():
        for key, tensor in layer.state_dict().items():
            expected[f"{name}.{key}"] = tuple(tensor.shape)
            if key in ("qweight", "scale", "zero", "weight", "lora_A", "lora_B"):
                formats[f"{name}.{key}"] = tensor.dtype
    if any(t.device.type == "meta" for t in base.state_dict().values()):
        raise SaveFormatError("base has tensors on the meta device; load onto a model with real (CPU) tensors, "
                              "e.g. a transformers config or a model built outside torch.device('meta')")
    bad_dtype = sorted(k for k, dt in formats.items() if k in tensors and tensors[k].dtype != dt)
    not_finite = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad_dtype or not_finite:
        raise SaveFormatError(
            f"{directory / TENSORS} holds tensors of the wrong dtype {bad_dtype[:5]} or with NaN/Inf values "
            f"{not_finite[:5]}; the file was modified or corrupted: re-save the model"
        )
    present = set(tensors) | set(meta.get("aliases", {}))
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    wrong = sorted(k for k, t in tensors.items() if k in expected and tuple(t.shape) != expected[k])
    if missing or unexpected or wrong:
        raise SaveFormatError(
            f"{directory / TENSORS} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {wrong[:5]}; load onto the same architecture it was saved from"
        )
    state = dict(tensors)
    for alias, target in meta.get("aliases", {}).items():
        state[alias] = tensors[target]
    for name, layer in new_modules.items():
        saved_bias = state.get(f"{name}.bias")
        if layer.bias is not None and saved_bias is not None and saved_bias.dtype != layer.bias.dtype:
            layer.bias = nn.Parameter(torch.empty_like(saved_bias), requires_grad=False)  # the model's dtype
        base.set_submodule(name, layer)
    for embedding, source in shared.items():
        base.set_submodule(embedding, TiedQuantEmbedding(new_modules[source], modules[embedding], source_name=source))
    base.load_state_dict(state, strict=False, assign=False)
    for p in base.parameters():
        p.requires_grad_(False)
    for layer in new_modules.values():
        for p in layer.adapter_parameters():
            p.requires_grad_(True)
    if meta.get("plan") is not None:
        from autoqra.plan import Plan

        setattr(base, PLAN_ATTR, Plan.from_dict(meta["plan"]))
    pairs = {n.rsplit(".", 1)[0] for n in init}
    setattr(base, INIT_ATTR, {n: (init[f"{n}.lora_A"], init[f"{n}.lora_B"]) for n in sorted(pairs)
                              if f"{n}.lora_A" in init and f"{n}.lora_B" in init})
    return base

"""Find the quantizable weights of a model and decide which are selected.

Recognized: ``nn.Linear`` (and subclasses), Hugging Face ``Conv1D`` (GPT-2, weight ``[in, out]``),
``nn.Embedding``. Selected by default: every linear / Conv1D except the output embedding
(``lm_head``). Embeddings and ``lm_head`` can be included by pattern.

Pattern precedence (regexes matched with ``re.search`` against the module name):
``exclude`` beats ``include`` beats the default rule.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass

from torch import nn

from autoqra.errors import NoQuantizableLayersError
from autoqra.ir.layer import LayerKind, LayerNode

logger = logging.getLogger(__name__)


def _hf_conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers missing or moved: Conv1D is simply not recognized
        return None
    return Conv1D


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The `LayerKind` of a module, or None when autoqra does not quantize it."""
    conv1d = _hf_conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return LayerKind.HF_CONV1D
    if isinstance(module, nn.Linear):
        return LayerKind.LINEAR
    if isinstance(module, nn.Embedding):
        return LayerKind.EMBEDDING
    return None


def weight_shape(module: nn.Module, kind: LayerKind) -> tuple[int, int]:
    """(in_features, out_features) of the weight as a matrix y = x W^T."""
    weight = module.weight
    if kind is LayerKind.HF_CONV1D:
        return int(weight.shape[0]), int(weight.shape[1])
    if kind is LayerKind.EMBEDDING:
        return int(weight.shape[1]), int(weight.shape[0])
    return int(weight.shape[1]), int(weight.shape[0])


def _output_embedding_names(model: nn.Module) -> set[str]:
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_module = None
    if callable(get_out):
        try:
            out_module = get_out()
        except (NotImplementedError, AttributeError):  # declared but not implemented by some models
            out_module = None
    for name, module in model.named_modules(remove_duplicate=False):
        if module is out_module or name.split(".")[-1] == "lm_head":
            names.add(name)
    return names


@dataclass(frozen=True)
class Discovery:
    """Result of `discover_layers`: the selected layers (in forward-definition order)."""

    layers: tuple[LayerNode, ...]
    skipped: tuple[str, ...]  # recognized but not selected (embeddings, lm_head, excluded)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, name) for p in patterns)


def discover_layers(
    model: nn.Module, *, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
) -> Discovery:
    """List the quantizable weights of ``model`` that are selected for the search.

    Tied weights (one parameter used by several modules) become one `LayerNode` named after
    the first module, with the others in ``tied``. Raises `NoQuantizableLayersError` when none.
    """
    outputs = _output_embedding_names(model)
    recognized: list[tuple[str, nn.Module, LayerKind]] = []
    seen_modules: dict[int, str] = {}
    shared_modules: dict[str, int] = Counter()
    for name, module in model.named_modules(remove_duplicate=False):
        kind = layer_kind(module)
        if kind is None or not name:
            continue
        if id(module) in seen_modules:  # the same module object registered twice
            shared_modules[seen_modules[id(module)]] += 1
            continue
        seen_modules[id(module)] = name
        recognized.append((name, module, kind))

    selected: list[tuple[str, nn.Module, LayerKind]] = []
    skipped: list[str] = []
    for name, module, kind in recognized:
        default = kind is not LayerKind.EMBEDDING and name not in outputs
        chosen = (default or _matches(name, include)) and not _matches(name, exclude)
        if chosen:
            selected.append((name, module, kind))
        else:
            skipped.append(name)

    # group by weight tensor identity: tied weights are one layer
    by_weight: dict[int, list[str]] = {}
    for name, module, _ in recognized:
        by_weight.setdefault(id(module.weight), []).append(name)

    layers: list[LayerNode] = []
    taken: set[str] = set()
    for name, module, kind in selected:
        if name in taken:
            continue
        sharers = by_weight[id(module.weight)]
        tied = tuple(n for n in sharers if n != name)
        taken.update(sharers)
        unselected = [n for n in tied if n in skipped]
        if unselected:
            logger.info(
                "%s shares its weight with %s, which is not selected: with tied_embedding='share' (the default) "
                "it will read %s's compiled weight; with 'keep' it keeps a full-precision copy",
                name, unselected, name,
            )
        in_f, out_f = weight_shape(module, kind)
        layers.append(
            LayerNode(
                name=name,
                kind=kind,
                in_features=in_f,
                out_features=out_f,
                dtype=str(module.weight.dtype).removeprefix("torch."),
                tied=tied,
                has_bias=getattr(module, "bias", None) is not None,
                calls=1 + shared_modules.get(name, 0),
            )
        )
    if not layers:
        types = Counter(type(m).__name__ for _, m in model.named_modules() if not list(m.children()))
        found = ", ".join(f"{t}×{c}" for t, c in sorted(types.items())) or "no leaf modules"
        hint = (
            f" Recognized but not selected: {skipped}; select them with include=[...] patterns."
            if skipped
            else " autoqra quantizes nn.Linear, transformers Conv1D and (by pattern) nn.Embedding."
        )
        raise NoQuantizableLayersError(f"the model has no quantizable layer selected (leaf modules: {found}).{hint}")
    return Discovery(layers=tuple(layers), skipped=tuple(skipped))

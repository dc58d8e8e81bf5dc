"""A compiled model as a ``peft.PeftModel`` over autoqra's packed base (peft-native form, both ways).

autoqra's compiled layers (`QuantLoRALinear`) hold a packed base *and* their own LoRA adapter.
Here the adapter moves into peft: every layer with an adapter becomes a rank-0
`QuantLoRALinear` (the packed base alone, buffers shared, nothing copied) wrapped by
`PackedLoraLinear`, a peft LoRA layer registered for that base type through peft's custom
module mechanism (``LoraConfig._register_custom_module``, the way peft wraps bitsandbytes / HQQ /
torchao bases). Ranks and alphas are per layer (`autoqra.peft_interop.to_peft_config`'s exact
``rank_pattern`` / ``alpha_pattern``) and the trained (or LoftQ-initialized) ``lora_A`` /
``lora_B`` are copied into peft's, so the forward is the same computation as autoqra's (bit for
bit: same base path, including the int4 kernel, same adapter ops in the same order).

* `to_peft_model(compiled)`: the compiled model (changed in place) as a ``PeftModel``.
* `save_base(peft_model, dir)`: the packed base alone (`autoqra.save` format, rank-0 layers);
  ``peft_model.save_pretrained(dir2)`` writes the adapter in peft's ordinary format.
* `load_peft_model(autoqra.load(dir, base), dir2)`: back; `load_adapter` adds a second adapter.
* `to_autoqra(peft_model)`: the way back, one adapter into the `QuantLoRALinear` layers again
  (for autoqra's ONNX exporter, its `finetune` / DDP loop and `autoqra.save`, which read them).
  Both are needed because peft does not serialize the custom-module registration: a plain
  ``PeftModel.from_pretrained(base, dir2)`` finds no dispatcher for the packed layer and raises.
* Merging: ``merge_adapter`` / ``merge_and_unload`` turn the packed base into a dense fp32
  ``nn.Linear`` holding ``deq(Q) + Σ scaling·B·A`` (exact to float rounding; the packed base is
  kept aside, so ``unmerge_adapter`` restores it exactly). `merge_to_dense` also densifies the
  layers peft never wrapped (rank 0 in the plan), for a model with no autoqra module left.

Not supported: layers whose adapter was merged by autoqra (``QuantLoRALinear.merge``), a compiled
layer shared under two names (peft would give each name its own adapter), DoRA / ``lora_bias`` /
other LoRA variants on the packed base, and different dropouts across layers (peft has one
``lora_dropout``). While merged, a layer holds both the dense weight and (as the submodule
``_packed_base``, which moves with ``.to``) the packed base.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoqra.errors import (
    ConfigError,
    MissingDependencyError,
    NotCompiledError,
    PeftExportError,
    require_module,
)
from autoqra.modules.quant_lora_linear import QuantLoRALinear
from autoqra.modules.tied_embedding import TiedQuantEmbedding

__all__ = [
    "LayerAdapter",
    "PackedLoraLinear",
    "load_adapter",
    "load_peft_model",
    "merge_to_dense",
    "register_packed_layers",
    "save_base",
    "strip_adapters",
    "to_autoqra",
    "to_peft_model",
]

logger = logging.getLogger(__name__)

try:  # peft is a hard dependency of autoqra; the custom layer needs its LoraLayer API
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
except ImportError as exc:  # pragma: no cover - peft is in the install requirements
    raise MissingDependencyError(f"autoqra.peft_native needs peft ({exc}): pip install 'peft>=0.21'") from exc

#: peft >= 0.18 passes the whole config to ``update_layer`` (tested with 0.21.2)
_PEFT_API_OK = "config" in inspect.signature(LoraLayer.update_layer).parameters


def _check_peft() -> None:
    if not _PEFT_API_OK:
        import peft

        raise MissingDependencyError(
            f"autoqra.peft_native needs a peft whose LoraLayer.update_layer takes config= (tested with 0.21.2), "
            f"found peft {peft.__version__}: pip install -U 'peft>=0.21'"
        )


@dataclass(frozen=True)
class LayerAdapter:
    """One layer's adapter as `strip_adapters` took it off: ``A [r, in]``, ``B [out, r]``, scaling, dropout."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    dropout: float


class PackedLoraLinear(nn.Module, LoraLayer):
    """peft LoRA layer over a rank-0 `QuantLoRALinear` (the packed base alone).

    Forward: ``base(x) + Σ_active scaling·B(A(dropout(x)))``, with the bias added last, exactly as
    `QuantLoRALinear.forward` orders it. Merge: the base becomes a dense fp32 ``nn.Linear``
    (``deq(Q) + Σ scaling·B·A``); unmerge puts the packed base back (exact, no re-quantization).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: Any,
        r: int = 0,
        lora_alpha: float = 1,
        **kwargs: Any,
    ) -> None:
        if getattr(config, "lora_bias", False):
            raise ConfigError("PackedLoraLinear does not support lora_bias; set LoraConfig(lora_bias=False)")
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if not isinstance(base, QuantLoRALinear):
            raise ConfigError(f"PackedLoraLinear wraps a QuantLoRALinear, got {type(base).__name__}")
        if base.rank:
            raise ConfigError(
                f"the QuantLoRALinear to wrap still has its own rank-{base.rank} adapter; call "
                "autoqra.peft_native.strip_adapters(model) first (to_peft_model does)"
            )
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._packed_base: QuantLoRALinear | None = None  # the packed base while a dense merge replaces it
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    # -- peft hooks ------------------------------------------------------------------------------
    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device | None, None]:
        """Device of the base, and no dtype: peft would otherwise cast the adapters to the dtype of
        the base's ``weight`` (fp16 at 16 bits); autoqra holds them in their own dtype (fp32)."""
        for name in ("qweight", "weight"):
            t = getattr(base_layer, name, None)
            if isinstance(t, torch.Tensor):
                return t.device, None
        return None, None

    def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> None:
        if getattr(config, "use_dora", False) or getattr(config, "velora_config", None) is not None:
            raise ConfigError("PackedLoraLinear supports plain LoRA only (no DoRA / VeLoRA) on a packed base")
        return None

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling · B @ A``, float32 ``[out, in]``."""
        a = self.lora_A[adapter].weight.float()
        b = self.lora_B[adapter].weight.float()
        return (b @ a) * self.scaling[adapter]

    # -- merge -----------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the adapters into a dense fp32 ``nn.Linear`` base (``deq(Q) + Σ scaling·B·A``)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        names = [n for n in adapter_names if n in self.lora_A]
        if not names:
            return
        with torch.no_grad():
            base = self.get_base_layer()
            dense = _dense_of(base) if isinstance(base, QuantLoRALinear) else base
            weight = dense.weight.detach().clone()
            for name in names:
                weight += self.get_delta_weight(name).to(weight.device)
            if safe_merge and not torch.isfinite(weight).all():
                raise PeftExportError(f"non-finite merged weight: adapter(s) {names} are broken")
            dense.weight.copy_(weight)
            if isinstance(base, QuantLoRALinear):
                self._packed_base = base
                self.base_layer = dense
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Put the packed base back (exact: the dense copy is dropped)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        if self._packed_base is not None:
            self.base_layer = self._packed_base
            self._packed_base = None
        self.merged_adapters.clear()

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        y = base._base_forward(x)  # the packed product (int4 kernel / chunked dequant), no bias
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            xa = self.lora_dropout[name](x).to(lora_A.weight.dtype)
            y = y + (F.linear(F.linear(xa, lora_A.weight), lora_B.weight) * self.scaling[name]).to(y.dtype)
        if base.bias is not None:
            y = y + base.bias.to(y.dtype)
        return y

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register_packed_layers(config: Any) -> Any:
    """Register `PackedLoraLinear` for `QuantLoRALinear` bases on a ``LoraConfig`` (in place; returned)."""
    _check_peft()
    config._register_custom_module({QuantLoRALinear: PackedLoraLinear})
    return config


def _inner(model: nn.Module) -> nn.Module:
    from autoqra.train import unwrap_model

    return unwrap_model(model)


def strip_adapters(model: nn.Module) -> dict[str, LayerAdapter]:
    """Turn every `QuantLoRALinear` with an adapter into a rank-0 one (in place: the packed base is
    kept, the adapter removed) and return the adapters taken off, by layer name.

    Raises:
        NotCompiledError: no `QuantLoRALinear` in the model.
        PeftExportError: a layer's adapter was merged into its base, or a layer is shared under two names.
    """
    model = _inner(model)
    layers = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, QuantLoRALinear)]
    if not layers:
        raise NotCompiledError(f"{type(model).__name__} has no QuantLoRALinear layer: call autoqra.compile first")
    seen: dict[int, str] = {}
    for name, m in layers:
        if id(m) in seen and m.rank:
            raise PeftExportError(
                f"{seen[id(m)]!r} and {name!r} are one QuantLoRALinear with one adapter; peft would give each "
                "name its own adapter, so the model would not train the same: untie them first"
            )
        seen[id(m)] = name
        if m.merged:
            raise PeftExportError(
                f"layer {name!r}: its adapter was merged into the base (QuantLoRALinear.merge); "
                "convert the unmerged model (unmerge it, or reload the save made before merging)"
            )
    out: dict[str, LayerAdapter] = {}
    for name, m in layers:
        if not m.rank:
            continue
        out[name] = LayerAdapter(
            m.lora_A.detach(), m.lora_B.detach(), float(m.scaling), float(getattr(m.lora_dropout, "p", 0.0))
        )
        m.lora_A = None
        m.lora_B = None
        m.rank, m.alpha, m.scaling = 0, None, 1.0
        m.lora_dropout = nn.Identity()
    logger.info("stripped the adapters of %d layers (packed bases kept)", len(out))
    return out


def _packed_layers(peft_model: nn.Module) -> dict[str, PackedLoraLinear]:
    return {n: m for n, m in peft_model.named_modules() if isinstance(m, PackedLoraLinear)}


def to_peft_model(compiled_model: nn.Module, adapter_name: str = "default", *, is_trainable: bool = True) -> Any:
    """The compiled model as a ``peft.PeftModel`` (the model is changed in place: its layers'
    adapters move into peft's ``lora_A`` / ``lora_B``; the packed bases are shared, not copied).

    The config comes from `autoqra.peft_interop.to_peft_config` (per-layer ``rank_pattern`` /
    ``alpha_pattern``, ``alpha = scaling · rank``); rank-0 layers are not targeted and stay
    plain `QuantLoRALinear`. The forward equals the compiled model's bit for bit.

    Raises:
        PeftExportError: no layer has an adapter; adapters merged or shared (see `strip_adapters`);
            dropouts differ across layers; a copied adapter does not fit peft's layer.
        NotCompiledError: a model without `QuantLoRALinear` layers.
    """
    from peft import get_peft_model

    from autoqra.peft_interop import to_peft_config

    _check_peft()
    require_module(compiled_model, "to_peft_model", "compiled_model", "pass the compiled model (CompileResult.model)")
    model = _inner(compiled_model)
    dropouts = {float(getattr(m.lora_dropout, "p", 0.0)) for m in model.modules()
                if isinstance(m, QuantLoRALinear) and m.rank}
    if len(dropouts) > 1:
        raise PeftExportError(f"the layers use different LoRA dropouts {sorted(dropouts)}; peft has one lora_dropout")
    config = to_peft_config(model, dropout=dropouts.pop() if dropouts else 0.0)
    config.inference_mode = not is_trainable
    register_packed_layers(config)
    adapters = strip_adapters(model)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name, autocast_adapter_dtype=False)
    layers = _packed_layers(peft_model.base_model.model)
    if set(layers) != set(adapters):
        raise PeftExportError(
            f"peft wrapped {len(layers)} layers but {len(adapters)} have adapters; "
            f"differing: {sorted(set(layers) ^ set(adapters))[:5]}"
        )
    with torch.no_grad():
        for name, ad in adapters.items():
            layer = layers[name]
            if abs(layer.scaling[adapter_name] - ad.scaling) > 1e-9 * max(1.0, ad.scaling):
                raise PeftExportError(f"{name}: peft scaling {layer.scaling[adapter_name]} != autoqra's {ad.scaling}")
            for part, t in ((layer.lora_A[adapter_name], ad.lora_A), (layer.lora_B[adapter_name], ad.lora_B)):
                if part.weight.shape != t.shape:
                    raise PeftExportError(f"{name}: peft adapter {tuple(part.weight.shape)} vs autoqra {tuple(t.shape)}")
                part.to(t.dtype)
                part.weight.copy_(t)
    logger.info("to_peft_model: %d layers under peft adapter %r", len(adapters), adapter_name)
    return peft_model


def save_base(peft_model: nn.Module, directory: str | Path) -> Path:
    """`autoqra.save` the packed base of a `to_peft_model` model (rank-0 layers, no adapter);
    ``autoqra.load(directory, base)`` restores it for `load_peft_model`. Merged layers save
    their packed base (the dense merge is not saved)."""
    from autoqra.io import save

    require_module(peft_model, "save_base", "peft_model", "pass the PeftModel from to_peft_model")
    inner = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    swapped: list[tuple[str, nn.Module]] = []
    try:
        for name, layer in _packed_layers(inner).items():
            base = layer._packed_base if layer._packed_base is not None else layer.get_base_layer()
            swapped.append((name, layer))
            inner.set_submodule(name, base)
        return save(inner, directory)
    finally:
        for name, layer in reversed(swapped):
            inner.set_submodule(name, layer)


def _check_loaded(peft_model: Any, adapter_name: str, directory: Path) -> None:
    """Every targeted layer got its adapter from the file (peft only warns about missing keys)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    expected = set(get_peft_model_state_dict(peft_model, adapter_name=adapter_name))
    path = directory / "adapter_model.safetensors"
    found = set(load_file(str(path))) if path.exists() else expected
    missing = sorted(expected - found)
    if missing:
        raise PeftExportError(f"{directory}: the adapter file lacks {len(missing)} tensors, e.g. {missing[:3]}")


def _rank0_base(base: nn.Module) -> None:
    inner = _inner(base)
    if not any(isinstance(m, QuantLoRALinear) for m in inner.modules()):
        raise NotCompiledError("the base has no QuantLoRALinear layer: give autoqra.load(<save_base dir>, model)")
    with_adapter = [n for n, m in inner.named_modules() if isinstance(m, QuantLoRALinear) and m.rank]
    if with_adapter:
        raise ConfigError(
            f"the base's layers still have autoqra adapters (e.g. {with_adapter[0]!r}); load the save_base folder, "
            "or call strip_adapters(base) to drop them"
        )


def load_peft_model(base: nn.Module, adapter_dir: str | Path, adapter_name: str = "default", *,
                    is_trainable: bool = False) -> Any:
    """``PeftModel.from_pretrained`` over an autoqra-loaded packed base (rank-0 layers, e.g.
    ``autoqra.load(save_base_dir, model)``), with the packed-layer registration peft does not save."""
    from peft import LoraConfig, PeftModel

    _check_peft()
    require_module(base, "load_peft_model", "base",
                   "load it first: load_peft_model(autoqra.load(<save_base dir>, model), <adapter dir>)")
    _rank0_base(base)
    directory = Path(adapter_dir)
    config = register_packed_layers(LoraConfig.from_pretrained(str(directory)))
    peft_model = PeftModel.from_pretrained(base, str(directory), adapter_name=adapter_name,
                                           is_trainable=is_trainable, config=config, autocast_adapter_dtype=False)
    _check_loaded(peft_model, adapter_name, directory)
    return peft_model


def load_adapter(peft_model: Any, adapter_dir: str | Path, adapter_name: str, *, is_trainable: bool = False) -> Any:
    """Add a saved adapter to a packed-base ``PeftModel`` (``PeftModel.load_adapter`` would read
    the config without the registration and fail on a layer not wrapped yet); returns the model."""
    from peft import LoraConfig

    _check_peft()
    directory = Path(adapter_dir)
    if adapter_name in peft_model.peft_config:
        raise ConfigError(f"the model already has an adapter named {adapter_name!r}")
    config = register_packed_layers(LoraConfig.from_pretrained(str(directory)))
    config.inference_mode = not is_trainable
    peft_model.add_adapter(adapter_name, config, autocast_adapter_dtype=False)
    peft_model.load_adapter(str(directory), adapter_name=adapter_name, is_trainable=is_trainable,
                            autocast_adapter_dtype=False)
    _check_loaded(peft_model, adapter_name, directory)
    return peft_model


def _dense_of(layer: QuantLoRALinear) -> nn.Linear:
    """A frozen fp32 ``nn.Linear`` holding the layer's dequantized base (and bias)."""
    with torch.no_grad():
        weight = layer.dequantized_weight(torch.float32)
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device)
        dense.weight.copy_(weight)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias.float())
    return dense.requires_grad_(False)


def merge_to_dense(peft_model: Any, adapter_names: list[str] | None = None) -> nn.Module:
    """``merge_and_unload`` (the active adapters, or ``adapter_names``, folded into dense fp32
    ``nn.Linear`` layers), then every remaining `QuantLoRALinear` (rank 0, never wrapped) is
    dequantized to an ``nn.Linear`` too: a plain transformers model with no autoqra module."""
    require_module(peft_model, "merge_to_dense", "peft_model", "pass the PeftModel from to_peft_model or load_peft_model")
    model = peft_model.merge_and_unload(adapter_names=adapter_names)
    rest = [n for n, m in model.named_modules() if isinstance(m, QuantLoRALinear)]
    for name in rest:
        layer = model.get_submodule(name)
        if layer.rank:
            raise PeftExportError(f"layer {name!r} still has an autoqra adapter; convert with to_peft_model first")
        model.set_submodule(name, _dense_of(layer))
    shared = [n for n, m in model.named_modules() if isinstance(m, TiedQuantEmbedding)]
    for name in shared:  # an embedding that read a packed layer's rows gets its own (untied) float matrix
        model.set_submodule(name, model.get_submodule(name).to_embedding())
    logger.info("merge_to_dense: %d packed layers without adapter dequantized as well", len(rest))
    return model


def _attach(layer: QuantLoRALinear, adapter: LayerAdapter) -> None:
    """Give a rank-0 `QuantLoRALinear` an adapter again (the inverse of `strip_adapters`)."""
    rank = adapter.lora_A.shape[0]
    layer.lora_A = nn.Parameter(adapter.lora_A)
    layer.lora_B = nn.Parameter(adapter.lora_B)
    layer.rank, layer.scaling = rank, adapter.scaling
    layer.alpha = None if adapter.scaling == 1.0 else adapter.scaling * rank
    layer.lora_dropout = nn.Dropout(adapter.dropout) if adapter.dropout > 0 else nn.Identity()


def to_autoqra(peft_model: Any, adapter_name: str | None = None) -> nn.Module:
    """The way back: one adapter (default: the active one) of a packed-base ``PeftModel`` into the
    `QuantLoRALinear` layers again; returns the unwrapped model (peft's wrappers removed, other
    adapters dropped). Its forward equals the ``PeftModel``'s with that adapter active.

    Raises:
        PeftExportError: an adapter is merged (unmerge first), or no layer has ``adapter_name``.
    """
    require_module(peft_model, "to_autoqra", "peft_model", "pass the PeftModel from to_peft_model or load_peft_model")
    name = adapter_name if adapter_name is not None else peft_model.active_adapter
    layers = _packed_layers(peft_model.base_model.model)
    if any(layer.merged for layer in layers.values()):
        raise PeftExportError("the peft model has merged adapters: call unmerge_adapter() first")
    taken: dict[str, tuple[QuantLoRALinear, LayerAdapter]] = {}
    for layer_name, layer in layers.items():
        if name in layer.lora_A:
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            taken[layer_name] = (layer.get_base_layer(), LayerAdapter(
                a.detach().clone(), b.detach().clone(), float(layer.scaling[name]),
                float(getattr(layer.lora_dropout[name], "p", 0.0))))
    if not taken:
        raise PeftExportError(f"no layer has an adapter named {name!r} (adapters: {sorted(peft_model.peft_config)})")
    model = peft_model.unload()
    for base, adapter in taken.values():
        _attach(base, adapter)
    logger.info("to_autoqra: adapter %r back into %d QuantLoRALinear layers", name, len(taken))
    return model

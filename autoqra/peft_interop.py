"""peft interop: a ``peft.LoraConfig`` for a plan, and the trained adapters as a peft adapter.

* `to_peft_config(plan_or_model)`: ``target_modules`` = the full names of the layers with an
  adapter (rank 0 layers are left out), ``rank_pattern`` / ``alpha_pattern`` with one full-name
  key per layer. peft matches a pattern key ``k`` against a module name ``n`` with
  ``re.match(rf"(.*\\.)?({k})$", n)`` and silently falls back to ``r`` / ``lora_alpha`` for a
  module no key matches, so every key is checked (against the model when one is given): each
  layer must be matched by its own key only, and each key must match a module. A name that is a
  dot-suffix of another module's name (``fc`` and ``block.fc``) would match both; such a key is
  written anchored (``^fc``, escaped) and ``target_modules`` becomes an exact regex instead.
* **Scaling.** peft's scaling is ``lora_alpha / r``; a `QuantLoRALinear`'s is ``scaling``
  (1.0 by default, ``alpha / rank`` with an explicit alpha). ``alpha_pattern`` holds
  ``scaling * rank`` per layer, so ``B @ A * lora_alpha / r`` in peft equals our delta.
* `save_peft_adapter(model, dir)`: ``adapter_config.json`` + ``adapter_model.safetensors`` with
  peft's key names (``base_model.model.<layer>.lora_A.weight`` ``[r, in]``, ``...lora_B.weight``
  ``[out, r]``); ``peft.PeftModel.from_pretrained(unquantized_base, dir)`` loads it, so the
  adapters trained on the quantized base can be used on the full-precision model too (they were
  trained to compensate the quantization error of *this* base, so on the fp32 base they are an
  approximation of the same fine-tune, not an identical model).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoqra.errors import ConfigError, NotCompiledError, PeftExportError, require_module
from autoqra.modules.quant_lora_linear import QuantLoRALinear

__all__ = ["TARGETS", "peft_state_dict", "save_peft_adapter", "to_peft_config"]

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _pattern_key_of(keys: list[str], name: str) -> list[str]:
    """The pattern keys that peft's ``get_pattern_key`` regex would accept for module ``name``."""
    return [k for k in keys if re.match(rf"(.*\.)?({k})$", name)]


def _plain_key_ok(name: str, names: list[str]) -> bool:
    """The full name, used as a peft pattern key, matches its own module and no other."""
    try:
        re.compile(name)
    except re.error:
        return False
    return bool(_pattern_key_of([name], name)) and not any(_pattern_key_of([name], n) for n in names if n != name)


def _targets_of(target_modules: list[str] | str, name: str) -> bool:
    """peft's ``check_target_module_exists`` for a list or a regex string (no exclusions)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith("." + t) for t in target_modules)


def _unwrap(model: nn.Module) -> nn.Module:
    from autoqra.train import unwrap_model

    return unwrap_model(model)


def _layers_of(plan_or_model: Any, alpha: float | None) -> tuple[dict[str, tuple[int, float]], list[str], nn.Module | None]:
    """``({layer: (rank, peft alpha)}`` for rank > 0, all known module names, the model or None)."""
    from autoqra.plan import Plan

    if isinstance(plan_or_model, nn.Module):
        model = _unwrap(plan_or_model)
        names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
        layers = {
            n: (m.rank, m.scaling * m.rank)
            for n, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, QuantLoRALinear) and m.rank > 0
        }
        if not any(isinstance(m, QuantLoRALinear) for m in model.modules()):
            raise NotCompiledError(
                f"{type(model).__name__} has no QuantLoRALinear layer: call autoqra.compile(model, budget) first"
            )
        if alpha is not None:
            mismatch = sorted(n for n, (r, a) in layers.items() if abs(a - alpha) > 1e-9 * max(1.0, alpha))
            if mismatch:
                logger.warning(
                    "to_peft_config: alpha=%g differs from the compiled layers' scaling * rank (e.g. %s: %g); the "
                    "config's scaling will not equal the model's (save_peft_adapter always uses the model's)",
                    alpha, mismatch[0], layers[mismatch[0]][1],
                )
            layers = {n: (r, float(alpha)) for n, (r, _) in layers.items()}
        return layers, names, model
    if isinstance(plan_or_model, Plan):
        plan_alpha = alpha if alpha is not None else plan_or_model.settings.get("alpha")
        layers = {
            n: (r, float(plan_alpha) if plan_alpha is not None else float(r))
            for n, (_, r) in plan_or_model.layers.items()
            if r > 0
        }
        return layers, list(plan_or_model.layers), None
    raise ConfigError(
        f"to_peft_config needs an autoqra Plan or a compiled model, got {type(plan_or_model).__name__}"
    )


def to_peft_config(
    plan_or_model: Any,
    *,
    alpha: float | None = None,
    dropout: float = 0.0,
    task_type: str | None = "auto",
    base_model_name_or_path: str | None = None,
) -> Any:
    """A ``peft.LoraConfig`` that puts adapters of the planned ranks on the planned layers.

    Args:
        plan_or_model: a `Plan`, or a compiled model (its ``QuantLoRALinear`` layers, names and
            scalings; every key is then checked against its modules).
        alpha: LoRA alpha of every layer (peft scaling ``alpha / rank``); None: the compiled
            layers' own scaling (``scaling * rank``; from a plan: its ``alpha`` setting, else
            ``alpha = rank``, i.e. scaling 1, autoqra's default).
        dropout: ``lora_dropout``.
        task_type: ``"auto"`` gives ``"CAUSAL_LM"`` unless a model is given that cannot
            generate; or a peft task type, or None.

    Raises:
        PeftExportError: no layer has an adapter, or a key would not select exactly its layer.
        NotCompiledError: a model without ``QuantLoRALinear`` layers.
    """
    from peft import LoraConfig

    if alpha is not None and not alpha > 0:
        raise ConfigError(f"alpha must be > 0 or None, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must lie in [0, 1), got {dropout!r}")
    layers, names, model = _layers_of(plan_or_model, alpha)
    if not layers:
        raise PeftExportError(
            "no layer has an adapter (every rank is 0): there is nothing for peft to target; "
            "compile with ranks above 0 (e.g. ranks=(8, 16)) or a larger budget"
        )
    targets = sorted(layers)
    others = sorted(set(names) - set(targets))
    # a full name is a safe pattern key unless peft's regex also accepts it for another module
    keys = {t: t if _plain_key_ok(t, names) else "^" + re.escape(t) for t in targets}
    over = [n for n in others if _targets_of(targets, n)]
    target_modules: list[str] | str = (
        targets if not over else "(?:" + "|".join(re.escape(t) for t in targets) + ")"
    )
    if over:
        logger.info("to_peft_config: target names would also select %s; using an exact regex", over[:3])
    counts = Counter((r, a) for r, a in layers.values())
    (r0, a0), _ = counts.most_common(1)[0]
    if task_type == "auto":
        task_type = "CAUSAL_LM" if model is None or hasattr(model, "prepare_inputs_for_generation") else None
    config = LoraConfig(
        r=int(r0),
        lora_alpha=float(a0),
        lora_dropout=float(dropout),
        target_modules=target_modules,
        rank_pattern={keys[t]: int(layers[t][0]) for t in targets},
        alpha_pattern={keys[t]: float(layers[t][1]) for t in targets},
        bias="none",
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
    )
    _check_config(config, layers, keys, names if model is not None else targets + others)
    return config


def _check_config(config: Any, layers: dict[str, tuple[int, float]], keys: dict[str, str], names: list[str]) -> None:
    """Every layer is targeted and resolves to its own rank/alpha key only; every key matches a
    module; no other module is targeted (peft would silently use defaults / ignore keys)."""
    problems: list[str] = []
    targeted = {n for n in names if _targets_of(config.target_modules, n)}
    missing = sorted(set(layers) - set(names))
    if missing:
        problems.append(f"layers not in the model: {missing[:5]}")
    extra = sorted(targeted - set(layers))
    if extra:
        problems.append(f"modules targeted without an adapter: {extra[:5]}")
    for pattern, label in ((config.rank_pattern, "rank_pattern"), (config.alpha_pattern, "alpha_pattern")):
        pattern_keys = list(pattern)
        for name in sorted(layers):
            found = _pattern_key_of(pattern_keys, name)
            if found != [keys[name]]:
                problems.append(f"{label}: layer {name} is matched by keys {found[:3]}, expected only {keys[name]!r}")
        unmatched = [k for k in pattern_keys if not any(_pattern_key_of([k], n) for n in names)]
        if unmatched:
            problems.append(f"{label}: keys that match no module (peft ignores them): {unmatched[:5]}")
    if problems:
        raise PeftExportError(
            "the peft config would not reproduce the plan: " + "; ".join(problems)
            + "; give the compiled model of this architecture (or its plan) unchanged"
        )


TARGETS = ("quantized", "fp32")


def _learned_factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, rank-2r factors of what fine-tuning learned: ``[B, −B₀] · [A; A₀] = B A − B₀ A₀``."""
    from autoqra.passes.materialize import INIT_ATTR

    init = getattr(model, INIT_ATTR, None)
    if not init:
        raise PeftExportError(
            "target='fp32' needs the adapters as initialized, which this model does not carry (compiled with "
            "keep_init_adapters=False, or loaded from an older save); export with target='quantized' or recompile"
        )
    out = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, QuantLoRALinear) and module.rank > 0:
            if name not in init:
                raise PeftExportError(f"no initial adapter recorded for {name!r}; export with target='quantized'")
            a0, b0 = init[name]
            a = torch.cat([module.lora_A.detach(), a0.to(module.lora_A.dtype)], dim=0)
            b = torch.cat([module.lora_B.detach(), -b0.to(module.lora_B.dtype)], dim=1)
            out[name] = (a, b)
    return out


def peft_state_dict(model: nn.Module, dtype: torch.dtype | None = None, *, target: str = "quantized",
                    ) -> dict[str, torch.Tensor]:
    """The adapters under peft's saved key names: ``base_model.model.<layer>.lora_A.weight`` etc.
    ``target="quantized"``: the trained factors; ``"fp32"``: the learned change only (rank 2r)."""
    if target not in TARGETS:
        raise ConfigError(f"target must be one of {TARGETS}, got {target!r}")
    model = _unwrap(model)
    out: dict[str, torch.Tensor] = {}
    if target == "fp32":
        factors = _learned_factors(model)
    else:
        factors = {name: (m.lora_A.detach(), m.lora_B.detach()) for name, m in model.named_modules(remove_duplicate=False)
                   if isinstance(m, QuantLoRALinear) and m.rank > 0}
    for name, (a, b) in factors.items():
        for part, t in (("lora_A", a), ("lora_B", b)):
            out[f"{PEFT_PREFIX}{name}.{part}.weight"] = (t if dtype is None else t.to(dtype)).contiguous().cpu()
    return out


def save_peft_adapter(
    model: nn.Module,
    directory: str | Path,
    base_model_name_or_path: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    target: str = "quantized",
) -> Path:
    """Write the adapters of a compiled model as a peft LoRA adapter (``adapter_config.json`` +
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base, directory)`` loads;
    returns the directory.

    ``target="quantized"`` (default): the trained factors ``B A``, exact on top of autoqra's own
    quantized base (the compiled model). ``target="fp32"``: for the *unquantized* base — the
    adapters were initialized to absorb the quantization error (``B₀ A₀ ≈ W − deq(Q)``), which the
    fp32 base does not have, so only what fine-tuning learned is exported, ``B A − B₀ A₀`` as
    rank-2r factors ``[B, −B₀]·[A; A₀]`` (an untrained model exports a zero change).

    ``base_model_name_or_path``: recorded in the config (default: the model config's
    ``_name_or_path`` when set). ``dtype``: of the saved tensors (default: as trained, float32).
    A layer whose adapter was merged into its base is exported all the same (its ``B A`` is the
    change relative to the original weight).
    """
    from safetensors.torch import save_file

    require_module(model, "save_peft_adapter", hint="pass the compiled model (CompileResult.model)")
    inner = _unwrap(model)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(inner, "config", None), "_name_or_path", None) or None
    dropouts = {float(getattr(m.lora_dropout, "p", 0.0)) for m in inner.modules() if isinstance(m, QuantLoRALinear)}
    config = to_peft_config(inner, dropout=max(dropouts, default=0.0), base_model_name_or_path=base_model_name_or_path)
    tensors = peft_state_dict(inner, dtype, target=target)
    if target == "fp32":  # rank 2r at the same scaling: peft's alpha / r = scaling
        config.r, config.lora_alpha = 2 * config.r, 2 * config.lora_alpha
        config.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
        config.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    config.inference_mode = True
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    config_path = out / ADAPTER_CONFIG  # peft writes target_modules from a set: sort it for stable bytes
    saved = json.loads(config_path.read_text())
    if isinstance(saved.get("target_modules"), list):
        saved["target_modules"] = sorted(saved["target_modules"])
        config_path.write_text(json.dumps(saved, indent=2, sort_keys=True))
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    logger.info("saved a peft adapter: %d layers, %d tensors to %s", len(tensors) // 2, len(tensors), out)
    return out

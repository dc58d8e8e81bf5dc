"""``autoqra.finetune``: a causal-LM training loop over the LoRA adapters of a compiled model.

Only ``lora_A`` / ``lora_B`` of every :class:`~autoqra.modules.quant_lora_linear.QuantLoRALinear`
train (AdamW); the packed bases never change. Choices made here:

* **Data.** A LongTensor of tokens (1-D: cut into ``seq_len`` windows; 2-D ``[n, L]``: each row
  cut into ``L // seq_len`` windows), ``(text, tokenizer)`` (tokenized, cut into windows that
  start with BOS when the tokenizer prepends one, as :mod:`autoqra.data` does), or a DataLoader
  / iterable yielding ``input_ids`` tensors or dicts (``input_ids``, optional ``attention_mask``
  and ``labels`` with -100 for ignored targets); a DataLoader is re-iterated when exhausted and
  keeps its own batch size, order and length.
* **Determinism.** Window batches are drawn from a ``torch.Generator`` seeded with ``seed``
  (a new permutation per pass over the windows); dropout runs under a forked global RNG seeded
  with ``seed``, so the caller's RNG state is untouched and two runs give the same adapters.
* **Loss.** Mean next-token cross-entropy in fp32 over the targets (position ``t`` predicts
  token ``t + 1``; padding and -100 labels ignored), averaged over ``grad_accum`` micro-batches.
* **Pause and resume.** ``pause_after=k`` stops after step ``k`` of ``steps`` and returns a
  `FinetuneCheckpoint` in ``FinetuneResult.checkpoint`` (adapters, AdamW and schedule state, the
  position in the window order, the RNG state); ``finetune(..., resume=checkpoint)`` with the same
  model, data and settings goes on from step ``k + 1`` exactly as if the run had not stopped (the same
  batches, learning rates, losses and adapters, bit for bit). The measured selection uses it to screen
  every candidate at a few steps and continue only the best (`autoqra.passes.select`). Token data only
  (not a DataLoader) and one process.
* **Failure.** A NaN/Inf loss or gradient stops training with `NonFiniteLossError` naming the
  step; the adapters are restored to the last values that gave a finite loss (a copy of the
  adapters, which are small, is kept before every step).
* **Distributed** (``torchrun`` / ``accelerate launch``, gloo or NCCL). ``batch_size`` is the
  *global* batch: every rank draws the same seeded batch of ``batch_size`` windows and trains on
  its slice of ``batch_size / world_size`` of them (`WorldSizeError` when the world size does not
  divide it), so N processes see exactly the windows one process would. Gradients are averaged
  over ranks, adapters only: a model wrapped by ``DistributedDataParallel`` (`wrap_ddp`) lets
  DDP do it (bucketed all-reduce overlapping the backward, ``no_sync`` on accumulation
  micro-steps); an unwrapped model in an initialized process group gets one explicit all-reduce
  of the adapter gradients per step. Either way only ``requires_grad`` parameters (the adapters)
  move; the packed bases are buffers and never travel during training. The step loss and token
  count are all-reduced, so ``losses`` / ``tokens`` (and the `StepInfo` callbacks get) are global
  and identical on every rank, and a NaN on one rank stops every rank at the same step. A DataLoader is used as given (give it a
  ``DistributedSampler``). Dropout runs under ``seed + rank``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from autoqra.distributed import check_collective
from autoqra.errors import (
    ConfigError,
    DataError,
    NonFiniteLossError,
    NotCompiledError,
    WorldSizeError,
    require_module,
)
from autoqra.loss import auto_chunk_tokens, causal_lm_loss
from autoqra.memory import trim_heap
from autoqra.modules.quant_lora_linear import QuantLoRALinear
from autoqra.progress import tqdm_disable

__all__ = ["FinetuneCheckpoint", "FinetuneResult", "StepInfo", "adapter_parameters", "adapter_state", "finetune", "load_adapter_state",
           "unwrap_model", "wrap_ddp"]

logger = logging.getLogger(__name__)

SCHEDULERS = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class StepInfo:
    """What a callback sees after each optimizer step (``eval_perplexity`` only on eval steps).
    A callback that returns ``True`` stops training after this step."""

    step: int
    loss: float
    lr: float
    tokens: int
    tokens_per_second: float
    eval_perplexity: float | None = None


@dataclass
class FinetuneResult:
    """``losses[i]``: mean loss of step ``i + 1``; ``eval_perplexities``: ``(step, ppl)`` pairs,
    step 0 being before training; ``tokens_per_second``: training tokens over training time
    (evaluation excluded)."""

    steps: int
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    eval_perplexities: list[tuple[int, float]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    stopped_early: bool = False
    #: where a run paused by ``pause_after`` stopped (pass it back as ``resume=``); None otherwise
    checkpoint: FinetuneCheckpoint | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(replace(self, checkpoint=None))
        del out["checkpoint"]
        out["eval_perplexities"] = [list(p) for p in self.eval_perplexities]
        out["paused"] = self.checkpoint is not None
        return out


@dataclass(frozen=True)
class FinetuneCheckpoint:
    """A `finetune` run paused after ``step`` (``pause_after``); ``finetune(..., resume=it)`` with the
    same model, data and settings continues it exactly. ``adapters``: `adapter_state` at the pause
    (loaded back into the model on resume, so the adapters may be used for something else between);
    ``drawn``: window batches drawn so far; ``rng``: the CPU RNG state (dropout)."""

    step: int
    steps: int
    adapters: dict[str, dict[str, torch.Tensor]]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    drawn: int
    rng: torch.Tensor
    result: FinetuneResult


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (``model`` otherwise)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters of every ``QuantLoRALinear`` in ``model`` (a wrapper is looked through).

    Raises:
        NotCompiledError: the model has no ``QuantLoRALinear`` (it was not compiled), or only
            rank-0 ones (nothing to train).
    """
    layers = [m for m in unwrap_model(model).modules() if isinstance(m, QuantLoRALinear)]
    if not layers:
        raise NotCompiledError(
            f"{type(unwrap_model(model)).__name__} has no QuantLoRALinear layer: call "
            "autoqra.compile(model, budget, calib=...) first (or autoqra.io.load a compiled model)"
        )
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for layer in layers:
        for p in layer.adapter_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not params:
        raise NotCompiledError(
            "every QuantLoRALinear of the model has rank 0: there is no adapter to fine-tune; "
            "compile with ranks above 0 (e.g. ranks=(8, 16)) or a larger budget"
        )
    return params


def adapter_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """A copy of every adapter: layer name → ``{"lora_A", "lora_B"}`` (rank-0 layers left out)."""
    inner = unwrap_model(model)
    return {name: {"lora_A": m.lora_A.detach().clone(), "lora_B": m.lora_B.detach().clone()}
            for name, m in inner.named_modules() if isinstance(m, QuantLoRALinear) and m.rank}


def load_adapter_state(model: nn.Module, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Copy ``state`` (from `adapter_state`, or ``CompileResult.scored_adapters[label]``) into ``model``'s
    adapters, in place. Every layer of the state must be a ``QuantLoRALinear`` of ``model`` with the same
    rank and shapes, and every adapter of ``model`` must be in the state (all checked before anything is
    copied).

    Raises:
        ConfigError: a layer is missing on either side, or a shape differs (e.g. the state is of another plan).
    """
    inner = unwrap_model(model)
    layers = {name: m for name, m in inner.named_modules() if isinstance(m, QuantLoRALinear) and m.rank}
    missing = sorted(set(layers) - set(state))
    extra = sorted(set(state) - set(layers))
    if missing or extra:
        raise ConfigError(
            f"the adapter state does not match the model's adapters (missing {missing[:3]}, unexpected {extra[:3]}; "
            f"{len(missing)} / {len(extra)} in all): load the state of the same plan (same layers and ranks)"
        )
    for name, m in layers.items():
        for key in ("lora_A", "lora_B"):
            value = state[name].get(key)
            target = getattr(m, key)
            if not isinstance(value, torch.Tensor) or value.shape != target.shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ConfigError(f"{name}.{key}: the state holds {got}, the model {tuple(target.shape)}; "
                                  "load the state of the same plan (same ranks)")
    with torch.no_grad():
        for name, m in layers.items():
            m.lora_A.copy_(state[name]["lora_A"])
            m.lora_B.copy_(state[name]["lora_B"])


# -- distributed ---------------------------------------------------------------------------------
def _model_signature(model: nn.Module) -> str:
    """Digest of every parameter's and buffer's name, shape and dtype (same plan <=> same digest)."""
    h = hashlib.sha256()
    for kind, items in (("p", model.named_parameters()), ("b", model.named_buffers())):
        for name, t in items:
            h.update(f"{kind}:{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()


def wrap_ddp(model: nn.Module, *, device_ids: list[int] | None = None, **ddp_kwargs: Any) -> nn.Module:
    """Wrap a compiled model in ``DistributedDataParallel`` for `finetune` under ``torchrun``.

    Call after ``torch.distributed.init_process_group`` and after moving the model to this rank's
    device. DDP registers only ``requires_grad`` parameters, i.e. the adapters, so its gradient
    all-reduce carries the adapters only. Buffers (the packed bases) are broadcast from rank 0
    once, at wrapping, and never again: ``forward_sync_buffers=False`` (torch >= 2.13) or
    ``broadcast_buffers=False`` plus one explicit broadcast (older torch); DDP's default would
    re-broadcast every base before every forward. ``ddp_kwargs`` go to DDP (they override these).

    Raises:
        ConfigError: no initialized process group, or the ranks hold different models (a
            different plan): compile with the same budget, calibration data and seed everywhere,
            or compile once, `autoqra.save`, and `autoqra.load` on every rank.
        NotCompiledError: the model was not compiled.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            "wrap_ddp needs an initialized process group: call torch.distributed.init_process_group"
            '("nccl" on GPUs, "gloo" on CPU) first, in a script launched by torchrun or accelerate launch'
        )
    inner = unwrap_model(model)
    adapter_parameters(inner)  # NotCompiledError before any collective
    group = ddp_kwargs.get("process_group")
    signatures: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(signatures, _model_signature(inner), group=group)
    differ = [r for r, sig in enumerate(signatures) if sig != signatures[0]]
    if differ:
        raise ConfigError(
            f"wrap_ddp: rank(s) {differ} hold a model with other parameter/buffer names or shapes than rank 0 "
            "(another plan): compile with the same budget, bits, ranks, calibration data and seed on every rank, "
            "or compile once, autoqra.save, and autoqra.load the folder on every rank"
        )
    device = _model_device(inner)
    if device_ids is None and device.type == "cuda":
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    ddp_cls = nn.parallel.DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(ddp_cls.__init__).parameters:
        if "broadcast_buffers" not in ddp_kwargs:
            ddp_kwargs.setdefault("forward_sync_buffers", False)
    elif ddp_kwargs.setdefault("broadcast_buffers", False) is False:
        src = 0 if group is None else dist.get_global_rank(group, 0)
        with torch.no_grad():
            for buffer in inner.buffers():
                dist.broadcast(check_collective(buffer, group), src=src, group=group)
    return ddp_cls(model, device_ids=device_ids, **ddp_kwargs)


def _distributed(model: nn.Module) -> tuple[str | None, Any, int, int]:
    """(mode, group, rank, world): mode ``"ddp"`` (the wrapper averages gradients),
    ``"all_reduce"`` (a plain model in a process group of more than one rank: `finetune` averages
    the adapter gradients itself) or None (one process)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        group = model.process_group
        world = dist.get_world_size(group)
        if world > 1:
            return "ddp", group, dist.get_rank(group), world
        return None, None, 0, 1
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return "all_reduce", None, dist.get_rank(), dist.get_world_size()
    return None, None, 0, 1


def _check_world(batch_size: int, world: int) -> None:
    if batch_size % world:
        lower = batch_size // world * world
        fix = f"batch_size={lower} or {lower + world}" if lower else f"batch_size={world}"
        divisors = [n for n in range(1, batch_size + 1) if batch_size % n == 0]
        raise WorldSizeError(
            f"finetune: batch_size={batch_size} is the global batch, split evenly over the {world} processes, "
            f"and {world} does not divide it: pass {fix} (a multiple of the world size), or launch a number of "
            f"processes that divides {batch_size} ({', '.join(map(str, divisors))})",
            batch_size=batch_size, world_size=world,
        )


@torch.no_grad()
def _all_reduce_mean_grads(params: list[nn.Parameter], group: Any, world: int) -> None:
    """Average the adapters' gradients over ranks: one all-reduce per dtype of a flat copy."""
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group_params in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group_params])
        dist.all_reduce(check_collective(flat, group), group=group)
        flat.div_(world)
        offset = 0
        for p in group_params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


# -- data ----------------------------------------------------------------------------------------
def _tokens_from_text(data: tuple[Any, Any]) -> tuple[torch.Tensor, int | None]:
    from autoqra.data import tokenize_text, window_bos_id

    text, tokenizer = data
    if isinstance(text, str):
        texts = [text]
    elif isinstance(text, Sequence) and all(isinstance(t, str) for t in text):
        texts = list(text)
    else:
        raise ConfigError(f"(text, tokenizer) data needs a str or a list of str, got {type(text).__name__}")
    eos = getattr(tokenizer, "eos_token_id", None)
    parts: list[torch.Tensor] = []
    for i, t in enumerate(texts):
        if i and eos is not None:
            parts.append(torch.tensor([int(eos)], dtype=torch.long))  # documents joined by EOS
        parts.append(tokenize_text(t, tokenizer))
    tokens = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return tokens, window_bos_id(tokenizer)


def token_windows(data: Any, seq_len: int, *, label: str = "data") -> torch.Tensor:
    """Windows ``[n, seq_len]`` of a token tensor or ``(text, tokenizer)``.

    Raises:
        DataError: fewer tokens than one window (or 2-D rows shorter than ``seq_len``).
        ConfigError: not token ids.
    """
    from autoqra.data import windows

    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], torch.Tensor):
        tokens, bos = _tokens_from_text(data)
        if tokens.numel() + (bos is not None) < seq_len:
            raise DataError(
                f"{label}: the text has {tokens.numel()} tokens, fewer than one sequence of seq_len={seq_len}; "
                "give more text or a smaller seq_len"
            )
        return windows(tokens, seq_len=seq_len, bos_token_id=bos)
    if not isinstance(data, torch.Tensor) or data.is_floating_point() or data.is_complex() or data.dtype == torch.bool:
        raise ConfigError(
            f"{label} must be a LongTensor of token ids, (text, tokenizer) or a DataLoader, got {type(data).__name__}"
            + (f" of dtype {data.dtype}" if isinstance(data, torch.Tensor) else "")
        )
    data = data.long()
    if data.dim() == 1:
        if data.numel() < seq_len:
            raise DataError(
                f"{label} has {data.numel()} tokens, fewer than one sequence of seq_len={seq_len}; "
                "give more tokens or a smaller seq_len"
            )
        return windows(data, seq_len=seq_len)
    if data.dim() == 2:
        n, length = data.shape
        if n == 0 or length < seq_len:
            raise DataError(
                f"{label} rows have {length} tokens ({n} rows), fewer than one sequence of seq_len={seq_len}; "
                f"pass seq_len={length} (or less) or longer rows"
            )
        per_row = length // seq_len
        return data[:, : per_row * seq_len].reshape(n * per_row, seq_len).contiguous()
    raise ConfigError(f"{label} token tensor must be 1-D or 2-D, got shape {tuple(data.shape)}")


def _is_loader(data: Any) -> bool:
    if isinstance(data, (torch.Tensor, str, bytes, dict)):
        return False
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], torch.Tensor):
        return False  # (text, tokenizer)
    return isinstance(data, Iterable)


def _window_batches(windows: torch.Tensor, batch_size: int, seed: int, skip: int = 0) -> Iterator[torch.Tensor]:
    """Endless batches of windows: a fresh seeded permutation per pass over the data; the first ``skip``
    batches are drawn and dropped (a resumed run goes on where the paused one stopped)."""
    generator = torch.Generator().manual_seed(seed)
    pending: list[int] = []
    drawn = 0
    while True:
        while len(pending) < batch_size:
            pending.extend(torch.randperm(windows.shape[0], generator=generator).tolist())
        idx, pending = pending[:batch_size], pending[batch_size:]
        drawn += 1
        if drawn > skip:
            yield windows[idx]


def _loader_batches(loader: Iterable[Any]) -> Iterator[Any]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise DataError("the DataLoader yielded no batch; give it at least one sequence")


def _as_batch(batch: Any) -> dict[str, torch.Tensor]:
    """``{"input_ids", optional "attention_mask", optional "labels"}`` of one loader batch."""
    if isinstance(batch, torch.Tensor):
        out = {"input_ids": batch}
    elif isinstance(batch, dict) or hasattr(batch, "keys"):
        if "input_ids" not in batch:
            raise ConfigError(f"a DataLoader batch dict needs 'input_ids', got keys {sorted(batch.keys())}")
        out = {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch and batch[k] is not None}
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        out = {"input_ids": batch[0]}
    else:
        raise ConfigError(
            f"a DataLoader must yield input_ids tensors or dicts with 'input_ids', got {type(batch).__name__}"
        )
    ids = out["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
        raise ConfigError("input_ids must be an integer tensor")
    if ids.dim() == 1:
        out = {k: v.unsqueeze(0) for k, v in out.items()}
    if out["input_ids"].dim() != 2 or out["input_ids"].shape[1] < 2:
        raise DataError(
            f"input_ids batches must be [batch, seq_len] with seq_len >= 2, got {tuple(out['input_ids'].shape)}"
        )
    return out


# -- loss ----------------------------------------------------------------------------------------
def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


# -- schedule ------------------------------------------------------------------------------------
def lr_factor(step: int, *, steps: int, warmup: int, scheduler: str) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based): linear warmup
    over ``warmup`` steps, then constant / cosine to 0 / linear to 0 at ``steps``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def _check_args(steps: int, lr: float, batch_size: int, seq_len: int, grad_accum: int, scheduler: str,
                warmup: int, eval_every: int | None, max_grad_norm: float | None) -> None:
    def positive_int(name: str, value: object, minimum: int = 1) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"finetune: {name} must be an int >= {minimum}, got {value!r}")

    positive_int("steps", steps)
    positive_int("batch_size", batch_size)
    positive_int("seq_len", seq_len, 2)
    positive_int("grad_accum", grad_accum)
    positive_int("warmup", warmup, 0)
    if eval_every is not None:
        positive_int("eval_every", eval_every)
    if not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr):
        raise ConfigError(f"finetune: lr must be a positive number, got {lr!r} (e.g. lr=5e-4)")
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"finetune: scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ConfigError(f"finetune: max_grad_norm must be > 0 or None (no clipping), got {max_grad_norm!r}")


# -- the loop ------------------------------------------------------------------------------------
def _snapshot(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def _copy_into(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    for t, s in zip(targets, sources, strict=True):
        t.copy_(s)


def _restore(params: list[nn.Parameter], snapshot: list[torch.Tensor]) -> None:
    _copy_into(params, snapshot)


@contextlib.contextmanager
def _trim_after_blocks(model: nn.Module, enabled: bool) -> Iterator[None]:
    """While entered, return the heap's free pages after every block's forward (`trim_heap`; nothing
    under jemalloc): glibc otherwise keeps the forward's transient blocks between the activations it
    holds for the backward. Blocks: `autoqra.recompute.find_blocks` of the compiled layers. Under
    ``torch.compile`` the hook traces to nothing (a trim inside the graph would break it per block)."""
    if not enabled:
        yield
        return
    from autoqra.recompute import find_blocks

    def trim(*_: object) -> None:  # a forward hook that returns None leaves the output as it is
        if not torch.compiler.is_compiling():  # traced by torch.compile: no side effect in the graph
            trim_heap()

    layers = [m for m in model.modules() if isinstance(m, QuantLoRALinear)]
    handles = [block.register_forward_hook(trim) for block in find_blocks(model, layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _gradient_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Turn a Hugging Face model's activation checkpointing on for the loop (off again after,
    when it was off): ``activation_checkpointing_enable`` (transformers >= 5) or the older
    ``gradient_checkpointing_enable``."""
    if not enabled:
        yield
        return
    new_api = hasattr(model, "activation_checkpointing_enable")
    enable = getattr(model, "activation_checkpointing_enable" if new_api else "gradient_checkpointing_enable", None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", True):
        raise ConfigError(
            f"gradient_checkpointing=True needs a Hugging Face model that supports activation checkpointing; "
            f"{type(model).__name__} does not: wrap its blocks in torch.utils.checkpoint yourself"
        )
    was_on = bool(getattr(model, "is_activation_checkpointing" if new_api else "is_gradient_checkpointing", False))
    # non-reentrant: the frozen embeddings give inputs without grad, which the reentrant variant drops
    kwargs = {"use_reentrant": False}
    if new_api:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        enable(gradient_checkpointing_kwargs=kwargs)
    try:
        yield
    finally:
        if not was_on:
            getattr(model, "activation_checkpointing_disable" if new_api else "gradient_checkpointing_disable")()


def finetune(
    model: nn.Module,
    data: Any,
    *,
    steps: int,
    lr: float = 5e-4,
    batch_size: int = 4,
    seq_len: int = 256,
    grad_accum: int = 1,
    scheduler: str = "constant",
    warmup: int = 0,
    seed: int = 0,
    eval_data: Any = None,
    eval_every: int | None = None,
    gradient_checkpointing: bool = False,
    callbacks: Sequence[Callable[[StepInfo], Any]] = (),
    progress: bool = True,
    max_grad_norm: float | None = 1.0,
    weight_decay: float = 0.0,
    loss_chunk_tokens: int | str | None = "auto",
    trim_memory: bool = True,
    pause_after: int | None = None,
    resume: FinetuneCheckpoint | None = None,
) -> FinetuneResult:
    """Fine-tune the LoRA adapters of a compiled model on a causal-LM objective, in place.

    Args:
        model: a model compiled by `autoqra.compile` (or loaded by `autoqra.io.load`), possibly
            wrapped by ``DistributedDataParallel`` (`wrap_ddp`); see "Distributed" in the module
            docstring for what changes under ``torchrun``.
        data: token ids (1-D / 2-D LongTensor), ``(text or [texts], tokenizer)``, or a DataLoader
            yielding ``input_ids`` (tensors or dicts); see the module docstring.
        steps: optimizer steps; each sees ``grad_accum`` batches of ``batch_size`` windows of
            ``seq_len`` tokens (a DataLoader's batches are taken as they come). Under
            torch.distributed ``batch_size`` is the global batch; each rank trains on
            ``batch_size / world_size`` windows of it.
        lr / scheduler / warmup: AdamW learning rate, ``constant`` | ``cosine`` | ``linear``
            decay to 0 at ``steps``, after ``warmup`` steps of linear warmup.
        seed: batch order and dropout.
        eval_data: windows (2-D, used as given), tokens (1-D, cut at ``seq_len``) or
            ``(text, tokenizer)`` whose perplexity (`autoqra.evaluate.perplexity`) is measured
            before training, every ``eval_every`` steps and at the end.
        gradient_checkpointing: recompute activations in the backward (Hugging Face models).
        callbacks: called with a `StepInfo` after every step; returning ``True`` stops training.
        max_grad_norm: clip the adapters' gradient norm (None: no clipping).
        loss_chunk_tokens: ``"auto"`` (default): the output module and the cross-entropy run in
            chunks of tokens whose fp32 logits take ~32 MiB, so the full logits never exist (see
            `autoqra.loss`; the full logits when the model cannot be chunked); an int: that many
            tokens per chunk; None: full logits.
        trim_memory: after every step and after every block's forward, return the heap's free pages
            to the system (`autoqra.memory.trim_heap`: glibc ``malloc_trim``; nothing under jemalloc).
            glibc keeps what a step freed and the next step's allocations land beside it, so the peak
            RSS climbs for several steps; measured on SmolLM2 (uniform 3-bit r8, 8 steps of 2×256
            tokens) the rise above the live model fell from ~1.75 to ~1.3 GiB with the per-step trim
            (~11% more time, mean of 4 alternations: re-faulting the returned pages), and to ~0.86 GiB
            with the per-block trims too (no measurable time; benchmarks/RESULTS.md). False: leave the
            heap alone.
        pause_after: stop after this step (``1 <= pause_after < steps``) and return the
            `FinetuneCheckpoint` in ``FinetuneResult.checkpoint`` (see "Pause and resume" above).
        resume: a checkpoint of a paused run with the same ``steps`` and settings: load its adapters
            and optimizer state and go on from the step after it.

    Raises:
        NotCompiledError: no ``QuantLoRALinear`` in the model (call `autoqra.compile` first).
        ConfigError: a bad argument (steps or batch_size < 1, unknown scheduler, ...).
        DataError: less data than one sequence.
        WorldSizeError: under torch.distributed, the world size does not divide ``batch_size``.
        NonFiniteLossError: a NaN/Inf loss or gradient; the adapters are restored.
    """
    _check_args(steps, lr, batch_size, seq_len, grad_accum, scheduler, warmup, eval_every, max_grad_norm)
    if not isinstance(trim_memory, bool):
        raise ConfigError(f"finetune: trim_memory must be True or False, got {trim_memory!r}")
    require_module(model, "finetune", hint="pass the compiled model (CompileResult.model)")
    _check_pause(steps, pause_after, resume, data)
    inner = unwrap_model(model)
    if resume is not None:
        load_adapter_state(inner, resume.adapters)
    params = adapter_parameters(inner)
    trainable = {id(p) for p in params}
    stray = [n for n, p in inner.named_parameters() if p.requires_grad and id(p) not in trainable]
    if stray:
        logger.warning(
            "finetune trains only the adapters; %d other parameters require grad and get gradients that are "
            "never used (e.g. %s): freeze them to save memory", len(stray), stray[0]
        )
    for p in params:
        p.requires_grad_(True)
    device = _model_device(inner)
    mode, group, rank, world = _distributed(model)
    share: int | None = None  # this rank's slice of every global batch of windows

    if (pause_after is not None or resume is not None) and mode:
        raise ConfigError("finetune: pause_after / resume run in one process, not under torch.distributed")
    drawn = 0 if resume is None else resume.drawn  # window batches drawn so far
    if _is_loader(data):
        batches: Iterator[Any] = _loader_batches(data)
        from_loader = True
        sampler = getattr(data, "sampler", None)
        if mode and not isinstance(sampler, torch.utils.data.distributed.DistributedSampler):
            logger.warning("finetune on %d processes takes a DataLoader's batches as they come: give it a "
                           "DistributedSampler so every rank sees other data", world)
    else:
        if mode:
            _check_world(batch_size, world)
            share = batch_size // world
        train_windows = token_windows(data, seq_len, label="data")
        if train_windows.shape[0] < batch_size:
            logger.warning("only %d windows for batch_size=%d: windows repeat within a batch",
                           train_windows.shape[0], batch_size)
        batches = _window_batches(train_windows, batch_size, seed, skip=drawn)
        from_loader = False
    eval_windows = None
    if isinstance(eval_data, torch.Tensor) and eval_data.dim() == 2:
        eval_windows = eval_data.long()  # windows as given (any length >= 2)
    elif eval_data is not None:
        eval_windows = token_windows(eval_data, seq_len, label="eval_data")

    use_cache_flag = getattr(getattr(inner, "config", None), "use_cache", None) is not None
    if loss_chunk_tokens == "auto":
        chunk_tokens = auto_chunk_tokens(inner)
    elif loss_chunk_tokens is None or (isinstance(loss_chunk_tokens, int) and not isinstance(loss_chunk_tokens, bool)
                                       and loss_chunk_tokens >= 1):
        chunk_tokens = loss_chunk_tokens
    else:
        raise ConfigError(f"finetune: loss_chunk_tokens must be 'auto', None (full logits) or an int >= 1, "
                          f"got {loss_chunk_tokens!r}")
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps=steps, warmup=warmup, scheduler=scheduler)
    )
    first = 1
    if resume is None:
        result = FinetuneResult(steps=0)
    else:
        optimizer.load_state_dict(resume.optimizer)  # the lr the schedule had set after the paused step
        schedule.load_state_dict(resume.scheduler)
        result = replace(resume.result, losses=list(resume.result.losses), lrs=list(resume.result.lrs),
                         eval_perplexities=list(resume.result.eval_perplexities), checkpoint=None)
        first = resume.step + 1
    last = steps if pause_after is None else pause_after

    def evaluate(step: int) -> float:
        from autoqra.evaluate import perplexity

        ppl = perplexity(inner, eval_windows, batch_size=batch_size, progress=False)
        result.eval_perplexities.append((step, ppl))
        logger.info("step %d: eval perplexity %.4f", step, ppl)
        return ppl

    modes = [(m, m.training) for m in inner.modules()]
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    warned_shape = False
    try:
        if eval_windows is not None and resume is None:
            evaluate(0)
        with (
            torch.random.fork_rng(devices=rng_devices),
            _gradient_checkpointing(inner, gradient_checkpointing),
            _trim_after_blocks(inner, trim_memory),
            tqdm(total=steps, desc="finetune", unit="step", disable=tqdm_disable(progress, also=rank != 0)) as bar,
        ):
            torch.manual_seed(seed + rank)
            if resume is not None:
                torch.set_rng_state(resume.rng)
            model.train()
            # two preallocated copies of the adapters: the last that gave a finite loss, and this step's
            good, start = _snapshot(params), _snapshot(params)
            good_step = first - 1
            bar.update(first - 1)
            for step in range(first, last + 1):
                t0 = time.perf_counter()
                _copy_into(start, params)
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                step_tokens = 0
                for micro in range(grad_accum):
                    raw = next(batches)
                    drawn += 1
                    if share is not None:  # every rank drew the same global batch: take this rank's slice
                        raw = raw[rank * share : (rank + 1) * share]
                    batch = _as_batch(raw) if from_loader else {"input_ids": raw}
                    if from_loader and not warned_shape:
                        warned_shape = True
                        shape = tuple(batch["input_ids"].shape)
                        if shape != (batch_size, seq_len):
                            logger.warning("finetune: the DataLoader's batches are %s; batch_size=%d and "
                                           "seq_len=%d are not used", shape, batch_size, seq_len)
                    batch = {k: v.to(device) for k, v in batch.items()}
                    sync = is_ddp and micro < grad_accum - 1
                    with model.no_sync() if sync else contextlib.nullcontext():
                        loss, _ = causal_lm_loss(model, batch, use_cache_flag=use_cache_flag,
                                                 chunk_tokens=chunk_tokens)
                        value = float(loss.detach())
                        # distributed: checked after the step's all-reduce, so every rank stops together
                        if not mode and not math.isfinite(value):
                            _restore(params, good)
                            raise NonFiniteLossError(
                                f"the loss is {value} at step {step} (micro-batch {micro + 1}/{grad_accum}); the "
                                f"adapters were restored to {_when(good_step)}, the last that gave a finite loss. "
                                "Lower lr, check the data for bad token ids, or train in float32",
                                step=step, restored_step=good_step,
                            )
                        (loss / grad_accum).backward()
                    step_loss += value / grad_accum
                    step_tokens += int(batch["input_ids"].numel())
                if mode:
                    totals = torch.tensor([step_loss, step_tokens], dtype=torch.float64, device=device)
                    dist.all_reduce(check_collective(totals, group), group=group)
                    step_loss, step_tokens = float(totals[0]) / world, int(totals[1])
                    if not math.isfinite(step_loss):
                        _restore(params, good)
                        raise NonFiniteLossError(
                            f"the loss is {step_loss} at step {step} (on at least one of the {world} ranks); the "
                            f"adapters were restored to {_when(good_step)}, the last that gave a finite loss. "
                            "Lower lr, check the data for bad token ids, or train in float32",
                            step=step, restored_step=good_step,
                        )
                    if mode == "all_reduce":
                        _all_reduce_mean_grads(params, group, world)
                good, start, good_step = start, good, step  # the adapters of this step gave a finite loss
                norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
                if not math.isfinite(float(norm)):
                    _restore(params, good)
                    raise NonFiniteLossError(
                        f"the adapters' gradient norm is {float(norm)} at step {step}; the adapters were restored "
                        f"to {_when(good_step)}, the last that gave a finite loss. Lower lr or check the data",
                        step=step, restored_step=good_step,
                    )
                current_lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                schedule.step()
                if trim_memory:
                    trim_heap()  # counted in the step's time
                seconds = time.perf_counter() - t0
                result.steps = step
                result.losses.append(step_loss)
                result.lrs.append(current_lr)
                result.tokens += step_tokens
                result.seconds += seconds
                result.tokens_per_second = result.tokens / max(result.seconds, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{result.tokens_per_second:.0f}")
                ppl = None
                if eval_windows is not None and step < steps and eval_every and step % eval_every == 0:
                    ppl = evaluate(step)
                    model.train()
                info = StepInfo(step=step, loss=step_loss, lr=current_lr, tokens=result.tokens,
                                tokens_per_second=result.tokens_per_second, eval_perplexity=ppl)
                stop = [cb(info) is True for cb in callbacks]  # every callback sees every step
                if any(stop) and step < steps:
                    result.stopped_early = True
                    logger.info("a callback stopped training after step %d", step)
                    break
            if pause_after is not None and result.steps == pause_after and not result.stopped_early:
                result.checkpoint = FinetuneCheckpoint(
                    step=pause_after, steps=steps, adapters=adapter_state(inner), optimizer=optimizer.state_dict(),
                    scheduler=schedule.state_dict(), drawn=drawn, rng=torch.get_rng_state(),
                    result=replace(result, checkpoint=None))
    finally:
        for module, training in modes:
            module.training = training
    if eval_windows is not None:
        evaluate(result.steps)
    logger.info("fine-tuned %d steps%s: loss %.4f -> %.4f, %.0f tokens/s", result.steps,
                f" of {steps} (paused)" if result.checkpoint is not None else "", result.losses[0],
                result.losses[-1], result.tokens_per_second)
    return result


def _check_pause(steps: int, pause_after: int | None, resume: FinetuneCheckpoint | None, data: Any) -> None:
    if pause_after is not None and (isinstance(pause_after, bool) or not isinstance(pause_after, int)
                                    or not 1 <= pause_after < steps):
        raise ConfigError(f"finetune: pause_after must be an int in [1, steps), got {pause_after!r} (steps={steps})")
    if resume is not None:
        if not isinstance(resume, FinetuneCheckpoint):
            raise ConfigError(f"finetune: resume must be the FinetuneResult.checkpoint of a paused run, "
                              f"got {type(resume).__name__}")
        if resume.steps != steps:
            raise ConfigError(f"finetune: resume comes from a run of steps={resume.steps}; pass the same steps "
                              f"(got {steps}): the schedule depends on it")
        if pause_after is not None and pause_after <= resume.step:
            raise ConfigError(f"finetune: pause_after={pause_after} is not after the resumed step {resume.step}")
    if (pause_after is not None or resume is not None) and _is_loader(data):
        raise ConfigError("finetune: pause_after / resume need token data (a tensor or (text, tokenizer)), "
                          "not a DataLoader, whose position cannot be restored")


def _when(step: int) -> str:
    return "their values before training" if step == 0 else f"their values at step {step}"

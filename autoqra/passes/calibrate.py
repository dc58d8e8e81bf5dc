"""CalibratePass: per-layer statistics of the calibration data, through hooks.

For every selected layer it collects
* ``d2``: per-input-channel mean of x² over all calibration tokens (forward pre-hooks), and
* ``xtx``: the full input second-moment matrix for layers with ``in_features ≤ covariance_max_dim``
  (float32; it drives error-compensating rounding and the exact output-error norm), and
* ``g2``: per-output-channel mean of (∂L/∂y)² of the token-summed causal-LM loss at the layer's
  output (tensor hooks on a few backward passes; no parameter gradient is computed), and
* ``grad`` (``weight_gradients=True``, for ``objective="finetune"``): the loss gradient with
  respect to the weight, ``Σ_t g_t x_tᵀ`` over the calibration tokens (``[out, in]`` held as
  float16 codes × one scale, :class:`~autoqra.scaled_half.ScaledHalf`: half the bytes of the fp32
  weights instead of all of them; built in the same hooks; the layer's input is kept only until
  its backward, as float16 codes × one scale, one copy per distinct input tensor). It tells what an
  adapter can learn (:mod:`autoqra.search.plasticity`), which needs only its singular values: `LayerStats.grad_spectrum` computes them once and drops the sum.

Statistics are O(channels) per layer, accumulated batch by batch, so memory stays bounded by
one forward/backward of one batch, plus the weight gradients when asked for (half the fp32
weights' bytes until the plasticity pass reduces them to their spectra) and the ``[in, in]``
moments when ``rounding="gptq"`` needs them. Without calibration data this pass records nothing and the
estimators take their data-free path.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from autoqra.distributed import all_reduce_int, all_reduce_sum, is_distributed, shard
from autoqra.errors import DataError
from autoqra.ir.discover import layer_kind
from autoqra.ir.layer import LayerKind
from autoqra.ir.program import Program
from autoqra.memory import trim_heap
from autoqra.passes.base import PassBase, PassResult
from autoqra.progress import tqdm_disable
from autoqra.recompute import Recompute, find_blocks
from autoqra.scaled_half import ScaledHalf

logger = logging.getLogger(__name__)


@dataclass
class LayerStats:
    """Calibration statistics of one layer (float64 sums and counts)."""

    x2_sum: torch.Tensor
    x_count: int = 0
    g2_sum: torch.Tensor | None = None
    g_count: int = 0
    xtx_sum: torch.Tensor | None = None  # float32 [in, in] sum of x xᵀ (small layers only)
    grad_sum: ScaledHalf | None = None  # [out, in] sum over tokens of g xᵀ (the weight gradient), float16 × scale
    #: squared singular values of the mean weight gradient, descending (float64), once `grad_spectrum` ran
    grad_sv2: torch.Tensor | None = None

    @property
    def grad(self) -> torch.Tensor | None:
        """The per-token mean loss gradient with respect to the weight, float32 (None when not collected
        or already reduced to its spectrum)."""
        if self.grad_sum is None or self.g_count == 0:
            return None
        return self.grad_sum.float().div_(self.g_count)

    def grad_spectrum(self, *, release: bool = True) -> torch.Tensor | None:
        """Squared singular values of the mean weight gradient, descending (float64; None without weight
        gradients). Computed once; ``release`` then drops the ``[out, in]`` sum, which
        nothing else reads."""
        if self.grad_sv2 is None:
            grad = self.grad
            if grad is None:
                return None
            from autoqra.search.plasticity import squared_singular_values

            self.grad_sv2 = squared_singular_values(grad).cpu()
        if release:
            self.grad_sum = None
        return self.grad_sv2

    @property
    def d(self) -> torch.Tensor:
        """Per-input-channel RMS of the inputs."""
        return (self.x2_sum / max(self.x_count, 1)).sqrt()

    @property
    def hessian(self) -> torch.Tensor | None:
        """The inputs' second-moment matrix E[x xᵀ] (None when not collected)."""
        if self.xtx_sum is None or self.x_count == 0:
            return None
        return self.xtx_sum / self.x_count

    @property
    def g(self) -> torch.Tensor | None:
        """Per-output-channel RMS of the loss gradient at the output (None without backward)."""
        if self.g2_sum is None or self.g_count == 0:
            return None
        return (self.g2_sum / self.g_count).sqrt()

    def to_cpu(self) -> LayerStats:
        """These statistics with every tensor on the CPU (itself when they already are)."""
        tensors = ("x2_sum", "g2_sum", "xtx_sum", "grad_sum", "grad_sv2")
        if all(getattr(self, k) is None or getattr(self, k).device.type == "cpu" for k in tensors):
            return self
        return replace(self, **{k: None if getattr(self, k) is None else getattr(self, k).to("cpu") for k in tensors})


def as_batches(calib: object, *, batch_size: int = 1) -> list[torch.Tensor]:
    """Normalize calibration data to a list of LongTensor [batch, seq] token batches.

    Accepts a LongTensor [n, seq] (or [seq]), a list of such tensors, or an iterable (e.g. a
    DataLoader) yielding tensors or dicts with ``input_ids``.
    """
    if isinstance(calib, torch.Tensor):
        tensors: list[torch.Tensor] = [calib.unsqueeze(0) if calib.dim() == 1 else calib]
    elif isinstance(calib, Iterable) and not isinstance(calib, (str, bytes)):
        tensors = []
        for item in calib:
            if isinstance(item, dict):
                if "input_ids" not in item:
                    raise DataError("calibration dicts need an 'input_ids' entry")
                item = item["input_ids"]
            if not isinstance(item, torch.Tensor):
                raise DataError(f"calibration items must be tensors of token ids, got {type(item).__name__}")
            tensors.append(item.unsqueeze(0) if item.dim() == 1 else item)
    else:
        raise DataError(
            f"cannot read calibration data of type {type(calib).__name__}; pass a LongTensor [n, seq_len], "
            "a list of them, or a DataLoader of token batches"
        )
    batches = []
    for t in tensors:
        if t.dim() != 2:
            raise DataError(f"calibration batches must be [batch, seq_len], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            t = t.long()  # int32 / uint8 token ids → the LongTensor embeddings and losses need
        batches.extend(t[i : i + batch_size] for i in range(0, t.shape[0], batch_size))
    if not batches or sum(b.numel() for b in batches) == 0:
        raise DataError("calibration data is empty; pass at least one batch of tokens, or calib=None (data-free)")
    if all(b.shape[1] < 2 for b in batches):
        raise DataError("calibration sequences are too short (need ≥ 2 tokens for a next-token loss)")
    return batches


def _lm_loss(model: nn.Module, batch: torch.Tensor, chunk_tokens: int | None = None) -> torch.Tensor:
    """Token-summed next-token cross-entropy of a causal LM (logits from ``model(input_ids)``);
    with ``chunk_tokens`` the output module and the loss run per chunk (`autoqra.loss`): no
    ``[batch, seq, vocab]`` logits (only when the output module is not a calibrated layer: a
    checkpointed chunk would run its hooks twice)."""
    if chunk_tokens is not None:
        from autoqra.loss import causal_lm_loss

        mean, count = causal_lm_loss(model, {"input_ids": batch}, chunk_tokens=chunk_tokens,
                                     use_cache_flag=hasattr(getattr(model, "config", None), "use_cache"))
        return mean * count
    if hasattr(model, "config"):  # no KV cache: a recomputed block would append to it a second time
        out = model(input_ids=batch, use_cache=False) if hasattr(model.config, "use_cache") else model(input_ids=batch)
    else:
        out = model(batch)
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)
    if logits.dim() != 3 or logits.shape[:2] != batch.shape:
        raise DataError(
            f"gradient statistics need a causal LM returning logits [batch, seq, vocab]; got {tuple(logits.shape)}. "
            "Use gradients=False for other models"
        )
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
    )


@dataclass
class Calibration:
    """Statistics collected once, reusable by several `autoqra.compile` calls on the same model."""

    stats: dict[str, LayerStats]
    tokens: int
    gradients: bool
    weight_gradients: bool = False
    #: the token batches the statistics came from (short fine-tunes that score candidate plans train on them)
    batches: list[torch.Tensor] = field(default_factory=list)
    #: token batches held back from the statistics: candidate plans are scored by their loss there
    holdout: list[torch.Tensor] = field(default_factory=list)
    #: whether the inputs' second moments ``E[x xᵀ]`` were collected (what ``rounding="gptq"`` needs)
    covariance: bool = True


def _reduce_stats(graph, stats: dict[str, LayerStats], gradients: bool, covariance_max_dim: int,
                  weight_gradients: bool = False, device: torch.device | None = None) -> dict[str, LayerStats]:
    """Sum every layer's statistics over ranks (a rank may have seen no batch of a layer: zeros on
    ``device``, where the hooks accumulate); `all_reduce_sum` reduces on the backend's device."""
    out: dict[str, LayerStats] = {}
    zeros = functools.partial(torch.zeros, device=device or torch.device("cpu"))
    for name in graph.order():
        layer = graph.layer(name)
        if layer.kind is LayerKind.EMBEDDING:
            continue
        st = stats.get(name) or LayerStats(zeros(layer.in_features, dtype=torch.float64))
        x2 = all_reduce_sum(st.x2_sum.clone())
        x_count = all_reduce_int(st.x_count)
        g2, g_count = None, 0
        if gradients:
            g2 = all_reduce_sum(st.g2_sum.clone() if st.g2_sum is not None else
                                zeros(layer.out_features, dtype=torch.float64))
            g_count = all_reduce_int(st.g_count)
        xtx = None
        if layer.in_features <= covariance_max_dim:
            xtx = all_reduce_sum(st.xtx_sum.clone() if st.xtx_sum is not None else
                                 zeros(layer.in_features, layer.in_features))
        grad = None
        if weight_gradients:  # ranks hold different scales: reduced in float32, one layer at a time
            grad = ScaledHalf.from_float(all_reduce_sum(st.grad_sum.float() if st.grad_sum is not None else
                                                        zeros(layer.out_features, layer.in_features)))
        if x_count:
            out[name] = LayerStats(x2, x_count, g2 if g_count else None, g_count, xtx, grad if g_count else None)
    return out


class CalibratePass(PassBase):
    """Writes ``stats``: {layer name: LayerStats} in ``program.state['stats']``."""

    reads = ("graph",)
    writes = ("stats",)

    def __init__(self, calib: object | None, *, gradients: bool = True, max_batches: int | None = None,
                 progress: bool = True, covariance_max_dim: int = 2048, weight_gradients: bool = False,
                 recompute: bool = True) -> None:
        self.covariance_max_dim = covariance_max_dim
        self.recompute = recompute
        self.weight_gradients = weight_gradients and gradients
        self.reuse = calib if isinstance(calib, Calibration) else None
        self.batches: Sequence[torch.Tensor] | None = None
        if calib is not None and self.reuse is None:
            self.batches = as_batches(calib)
        if self.batches is not None and max_batches is not None:
            self.batches = self.batches[:max_batches]
        self.gradients = gradients
        self.progress = progress

    def call(self, program: Program) -> PassResult:
        if self.reuse is not None:
            graph = program.require_graph()
            missing = [n for n in graph.order() if n not in self.reuse.stats]
            if missing:
                raise DataError(
                    f"the given Calibration has no statistics for {missing[:3]}...: it was collected on another "
                    "model or layer selection; run autoqra.calibrate on this model"
                )
            program.state["stats"] = self.reuse.stats
            program.state["calib_tokens"] = self.reuse.tokens
            return PassResult(changed=False, info={"calibration": "reused", "tokens": self.reuse.tokens})
        if self.batches is None:
            program.state["stats"] = {}
            return PassResult(changed=False, info={"calibration": "none (data-free)"})
        graph = program.require_graph()
        model = program.model
        modules = dict(model.named_modules(remove_duplicate=False))
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if device.type == "meta":
            raise DataError("cannot calibrate a model on the meta device; load its weights first")
        stats: dict[str, LayerStats] = {}
        handles = []
        inputs: dict[str, list[torch.Tensor | ScaledHalf]] = {}  # layer inputs awaiting their backward
        shared: dict[int, tuple[weakref.ref, torch.Tensor | ScaledHalf]] = {}  # one held copy per input tensor

        def held_input(arg: torch.Tensor) -> torch.Tensor | ScaledHalf:
            """What is kept of a layer's input until its backward: float32 inputs as float16 codes ×
            one scale (half the bytes; the weight gradient is summed in float16 × scale anyway), a
            half-precision input as it is (the model's own tensor). Layers fed the same tensor (q, k,
            v; gate, up) share one held copy; a weak reference makes sure the id was not reused."""
            entry = shared.get(id(arg))
            if entry is not None and entry[0]() is arg:
                return entry[1]
            x = arg.detach()
            value: torch.Tensor | ScaledHalf = ScaledHalf.from_float(x) if x.dtype == torch.float32 else x
            shared[id(arg)] = (weakref.ref(arg), value)
            return value

        aliases = [modules[a] for n in graph.order() for a in (n, *graph.layer(n).tied)
                   if a == n or layer_kind(modules[a]) is graph.layer(n).kind]
        # the weight-gradient sums are allocated before the first batch, once: long-lived blocks allocated
        # among a backward's transient ones would fragment glibc's heap
        grad_sums = {n: ScaledHalf((graph.layer(n).out_features, graph.layer(n).in_features), device=device)
                     for n in graph.order() if self.weight_gradients
                     and graph.layer(n).kind is not LayerKind.EMBEDDING}
        # with gradients, each block's activations are recomputed in the backward instead of held
        recompute = Recompute(find_blocks(model, aliases) if (self.gradients and self.recompute) else (),
                              after_block=trim_heap)

        def make_hooks(name: str, kind: LayerKind):
            def pre_hook(_mod, args):
                if recompute.active or kind is LayerKind.EMBEDDING:  # the statistics come from the first forward
                    return
                x = args[0].detach()
                flat = x.reshape(-1, x.shape[-1]).double()
                if self.weight_gradients and torch.is_grad_enabled():
                    inputs.setdefault(name, []).append(held_input(args[0]))
                # sums stay on the activations' device (no copy per hook); moved to the CPU once at the end
                st = stats.setdefault(name, LayerStats(torch.zeros(flat.shape[-1], dtype=torch.float64,
                                                                   device=flat.device)))
                st.x2_sum += (flat * flat).sum(0)
                st.x_count += flat.shape[0]
                if flat.shape[-1] <= self.covariance_max_dim:
                    x32 = x.reshape(-1, x.shape[-1]).float()
                    xtx = x32.T @ x32
                    st.xtx_sum = xtx if st.xtx_sum is None else st.xtx_sum.add_(xtx)

            def fwd_hook(_mod, _args, out):
                if not (self.gradients and torch.is_grad_enabled()):
                    return out
                if not out.requires_grad:
                    out.requires_grad_()  # in the recomputation too: it must save what the first forward saved
                if recompute.active:  # the first forward's graph runs the backward, with its hooks
                    return out

                def grad_hook(grad):
                    flat = grad.detach().reshape(-1, grad.shape[-1]).double()
                    st = stats[name]
                    if st.g2_sum is None:
                        st.g2_sum = torch.zeros(flat.shape[-1], dtype=torch.float64, device=flat.device)
                    st.g2_sum += (flat * flat).sum(0)
                    st.g_count += flat.shape[0]
                    pending = inputs.get(name)
                    if pending:  # backward runs in reverse order: the last input belongs to this output
                        x_in = pending.pop()
                        x_in = x_in.float()  # a ScaledHalf or a half-precision model's own tensor
                        x_in = x_in.reshape(-1, x_in.shape[-1])
                        wgrad = grad.detach().reshape(-1, grad.shape[-1]).float().T @ x_in
                        if st.grad_sum is None:
                            held_sum = grad_sums.pop(name, None)
                            st.grad_sum = held_sum if held_sum is not None else ScaledHalf(wgrad.shape,
                                                                                           device=wgrad.device)
                        st.grad_sum.add_(wgrad)

                out.register_hook(grad_hook)
                return out

            return pre_hook, fwd_hook

        for name in graph.order():
            layer = graph.layer(name)
            pre, fwd = make_hooks(name, layer.kind)
            # a tied alias of another kind (the embedding of a tied lm_head) reads token ids, not the layer's input
            for alias in (name, *(a for a in layer.tied if layer_kind(modules[a]) is layer.kind)):
                handles.append(modules[alias].register_forward_pre_hook(pre))
                handles.append(modules[alias].register_forward_hook(fwd))
        was_training = model.training
        flags = {p: p.requires_grad for p in model.parameters()}
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        tokens = 0
        chunk = None
        if self.gradients and hasattr(model, "get_output_embeddings"):
            from autoqra.loss import auto_chunk_tokens

            head = model.get_output_embeddings()
            calibrated = {id(m) for m in aliases}
            if head is not None and id(head) not in calibrated:
                chunk = auto_chunk_tokens(model)
        batches = shard(self.batches)  # all of them in one process; a share under torch.distributed
        try:
            iterator = tqdm(batches, desc="calibrate", unit="batch", disable=tqdm_disable(self.progress))
            for batch in iterator:
                batch = batch.to(device)
                tokens += batch.numel()
                if self.gradients:
                    with torch.enable_grad(), recompute():
                        _lm_loss(model, batch, chunk).backward()
                    inputs.clear()
                    shared.clear()
                    trim_heap()  # what the batch's forward and backward freed goes back (glibc keeps it)
                else:
                    with torch.no_grad():
                        model(input_ids=batch) if hasattr(model, "config") else model(batch)
        finally:
            grad_sums.clear()  # those of layers no batch reached
            for h in handles:
                h.remove()
            for p, flag in flags.items():
                p.requires_grad_(flag)
            model.train(was_training)
        if is_distributed():
            stats = _reduce_stats(graph, stats, self.gradients, self.covariance_max_dim, self.weight_gradients,
                                  device)
            tokens = all_reduce_int(tokens)
        stats = {name: st.to_cpu() for name, st in stats.items()}
        missing = [n for n in graph.order() if n not in stats and graph.layer(n).kind is not LayerKind.EMBEDDING]
        if missing:
            logger.warning("calibration never reached %d layers (%s...): they get data-free errors", len(missing), missing[:3])
        program.state["stats"] = stats
        program.state["calib_tokens"] = tokens
        program.state["calibration"] = Calibration(stats, tokens, self.gradients, self.weight_gradients,
                                                   list(self.batches), covariance=self.covariance_max_dim > 0)
        return PassResult(info={"batches": len(self.batches), "tokens": tokens, "gradients": self.gradients,
                                "weight_gradients": self.weight_gradients})

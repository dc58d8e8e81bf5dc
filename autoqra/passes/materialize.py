"""MaterializePass: the only pass that mutates modules — swap every layer for a QuantLoRALinear.

Each layer becomes a packed-integer base (or its fp16 weight at 16 bits) plus a LoRA adapter of
the chosen rank, initialized LoftQ-style at that layer's own bits — in the same weighted norm as
the estimator when calibration statistics exist (d, and g when gradients were collected).
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from autoqra.ir.discover import layer_kind
from autoqra.ir.layer import LayerKind
from autoqra.ir.program import Program
from autoqra.modules.quant_lora_linear import QuantLoRALinear
from autoqra.modules.tied_embedding import TiedQuantEmbedding, check_mode, shareable
from autoqra.passes.base import PassBase, PassResult
from autoqra.progress import tqdm_disable
from autoqra.search.estimators import clamp_weights

logger = logging.getLogger(__name__)

#: model attribute holding ``{layer: (A₀, B₀)}``, the adapters as initialized (see `MaterializePass`)
INIT_ATTR = "autoqra_init_adapters"


def swap_in(model: torch.nn.Module, graph, new_modules: dict[str, torch.nn.Module],
            swapped: list[tuple[str, torch.nn.Module]], *, tied_embedding: str = "share") -> None:
    """Put each new module at its layer and its tied aliases of the same kind; a tied embedding (an
    alias of another kind) reads its rows from the new module (`TiedQuantEmbedding`) with
    ``tied_embedding="share"``, or keeps its float matrix with ``"keep"``. Every swap is appended to
    ``swapped`` as it happens, so `restore` can undo a partial swap."""
    check_mode(tied_embedding)
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, new in new_modules.items():
        layer = graph.layer(name)
        for alias in (name, *layer.tied):
            if alias == name or layer_kind(modules[alias]) is layer.kind:
                swapped.append((alias, modules[alias]))
                model.set_submodule(alias, new)
            elif tied_embedding == "share" and isinstance(new, QuantLoRALinear):
                reason = shareable(modules[alias])
                if reason is not None:
                    logger.warning("%s keeps its float weight beside %s's codes: %s", alias, name, reason)
                    continue
                swapped.append((alias, modules[alias]))
                model.set_submodule(alias, TiedQuantEmbedding(new, modules[alias], source_name=name))


def shared_embeddings(model: torch.nn.Module) -> dict[str, str]:
    """``{embedding: output layer}`` for every embedding that reads a compiled layer's rows."""
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    return {n: names[id(m.source)] for n, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, TiedQuantEmbedding) and id(m.source) in names}


def restore(model: torch.nn.Module, swapped: list[tuple[str, torch.nn.Module]]) -> None:
    """Undo `swap_in` (in reverse order)."""
    for alias, old in reversed(swapped):
        model.set_submodule(alias, old)


class MaterializePass(PassBase):
    reads = ("graph", "bits", "rank", "validated")
    optional_reads = ("stats", "built_layers")
    writes = ("materialized",)

    def __init__(self, *, backend: str = "packed", group_size: int = 64, alpha: float | None = None,
                 loftq_iters: int = 2, weighted_init: bool = True, progress: bool = True,
                 rounding: str = "rtn", adapter_dtype: torch.dtype = torch.float32,
                 keep_init_adapters: bool = True, tied_embedding: str = "share") -> None:
        self.tied_embedding = check_mode(tied_embedding)
        self.keep_init_adapters = keep_init_adapters
        self.rounding = rounding
        self.adapter_dtype = adapter_dtype
        self.backend = backend
        self.group_size = group_size
        self.alpha = alpha
        self.loftq_iters = loftq_iters
        self.weighted_init = weighted_init
        self.progress = progress

    def build(self, program: Program, name: str, bits: int, rank: int) -> QuantLoRALinear:
        """The new module of layer ``name`` at (bits, rank), from the model's current weight
        (a prebuilt one from ``program.state['built_layers']`` when the selection made it)."""
        built = program.state.get("built_layers", {}).get((name, bits, rank))
        if built is not None:
            return built
        stats = program.state.get("stats", {}) if self.weighted_init else {}
        modules = dict(program.model.named_modules(remove_duplicate=False))
        st = stats.get(name)
        d = clamp_weights(st.d).float() if st is not None else None
        g = clamp_weights(st.g).float() if st is not None and st.g is not None else None
        hessian = st.hessian if (self.rounding == "gptq" and st is not None) else None
        return QuantLoRALinear.from_linear(
            modules[name], bits, rank, alpha=self.alpha, d=d, g=g, loftq_iters=self.loftq_iters,
            backend=self.backend, group_size=self.group_size, name=name, hessian=hessian,
            adapter_dtype=self.adapter_dtype,
        )

    def call(self, program: Program) -> PassResult:
        graph = program.require_graph()
        model = program.model
        # check, then mutate once: every new module is built before the first swap
        new_modules: dict[str, QuantLoRALinear] = {}
        for name in tqdm(graph.order(), desc="materialize", unit="layer", disable=tqdm_disable(self.progress)):
            ann, layer = graph.annotation(name), graph.layer(name)
            if layer.kind is LayerKind.EMBEDDING:
                continue  # validated to stay at 16 bits, rank 0: kept as it is
            new_modules[name] = self.build(program, name, ann.bits, ann.rank)
        flags = {p: p.requires_grad for p in model.parameters()}
        swapped: list[tuple[str, torch.nn.Module]] = []
        try:
            swap_in(model, graph, new_modules, swapped, tied_embedding=self.tied_embedding)
            for p in model.parameters():
                p.requires_grad_(False)
            for m in model.modules():
                if isinstance(m, QuantLoRALinear):
                    for p in m.adapter_parameters():
                        p.requires_grad_(True)
            if self.keep_init_adapters:
                # the initial (error-absorbing) factors: an adapter exported for the fp32 base
                # carries only what fine-tuning learned, B A − B₀ A₀ (autoqra.peft_interop)
                setattr(model, INIT_ATTR, {
                    name: (m.lora_A.detach().clone(), m.lora_B.detach().clone())
                    for name, m in new_modules.items() if m.rank
                })
        except BaseException:
            restore(model, swapped)
            for p, flag in flags.items():
                p.requires_grad_(flag)
            raise
        return PassResult(info={"layers": len(new_modules), "shared_embeddings": shared_embeddings(model)})

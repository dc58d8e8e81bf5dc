"""SelectPlanPass: candidate plans scored by *measured* loss; the best one wins (no regret).

A per-layer additive proxy can be badly wrong (errors compound through the network; a few layers
with extreme weights dominate the sum; step-0 error says little about what fine-tuning will
reach). So the proxy only *proposes*; measurement *chooses*:

1. **Candidates.** The solver's plan for the objective at several values of ``λ`` (the weight of
   plasticity, :mod:`autoqra.search.plasticity`; ``λ = 0`` is the ``deploy`` plan, proposed with
   ``objective="deploy"`` — see `SelectConfig.grid`), and the uniform plans that fit the budget (for
   every bit-width, the largest rank that fits), deduplicated.
2. **Low fidelity** (every candidate): materialize it (layers are built once per (layer, bits,
   rank) and shared between candidates), measure the next-token loss on the held-back slice of
   the calibration data (never the evaluation data), put the original layers back.
3. **High fidelity** (``objective="finetune"``): by default every λ value's plan (the best by low
   fidelity when a solver proposes several per λ) and the best uniform plan get a short fine-tune of
   their adapters on the calibration batches (same steps, data order and learning rate for all), then
   the same held-back loss: λ is *fitted* by this measurement, and the step-0 loss cannot pre-select
   among the λ plans, since it rises with λ by construction (measured on SmolLM2 at the bytes of
   uniform 3-bit r8: step-0 ranked λ = 1 fourth and left it out of a 4-plan cut; fine-tuned, it scored
   best, and after 100 steps it reached 25.82 against the λ = 0.5 plan's 26.24). ``max_finetuned``
   caps the count instead (the best of each λ first, the best uniform plan always among them). A
   candidate whose fine-tune diverges (non-finite loss) is dropped.

   The fine-tune is itself two fidelities (``screen_steps``): every such candidate first runs
   ``screen_steps`` of the ``score_steps`` steps and is scored; then only the ``keep`` best plans
   that are not uniform, and the best uniform plan (no regret: it is always compared at the winner's
   fidelity), *continue* from where they paused (`autoqra.train.finetune`'s ``pause_after`` /
   ``resume``: the same batches, schedule and optimizer state, so a continued candidate's score and
   adapters are exactly those of an uninterrupted ``score_steps``-step run). On SmolLM2 at the bytes
   of uniform 3-bit r8 (5 candidates fine-tuned, 8 steps, screen at 4) that is 32 steps instead of 40.

The winner is the lowest score at the highest fidelity reached; ties go to the earlier
candidate (uniform plans come first). The scores are in ``program.state['selection']`` and in
the compile report. The model is unchanged when this pass ends, whatever happens.

**Fine-tuned adapters.** Every short fine-tune's result is kept (``program.state['scored_adapters']``:
candidate label → layer → ``lora_A`` / ``lora_B``, a few MB a plan; `autoqra.compile` returns them as
``CompileResult.scored_adapters``): the winner's adapters after the recipe of `short_finetune`, to warm-start
from (`autoqra.train.load_adapter_state`) or to evaluate without fine-tuning again (the demo does).

**Cache.** With a ``cache_dir``, the measured scores are stored under a key of everything they
depend on: every parameter and buffer of the model (raw bytes), the calibration and held-back
tokens, the candidates (which encode the error tables, the budget and λ's unit), how layers are
built, this config, and autoqra's and torch's versions. A second compile of the same model, data
and budget skips the measurement (minutes) and builds only the winner; ``lambda_=`` or any other
setting changes the key.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from autoqra.cache import JsonCache
from autoqra.errors import ConfigError, NonFiniteLossError, NotCompiledError
from autoqra.ir.layer import LayerKind
from autoqra.ir.program import Program
from autoqra.memory import trim_heap
from autoqra.modules.quant_lora_linear import QuantLoRALinear
from autoqra.park import park_on_disk
from autoqra.passes.base import PassBase, PassResult
from autoqra.passes.materialize import MaterializePass, restore, swap_in
from autoqra.passes.probe import ProbeConfig, holdout_batches, holdout_loss
from autoqra.passes.search import SearchPass
from autoqra.progress import tqdm_disable
from autoqra.quant.loftq import share_first_iteration
from autoqra.quant.memo import active_memo
from autoqra.search.problem import Choice, SearchProblem
from autoqra.train import FinetuneCheckpoint, adapter_state

__all__ = ["OBJECTIVES", "Candidate", "SelectConfig", "SelectPlanPass", "lambda_unit", "short_finetune"]

logger = logging.getLogger(__name__)

OBJECTIVES = ("finetune", "deploy")


@dataclass(frozen=True, kw_only=True)
class SelectConfig:
    """How candidates are proposed and scored.

    Attributes:
        objective: ``finetune`` (quality after fine-tuning: plasticity counts, candidates are
            scored after a short fine-tune) or ``deploy`` (quality as compiled: step-0 loss).
        lambdas: plasticity weights tried, in normalized units (``λ = 1``: the best uniform
            plan's total plasticity equals its total step-0 error); ignored with ``lambda_``.
        lambda_: one fixed normalized ``λ`` (no fitting among several).
        uniform: include the uniform plans that fit among the candidates (no-regret baseline).
        score_steps: adapter steps of the short fine-tune (high fidelity; 0: low fidelity only).
        max_finetuned: candidates that get the short fine-tune (``None``: every λ value's best plan
            and the best uniform plan; see the module docstring).
        screen_steps: steps after which every fine-tuned candidate is scored and only the ``keep``
            best non-uniform plans and the best uniform plan go on to ``score_steps`` (0, or not
            below ``score_steps``: every candidate runs all ``score_steps``).
        keep: non-uniform candidates that continue after the screen.
        lr / batch_size / seq_len / seed: the short fine-tune's recipe (AdamW, constant lr).
        probe: the error tables calibrated block by block against measured held-back loss before the
            candidates are proposed (`autoqra.passes.probe`); ``None``: the tables as predicted.
        band: each λ value also proposes its plan with every layer's bits restricted to the band of the
            highest-bits uniform plan that fits and the next bit-width up (e.g. 3–4 bits at the bytes of
            uniform 3-bit r8; `band_bits`): no layer below the uniform bits, none bought at 8 or 16. The
            two plans of a λ value are one proposal: the better at step 0 gets the fine-tune.
    """

    objective: str = "finetune"
    lambdas: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    lambda_: float | None = None
    uniform: bool = True
    score_steps: int = 8
    max_finetuned: int | None = None
    screen_steps: int = 4
    keep: int = 2
    lr: float = 5e-4
    batch_size: int = 2
    seq_len: int = 256
    seed: int = 0
    probe: ProbeConfig | None = ProbeConfig()
    band: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.band, bool):
            raise ConfigError(f"SelectConfig.band must be True or False, got {self.band!r}")
        if self.probe is not None and not isinstance(self.probe, ProbeConfig):
            raise ConfigError(f"SelectConfig.probe must be a ProbeConfig or None, got {self.probe!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.lambda_ is not None and (
            isinstance(self.lambda_, bool) or not isinstance(self.lambda_, (int, float))
            or not math.isfinite(self.lambda_) or self.lambda_ < 0
        ):
            raise ConfigError(f"lambda_ must be a finite number >= 0 or None, got {self.lambda_!r}")
        if not self.lambdas or any(not isinstance(v, (int, float)) or v < 0 for v in self.lambdas):
            raise ConfigError(f"lambdas must be non-negative numbers, got {self.lambdas!r}")
        for name in ("score_steps", "max_finetuned", "batch_size", "seq_len", "screen_steps", "keep"):
            value = getattr(self, name)
            if name == "max_finetuned" and value is None:
                continue
            minimum = 0 if name in ("score_steps", "screen_steps") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"SelectConfig.{name} must be an int >= {minimum}, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"SelectConfig.lr must be > 0, got {self.lr!r}")

    @property
    def screen(self) -> int:
        """Steps of the screening fidelity (0: none; every fine-tuned candidate runs ``score_steps``)."""
        return self.screen_steps if 0 < self.screen_steps < self.score_steps else 0

    @property
    def grid(self) -> tuple[float, ...]:
        """Normalized λ values whose plans are candidates (0 is the deploy plan: with ``finetune`` only when
        ``lambdas`` lists it). The deploy plan spends the bytes on bits and leaves layers without adapters; a
        short fine-tune cannot see that it stops learning: on SmolLM2 at the bytes of uniform 3-bit r8, with
        the probe-calibrated tables it won the 8-step scores (3.5350 against λ = 0.5's 3.5544) and reached
        perplexity 31.42 after 100 steps, where the λ plans reach ~26."""
        if self.objective == "deploy":
            return (0.0,)
        if self.lambda_ is not None:
            return (float(self.lambda_),)
        return tuple(sorted({float(v) for v in self.lambdas}))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["lambdas"] = list(self.lambdas)  # JSON-stable
        if self.probe is not None:
            data["probe"]["bits"] = list(self.probe.bits)
        return data


@dataclass
class Candidate:
    """One plan and what was measured of it (losses are mean next-token NLL on the held-back slice)."""

    label: str
    choices: tuple[Choice, ...]
    bytes: int
    proxy: float
    uniform: bool
    loss0: float | None = None
    loss_ft: float | None = None
    #: after the screen's ``screen_steps`` fine-tuning steps (None: not screened)
    loss_screen: float | None = None
    note: str = ""
    layers: dict[str, Choice] = field(default_factory=dict)
    #: the proposal it came from (the λ value's plans share one: the evolutionary solver's front
    #: points); empty: its own label
    family: str = ""

    def add_note(self, text: str) -> None:
        self.note = f"{self.note}; {text}" if self.note else text

    def score(self, finetuned: bool) -> float:
        value = self.loss_ft if finetuned else self.loss0
        return math.inf if value is None or not math.isfinite(value) else value

    def mix(self) -> str:
        """Groups per (bits) and their mean rank, e.g. ``3b×120 r6.1, 4b×90 r2.0``."""
        parts = []
        for bits in sorted({b for b, _ in self.choices}):
            ranks = [r for b, r in self.choices if b == bits]
            parts.append(f"{bits}b×{len(ranks)} r{sum(ranks) / len(ranks):.1f}")
        return ", ".join(parts)

    def row(self) -> dict[str, Any]:
        return {"label": self.label, "bytes": self.bytes, "proxy": self.proxy, "uniform": self.uniform,
                "loss0": self.loss0, "loss_screen": self.loss_screen, "loss_ft": self.loss_ft, "note": self.note,
                "mix": self.mix()}


def short_finetune(model: nn.Module, train: list[torch.Tensor], config: SelectConfig, *,
                   pause_after: int | None = None, resume: FinetuneCheckpoint | None = None) -> Any:
    """The selection's short fine-tune (high fidelity) of ``model``'s adapters, in place: ``config.score_steps``
    AdamW steps (constant ``config.lr``) of ``config.batch_size`` windows of ``config.seq_len`` tokens cut
    from the concatenated ``train`` batches, order seeded by ``config.seed``. Returns the
    `~autoqra.train.FinetuneResult`. The same call reproduces a candidate's scored adapters (a screened
    candidate's too: ``pause_after`` / ``resume`` split the run without changing it)."""
    from autoqra.train import finetune

    tokens = torch.cat([b.reshape(-1) for b in train])
    seq_len = min(config.seq_len, max(2, tokens.numel() // config.batch_size))
    return finetune(model, tokens, steps=config.score_steps, lr=config.lr, batch_size=config.batch_size,
                    seq_len=seq_len, seed=config.seed, progress=False, pause_after=pause_after, resume=resume)


def lambda_unit(problem: SearchProblem, plasticity: dict[str, dict[int, float]], program: Program,
                uniform: list[Candidate]) -> float:
    """Natural λ per normalized unit: the best (lowest proxy error) uniform plan with a rank has
    total step-0 error == λ_unit × its total plasticity. Falls back to all ranks' mean."""
    graph = program.require_graph()
    groups = graph.groups()
    ranked = sorted((c for c in uniform if any(r for _, r in c.choices)), key=lambda c: c.proxy)
    total_p = 0.0
    total_e = 0.0
    if ranked:
        best = ranked[0]
        for group, choice in zip(problem.groups, best.choices, strict=True):
            for m in groups[group]:
                total_p += plasticity.get(m, {}).get(choice[1], 0.0)
                total_e += graph.annotation(m).error[choice]
    if total_p <= 0 or total_e <= 0:
        total_p = sum(max(t.values(), default=0.0) for t in plasticity.values())
        total_e = sum(max(graph.annotation(n).error.values(), default=0.0) for n in graph.order())
    return total_e / total_p if total_p > 0 and total_e > 0 else 0.0


def uniform_candidates(problem: SearchProblem) -> list[Candidate]:
    """One uniform plan per quantized bit-width every layer offers, at the largest common rank that fits
    ``problem.budget`` (the most to learn with); none for a bit-width whose rank-0 plan does not fit."""
    out = []
    keys = set.intersection(*(set(ch) for ch in problem.choices)) if problem.n_groups else set()
    for bits in sorted({b for b, _ in keys if b != 16}):
        fitting = []
        for rank in sorted({r for b, r in keys if b == bits}):
            idx = [ch.index((bits, rank)) for ch in problem.choices]
            total = int(sum(int(k[i]) for k, i in zip(problem.cost, idx, strict=True)))
            if total <= problem.budget:
                fitting.append((rank, total, idx))
        if not fitting:
            continue
        rank, total, idx = fitting[-1]  # the largest rank that fits: the most to learn with
        proxy = float(sum(float(e[i]) for e, i in zip(problem.error, idx, strict=True)))
        out.append(Candidate(label=f"uniform {bits}-bit r{rank}", choices=tuple((bits, rank) for _ in idx),
                             bytes=total, proxy=proxy, uniform=True))
    return out


def band_bits(problem: SearchProblem, uniform: list[Candidate]) -> tuple[int, ...]:
    """The bits of the band plans: the highest uniform plan's bits and the next quantized width up that some
    group offers (``()``: no uniform plan fits)."""
    if not uniform:
        return ()
    low = max(c.choices[0][0] for c in uniform)
    offered = sorted({b for ch in problem.choices for b, _ in ch if low < b < 16})
    return (low, *offered[:1])


def restrict_bits(problem: SearchProblem, bits: tuple[int, ...]) -> SearchProblem | None:
    """``problem`` with each group's choices restricted to ``bits`` (a group offering none keeps all of its
    own); ``None`` when that restricts nothing or leaves no plan within the budget."""
    keep = [[i for i, (b, _) in enumerate(ch) if b in bits] or list(range(len(ch))) for ch in problem.choices]
    if all(len(k) == len(ch) for k, ch in zip(keep, problem.choices, strict=True)):
        return None
    sub = SearchProblem.build(
        problem.groups,
        [[ch[i] for i in k] for ch, k in zip(problem.choices, keep, strict=True)],
        [[int(c[i]) for i in k] for c, k in zip(problem.cost, keep, strict=True)],
        [[float(e[i]) for i in k] for e, k in zip(problem.error, keep, strict=True)],
        problem.budget,
    )
    return sub if sub.min_cost() <= sub.budget else None


class SelectPlanPass(PassBase):
    """Writes ``bits`` / ``rank`` (the measured winner), ``selection`` (the scores) and
    ``built_layers`` (the winner's modules, for `MaterializePass` to swap in without rebuilding)."""

    reads = ("graph", "cost", "error", "plasticity", "stats")
    writes = ("bits", "rank", "selection", "built_layers", "scored_adapters")

    def __init__(self, search: SearchPass, materialize: MaterializePass, config: SelectConfig, *,
                 train: list[torch.Tensor], holdout: list[torch.Tensor], progress: bool | None = None,
                 cache_dir: Path | None = None, free_memo: bool = False, park_dir: Path | None = None) -> None:
        self.search = search
        #: where the original layers' weights are parked during the short fine-tunes (`autoqra.park`:
        #: nothing reads them then; None keeps them in memory)
        self.park_dir = park_dir
        self._parked = 0
        #: empty the open quantization memo once every candidate is built: nothing reads it afterwards
        #: (the fine-tunes and the rewrite use the built modules); `compile` sets it for its own memo only
        self.free_memo = free_memo
        self.materialize = materialize
        self.config = config
        self.train = train
        self.holdout = holdout
        self._held_batches = self._holdout_batches()  # scored many times: concatenated once
        self.progress = progress
        self._cache = JsonCache(cache_dir, prefix="selection-")
        self._seconds: dict[str, float] = {}  # where the measurement's time went (in the report)
        #: candidate label -> layer -> {"lora_A", "lora_B"} after its short fine-tune
        self._adapters: dict[str, dict[str, dict[str, torch.Tensor]]] = {}

    # -- cache ----------------------------------------------------------------------------------
    def _cache_key(self, program: Program, cands: list[Candidate], unit: float, base: SearchProblem) -> str:
        m = self.materialize
        graph = program.require_graph()
        state = program.model.state_dict(keep_vars=True)
        parts = {
            "kind": "selection",
            "config": self.config.to_dict(),
            "candidates": [[c.label, [list(ch) for ch in c.choices], c.bytes] for c in cands],
            "families": [c.family for c in cands],  # which get the fine-tune (`finetune_choice`)
            "groups": list(base.groups),
            "lambda_unit": repr(unit),
            "build": {"backend": m.backend, "group_size": m.group_size, "alpha": m.alpha,
                      "loftq_iters": m.loftq_iters, "weighted_init": m.weighted_init, "rounding": m.rounding,
                      "adapter_dtype": str(m.adapter_dtype),
                      # only where a layer has tied aliases (older cache entries stay valid elsewhere)
                      **({"tied_embedding": m.tied_embedding}
                         if any(graph.layer(n).tied for n in graph.order()) else {})},
            "names": list(state),
        }
        return self._cache.key(parts, [*state.values(), *self.train, None, *self.holdout])

    # -- candidates -----------------------------------------------------------------------------
    def candidates(self, program: Program) -> tuple[list[Candidate], float]:
        base = self.search.build_problem(program, lambda_=0.0)
        plasticity = program.state.get("plasticity", {})
        uniform = uniform_candidates(base) if self.config.uniform else []
        unit = lambda_unit(base, plasticity, program, uniform) if plasticity else 0.0
        found: list[Candidate] = list(uniform)
        seen = {c.choices for c in found}
        grid = self.config.grid
        if not plasticity and any(grid):
            logger.warning("no plasticity (no weight gradients were collected): only the deploy plan and the uniform "
                           "plans are candidates; calibrate with weight_gradients=True for objective='finetune'")
        if not unit and 0.0 not in grid:  # nothing to weigh plasticity with: the deploy plan stands in
            grid = (0.0, *grid)
        band = band_bits(base, uniform) if self.config.band else ()
        for lam in grid:
            if lam and not unit:  # no plasticity, or nothing to trade it against (every error is 0)
                continue
            problem = self.search.build_problem(program, lambda_=lam * unit)
            label = "deploy (λ=0)" if lam == 0 else f"finetune λ={lam:g}"
            if self.search.solver_name == "evolutionary":
                # the Pareto set's best plans by the objective join the candidates (measurement decides)
                from autoqra.search.evolutionary import evolve

                evolved = evolve(problem, self.search.seed, progress=self.progress)
                ranked = sorted(evolved.front, key=lambda a: (a.error, a.cost, a.index))
                results = [(label, evolved.best)] + [(f"{label} front #{i + 2}", a)
                                                     for i, a in enumerate(x for x in ranked if x != evolved.best)][:2]
            else:
                results = [(label, self.search.solve(problem, self.search.seed))]
            banded = restrict_bits(problem, band) if band else None
            if banded is not None:
                results.append((f"{label}, {band[0]}–{band[-1]} bits", self.search.solve(banded, self.search.seed)))
            for name, result in results:
                choices = tuple(result.choices)
                proxy = float(sum(float(e[ch.index(c)]) for e, ch, c in zip(base.error, base.choices, choices,
                                                                            strict=True)))
                if choices in seen:
                    for c in found:
                        if c.choices == choices:
                            c.add_note(f"also {name}")
                    continue
                seen.add(choices)
                found.append(Candidate(label=name, choices=choices, bytes=int(result.cost), proxy=proxy,
                                       uniform=False, family=label))
        return found, unit

    # -- measurement ----------------------------------------------------------------------------
    def _modules_for(self, program: Program, cand: Candidate, built: dict[tuple[str, int, int], QuantLoRALinear],
                     problem: SearchProblem, *, build: bool = True) -> dict[str, QuantLoRALinear]:
        """The candidate's module per layer (built once per (layer, choice) into ``built``); with
        ``build=False`` only ``cand.layers`` is filled."""
        graph = program.require_graph()
        groups = graph.groups()
        out: dict[str, QuantLoRALinear] = {}
        for group, choice in zip(problem.groups, cand.choices, strict=True):
            for name in groups[group]:
                if graph.layer(name).kind is LayerKind.EMBEDDING:
                    continue
                cand.layers[name] = choice
                if not build:
                    continue
                key = (name, *choice)
                if key not in built:
                    built[key] = self.materialize.build(program, name, *choice)
                out[name] = built[key]
        return out

    def _build_all(self, program: Program, cands: list[Candidate], built: dict[tuple[str, int, int], QuantLoRALinear],
                   problem: SearchProblem) -> None:
        """Build every candidate's layers once, sorted by (layer, bits, rank): the ranks of one layer at one
        bit-width come one after the other and share LoftQ's first iteration
        (`autoqra.quant.loftq.share_first_iteration`; the same modules as built one candidate at a time)."""
        for cand in cands:
            self._modules_for(program, cand, built, problem, build=False)
        keys = sorted({(n, *c) for cand in cands for n, c in cand.layers.items()} - set(built))
        with share_first_iteration():
            for key in tqdm(keys, desc="build candidate layers", unit="layer", disable=tqdm_disable(self.progress)):
                built[key] = self.materialize.build(program, *key)

    def _swap(self, program: Program, new: dict[str, nn.Module]) -> list[tuple[str, nn.Module]]:
        swapped: list[tuple[str, nn.Module]] = []
        try:
            swap_in(program.model, program.require_graph(), new, swapped,
                    tied_embedding=self.materialize.tied_embedding)
        except BaseException:
            restore(program.model, swapped)
            raise
        return swapped

    @staticmethod
    def _restore(program: Program, swapped: list[tuple[str, nn.Module]]) -> None:
        restore(program.model, swapped)

    def _holdout_batches(self) -> list[torch.Tensor]:
        """The held-back windows batched for scoring (`autoqra.passes.probe.holdout_batches`)."""
        return holdout_batches(self.holdout)

    def _holdout_loss(self, model: nn.Module) -> float:
        return holdout_loss(model, self._held_batches)

    def _finetune_loss(self, program: Program, modules: dict[str, QuantLoRALinear], label: str = "", *,
                       pause_after: int | None = None, resume: FinetuneCheckpoint | None = None,
                       ) -> tuple[float, str, FinetuneCheckpoint | None]:
        """Held-back loss after the candidate's short fine-tune (or its first ``pause_after`` steps, or the
        rest of it from ``resume``), a note, and the checkpoint of a paused run. The modules' adapters
        are put back as they were (they are shared between candidates)."""
        model = program.model
        layers = {id(m): m for m in modules.values()}.values()
        saved = {id(p): p.detach().clone() for m in layers for p in m.adapter_parameters()}
        flags = {p: p.requires_grad for p in model.parameters()}
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            for m in layers:
                for p in m.adapter_parameters():
                    p.requires_grad_(True)
            result = short_finetune(model, self.train, self.config, pause_after=pause_after, resume=resume)
            if not all(math.isfinite(v) for v in result.losses):
                return math.inf, "fine-tune diverged (non-finite loss): infeasible", None
            if result.checkpoint is None:  # the whole recipe ran: these are the candidate's scored adapters
                self._adapters[label] = adapter_state(model)  # the candidate's layers are the model's only ones
            return self._holdout_loss(model), "", result.checkpoint
        except NotCompiledError:
            return self._holdout_loss(model), "no adapter to train (all ranks 0)", None
        except NonFiniteLossError as exc:
            logger.warning("a candidate's short fine-tune diverged (%s); it is dropped", exc)
            return math.inf, "fine-tune diverged (non-finite loss): infeasible", None
        finally:
            with torch.no_grad():
                for m in layers:
                    for p in m.adapter_parameters():
                        p.copy_(saved[id(p)])
                        p.grad = None
            for p, flag in flags.items():
                p.requires_grad_(flag)

    def call(self, program: Program) -> PassResult:
        cfg = self.config
        program.require_graph()
        if not self.holdout:
            raise ConfigError("candidate plans are scored on held-back calibration data; pass calib=...")
        clock = time.perf_counter()
        self._seconds = {"propose": 0.0, "build": 0.0, "step0": 0.0, "finetune": 0.0}
        self._adapters = {}
        self._parked = 0
        base = self.search.build_problem(program, lambda_=0.0)
        cands, unit = self.candidates(program)
        self._seconds["propose"] = time.perf_counter() - clock
        if not cands:
            raise ConfigError("no candidate plan fits the budget; raise the budget or widen bits/ranks")
        built: dict[tuple[str, int, int], QuantLoRALinear] = {}
        if len(cands) == 1:  # nothing to choose between (e.g. a uniform search space): no measurement
            cands[0].note = "only candidate: not measured"
            return self._choose(program, base, cands, 0, built, unit, finetuned=False)
        cache_key = self._cache_key(program, cands, unit, base)
        cached = self._cache.get_json(cache_key)
        if cached is not None and len(cached.get("scores", ())) == len(cands):
            for cand, entry in zip(cands, cached["scores"], strict=True):
                cand.loss0, cand.loss_ft, cand.note = entry[:3]
                cand.loss_screen = entry[3] if len(entry) > 3 else None
                self._modules_for(program, cand, {}, base, build=False)
            finetuned = bool(cached["finetuned"])
            win = self._winner(cands, finetuned)
            logger.info("selection scores from the cache (%s): %s", cache_key[:12], cands[win].label)
            return self._choose(program, base, cands, win, built, unit, finetuned, cached=True)
        clock = time.perf_counter()
        self._build_all(program, cands, built, base)
        self._seconds["build"] += time.perf_counter() - clock
        bar = tqdm(total=len(cands), desc="score candidates", unit="plan", disable=tqdm_disable(self.progress))
        for cand in cands:
            modules = self._modules_for(program, cand, built, base)
            clock = time.perf_counter()
            swapped = self._swap(program, modules)
            try:
                cand.loss0 = self._holdout_loss(program.model)
            finally:
                self._restore(program, swapped)
            self._seconds["step0"] += time.perf_counter() - clock
            bar.update(1)
            bar.set_postfix_str(f"{cand.label}: {cand.loss0:.4f}")
        bar.close()
        memo = active_memo()
        if self.free_memo and memo is not None:
            memo.clear()  # its roundings served the builds; the short fine-tunes need the memory more
        trim_heap()
        finetuned = cfg.objective == "finetune" and cfg.score_steps > 0
        if finetuned:
            chosen = self.finetune_choice(cands, cfg.max_finetuned)
            self._keep_built(built, cands, chosen)  # only the fine-tuned candidates' modules are needed again
            self._park(program)
            self._short_finetunes(program, cands, chosen, built, base)
        win = self._winner(cands, finetuned)
        self._cache.put_json(cache_key, {"finetuned": finetuned,
                                         "scores": [[c.loss0, c.loss_ft, c.note, c.loss_screen] for c in cands]})
        return self._choose(program, base, cands, win, built, unit, finetuned)

    @staticmethod
    def _keep_built(built: dict[tuple[str, int, int], QuantLoRALinear], cands: list[Candidate],
                    indices: list[int]) -> None:
        """Drop the built modules that none of ``cands[indices]`` uses (bounded memory)."""
        needed = {(n, *c) for i in indices for n, c in cands[i].layers.items()}
        for key in [k for k in built if k not in needed]:
            del built[key]

    def _short_finetunes(self, program: Program, cands: list[Candidate], chosen: list[int],
                         built: dict[tuple[str, int, int], QuantLoRALinear], base: SearchProblem) -> None:
        """Fill ``loss_ft`` (and ``loss_screen``) of the ``chosen`` candidates: the screen's first steps for
        all of them, the rest of the recipe for the survivors (`SelectConfig.screen`); or the whole recipe
        for all when there is no screen or nothing to cut."""
        cfg = self.config
        screen = cfg.screen
        if screen and len(chosen) <= cfg.keep + 1:
            screen = 0  # every candidate would continue: one uninterrupted run each
        paused: dict[int, FinetuneCheckpoint | None] = {}

        def run(i: int, desc: str, **kwargs: Any) -> tuple[float, str, FinetuneCheckpoint | None]:
            cand = cands[i]
            clock = time.perf_counter()
            modules = self._modules_for(program, cand, built, base)
            swapped = self._swap(program, modules)
            try:
                loss, note, checkpoint = self._finetune_loss(program, modules, cand.label, **kwargs)
            finally:
                self._restore(program, swapped)
            self._seconds[desc] = self._seconds.get(desc, 0.0) + time.perf_counter() - clock
            if note and note not in cand.note:
                cand.add_note(note)
            return loss, note, checkpoint

        survivors = sorted(chosen)
        if screen:
            for i in tqdm(sorted(chosen), desc=f"short fine-tunes, {screen} steps", unit="plan",
                          disable=tqdm_disable(self.progress)):
                cands[i].loss_screen, _, paused[i] = run(i, "screen", pause_after=screen)
            survivors = self.survivors(cands, chosen, cfg.keep)
            for i in sorted(set(chosen) - set(survivors)):
                cands[i].add_note(f"stopped after the {screen}-step screen")
                paused.pop(i, None)
            self._keep_built(built, cands, survivors)  # the screened-out candidates' modules go
        desc = f"short fine-tunes, steps {screen + 1}-{cfg.score_steps}" if screen else "short fine-tunes"
        for i in tqdm(survivors, desc=desc, unit="plan", disable=tqdm_disable(self.progress)):
            cand = cands[i]
            if screen and paused.get(i) is None:  # nothing to continue: no adapter, or it diverged
                cand.loss_ft = cand.loss_screen
                continue
            cand.loss_ft = run(i, "finetune", resume=paused.get(i))[0]

    @staticmethod
    def survivors(cands: list[Candidate], chosen: list[int], keep: int) -> list[int]:
        """The screened candidates that continue: the ``keep`` best non-uniform ones by ``loss_screen`` and the
        best uniform one (ties to the earlier candidate; non-finite scores never continue)."""
        def key(i: int) -> tuple[float, int]:
            value = cands[i].loss_screen
            return (value if value is not None and math.isfinite(value) else math.inf), i

        ranked = sorted((i for i in chosen if key(i)[0] < math.inf), key=key)
        planned = [i for i in ranked if not cands[i].uniform][:keep]
        uniform = [i for i in ranked if cands[i].uniform][:1]
        return sorted(planned + uniform)

    def _park(self, program: Program) -> None:
        """Park the model's tensors on disk: the fine-tunes read the candidates' layers instead of the
        original ones, and the rest (embedding, norms) comes back from the page cache as it is read.
        All of them, not only the replaced layers' weights: a model that transformers loaded maps its
        checkpoint file, and the mapping (all of it resident once calibration has read it) is released
        only when no tensor points into it any more (SmolLM2: live RSS before the fine-tunes 1,212 MiB
        when only the replaced weights were parked, as without parking)."""
        if self.park_dir is None:
            return
        model = program.model
        tensors = [*model.parameters(), *model.buffers()]
        clock = time.perf_counter()
        self._parked = park_on_disk(tensors, self.park_dir)
        self._seconds["park"] = time.perf_counter() - clock
        trim_heap()

    @staticmethod
    def finetune_choice(cands: list[Candidate], limit: int | None) -> list[int]:
        """Indices of the candidates that get the short fine-tune. ``limit=None``: the best by step-0
        loss of each proposal (λ value) and the best uniform plan. Otherwise the best of each
        proposal first (so one λ's several front points cannot crowd the other λ values out: the
        step-0 loss favours the error-only plans the fine-tune exists to check), then the rest by
        step-0 loss, at most ``limit``; the best uniform plan always among them."""
        def by_step0(i: int) -> tuple[float, int]:
            return cands[i].score(False), i

        order = sorted(range(len(cands)), key=by_step0)
        best_uniform = next((i for i in order if cands[i].uniform), None)
        heads: list[int] = []  # the best of each proposal (with a limit, each uniform plan is its own)
        seen: set[str] = set()
        for i in order:
            family = cands[i].family or cands[i].label
            if family not in seen and not (limit is None and cands[i].uniform):
                seen.add(family)
                heads.append(i)
        if limit is None:
            return sorted(heads + ([] if best_uniform is None else [best_uniform]), key=by_step0)
        ranked = heads + [i for i in order if i not in heads]
        chosen = sorted(ranked[:limit], key=by_step0)
        if best_uniform is not None and best_uniform not in chosen:
            chosen = [*chosen[: limit - 1], best_uniform]
        return chosen

    def _fidelity(self, cands: list[Candidate]) -> str:
        cfg = self.config
        if any(c.loss_screen is not None for c in cands):
            return (f"short fine-tune: {cfg.screen} steps for each candidate, {cfg.score_steps} for the best "
                    f"{cfg.keep} and the best uniform plan")
        return f"short fine-tune: {cfg.score_steps} steps"

    @staticmethod
    def _winner(cands: list[Candidate], finetuned: bool) -> int:
        scores = [c.score(finetuned) for c in cands]
        if not any(math.isfinite(s) for s in scores):
            raise ConfigError("every candidate plan diverged or scored non-finite; check the model and data "
                              "(NaN weights?) or use objective='deploy'")
        win = int(np.argmin(scores))
        best_uniform_score = min((s for s, c in zip(scores, cands, strict=True) if c.uniform), default=math.inf)
        logger.info("selected %s (score %.4f; best uniform %.4f)", cands[win].label, scores[win], best_uniform_score)
        return win

    def _choose(self, program: Program, base: SearchProblem, cands: list[Candidate], win: int,
                built: dict[tuple[str, int, int], QuantLoRALinear], unit: float, finetuned: bool,
                cached: bool = False) -> PassResult:
        cfg = self.config
        graph = program.require_graph()
        winner = cands[win]
        groups = graph.groups()
        for group, choice in zip(base.groups, winner.choices, strict=True):
            for m in groups[group]:
                graph.set_choice(m, *choice)
        keep = {(n, *c) for n, c in winner.layers.items()}
        program.state["built_layers"] = {k: v for k, v in built.items() if k in keep}
        program.state["scored_adapters"] = dict(self._adapters)
        program.state["selection"] = {
            "objective": cfg.objective,
            "fidelity": self._fidelity(cands) if finetuned else "step-0 loss",
            "lambda_unit": unit,
            "winner": winner.label,
            "cached": cached,
            "seconds": {k: round(v, 2) for k, v in self._seconds.items()},
            "parked_bytes": self._parked,
            "candidates": [c.row() for c in cands],
            "config": cfg.to_dict(),
        }
        return PassResult(info={"candidates": len(cands), "winner": winner.label})

"""Capture a model into a torch.fx graph, by the first route that works.

Routes (registry ``CAPTURE_ROUTES``, tried in this order by ``method="auto"``):

1. ``export``: ``torch.export.export(model, args, kwargs, strict=False)``; nodes are mapped to
   quantizable modules through ``node.meta["nn_module_stack"]`` (any node inside a quantizable
   module's stack belongs to it, so HF ``Conv1D``'s ``addmm`` and ``@``-based subclasses work).
2. ``fx``: ``torch.fx.symbolic_trace`` with quantizable modules kept as leaves.
3. ``module_tree``: no graph; ``named_modules()`` order; dependency edges approximate (warned).

The route never raises under ``auto``: a failing route is logged and the next one tried.

**Reuse.** The graph depends on the model's structure, not on its weight values, so the outcome of the
last few captures is kept (`_RECENT`, 4 entries) under a key of that structure: every module's name,
class and training flag, every parameter's and buffer's name, shape, dtype and device, the model's
config, the example inputs' shapes, the discovered layers, the routes and torch's version. Only the
``export`` route's graphs are kept (they hold no weights; an ``fx`` graph module holds the leaf modules). A deep copy of
a model, or the same model captured again by `autoqra.calibrate` and then `autoqra.compile`, reuses the
graph instead of tracing again (~2 s for SmolLM2-135M; the demo captures the same structure six times).
A module with forward hooks, an instance-level ``forward`` or global module hooks is always traced
(they can change the graph); ``CaptureConfig(reuse=False)`` turns reuse off.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from autoqra.errors import CaptureError, ConfigError, UnknownNameError
from autoqra.ir.discover import discover_layers, layer_kind
from autoqra.ir.program import Program

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CaptureConfig:
    """How to capture. ``include`` / ``exclude`` are regex patterns on module names."""

    method: str = "auto"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    seq_len: int = 8  # length of the automatic example input for HF models
    reuse: bool = True  # reuse a recent capture of the same structure (see the module docstring)

    def __post_init__(self) -> None:
        if self.method != "auto" and self.method not in CAPTURE_ROUTES:
            raise UnknownNameError(
                f"unknown capture method {self.method!r}; available: auto, {', '.join(CAPTURE_ROUTES)}"
            )
        if not isinstance(self.reuse, bool):
            raise ConfigError(f"CaptureConfig.reuse must be True or False, got {self.reuse!r}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))


@dataclass
class RouteOutcome:
    graph_module: fx.GraphModule | None
    owner: dict[str, str] = field(default_factory=dict)
    static_nodes: set[str] = field(default_factory=set)


RouteFn = Callable[[nn.Module, tuple, dict, set[str]], RouteOutcome]

#: structure key -> (route, outcome) of recent captures, most recent last
_RECENT: OrderedDict[str, tuple[str, RouteOutcome, list[tuple[str, str]]]] = OrderedDict()
_RECENT_SIZE = 4


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}:{value.dtype}:{value.device}"
    return repr(value)


def structure_key(model: nn.Module, args: tuple, kwargs: dict, names: set[str], route: str) -> str | None:
    """A key of everything a capture's graph depends on but the weight values, or None when the model
    carries something that can change its graph unseen (forward hooks, a patched ``forward``)."""
    from torch.nn.modules import module as module_globals

    if any(getattr(module_globals, attr, None) for attr in ("_global_forward_hooks", "_global_forward_pre_hooks")):
        return None
    h = hashlib.sha1()
    for name, m in model.named_modules(remove_duplicate=False):
        if "forward" in vars(m) or m._forward_hooks or m._forward_pre_hooks:
            return None
        h.update(f"m {name} {type(m).__module__}.{type(m).__qualname__} {m.training}\n".encode())
    for kind, items in (("p", model.named_parameters(remove_duplicate=False)),
                        ("b", model.named_buffers(remove_duplicate=False))):
        for name, t in items:
            h.update(f"{kind} {name} {_describe(t)}\n".encode())
    config = getattr(model, "config", None)
    if config is not None:
        text = config.to_json_string() if hasattr(config, "to_json_string") else repr(config)
        # the attention kernel shapes the graph too, and Hugging Face configs do not serialize it
        text += f" attn={getattr(config, '_attn_implementation', None)}"
        h.update(b"config " + text.encode())
    h.update(json.dumps([[_describe(a) for a in args], {k: _describe(v) for k, v in sorted(kwargs.items())},
                         sorted(names), route, [f"{n}:{id(fn)}" for n, fn in CAPTURE_ROUTES.items()],
                         torch.__version__]).encode())
    return h.hexdigest()
CAPTURE_ROUTES: dict[str, RouteFn] = {}


def register_capture_route(name: str) -> Callable[[RouteFn], RouteFn]:
    """Register a capture route under ``name`` (tried in registration order by ``auto``)."""

    def deco(fn: RouteFn) -> RouteFn:
        CAPTURE_ROUTES[name] = fn
        return fn

    return deco


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def default_example_inputs(model: nn.Module, seq_len: int = 8) -> tuple[tuple, dict] | None:
    """A small ``input_ids`` batch for Hugging Face models; None when the input is unknown."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if config is None or vocab is None:
        return None
    device = _model_device(model)
    ids = (torch.arange(seq_len, dtype=torch.long).reshape(1, seq_len) * 7 + 1) % int(vocab)
    kwargs: dict[str, Any] = {"input_ids": ids.to(device)}
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "use_cache" in params:
        kwargs["use_cache"] = False  # a returned DynamicCache is not a pytree type: export fails
    return (), kwargs


def _static_closure(graph: fx.Graph, static_seed: set[str]) -> set[str]:
    """Nodes computed only from parameters/buffers/constants (never from the user's inputs)."""
    static = set(static_seed)
    for node in graph.nodes:
        if node.op == "get_attr":
            static.add(node.name)
        elif node.op in ("call_function", "call_method"):
            inputs = node.all_input_nodes
            if all(i.name in static for i in inputs):
                static.add(node.name)
    return static


@register_capture_route("export")
def _route_export(model: nn.Module, args: tuple, kwargs: dict, layers: set[str]) -> RouteOutcome:
    if not args and not kwargs:
        raise CaptureError("torch.export needs example inputs; pass example_inputs=(...)")
    with _quiet_torch_logs():
        exported = torch.export.export(model, args, kwargs, strict=False)
    gm = exported.graph_module
    sig = exported.graph_signature
    static_seed = set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers)
    static_seed |= set(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
    owner: dict[str, str] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack or node.op != "call_function":
            continue
        for path, _cls in reversed(list(stack.values())):  # innermost quantizable module wins
            fqn = _normalize_fqn(path)
            if fqn in layers:
                owner[node.name] = fqn
                break
    return RouteOutcome(gm, owner, _static_closure(gm.graph, static_seed))


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Silence torch's own graph dumps while a route that may fail is tried (we log the outcome)."""
    names = ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export", "torch._export")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink):  # torch prints the partial graph when export fails
            yield
    finally:
        if sink.getvalue():
            logger.debug("torch output while capturing:\n%s", sink.getvalue())
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _normalize_fqn(path: str) -> str:
    """``L['self'].model.layers[0].q`` (strict export spelling) → ``model.layers.0.q``."""
    if path.startswith("L['self']"):
        path = path[len("L['self']") :].lstrip(".")
    return path.replace("[", ".").replace("]", "").replace("..", ".")


class _LeafTracer(fx.Tracer):
    """An fx tracer that keeps quantizable modules (and the defaults) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return layer_kind(m) is not None or super().is_leaf_module(m, module_qualified_name)


@register_capture_route("fx")
def _route_fx(model: nn.Module, args: tuple, kwargs: dict, layers: set[str]) -> RouteOutcome:
    tracer = _LeafTracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph)
    owner = {n.name: n.target for n in graph.nodes if n.op == "call_module" and n.target in layers}
    return RouteOutcome(gm, owner, _static_closure(graph, set()))


@register_capture_route("module_tree")
def _route_module_tree(model: nn.Module, args: tuple, kwargs: dict, layers: set[str]) -> RouteOutcome:
    logger.warning(
        "capturing %s from its module tree: no dataflow graph, so dependency edges are approximate "
        "(layers chained in definition order) and fusion groups come from sibling names",
        type(model).__name__,
    )
    return RouteOutcome(None)


def capture(
    model: nn.Module,
    example_inputs: tuple | dict | None = None,
    *,
    config: CaptureConfig | None = None,
) -> Program:
    """Capture ``model`` into a `Program` (the model is not changed).

    Args:
        model: any ``nn.Module``; Hugging Face models get an automatic ``input_ids`` example.
        example_inputs: positional args tuple, or a kwargs dict, for the forward.
        config: `CaptureConfig` (route, include/exclude patterns).
    """
    config = config or CaptureConfig()
    discovery = discover_layers(model, include=config.include, exclude=config.exclude)
    names = set(discovery.names)
    for layer in discovery.layers:
        names.update(layer.tied)
    if example_inputs is None:
        auto = default_example_inputs(model, config.seq_len)
        args, kwargs = auto if auto is not None else ((), {})
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, tuple):
        args, kwargs = example_inputs, {}
    else:
        args, kwargs = (example_inputs,), {}

    routes = list(CAPTURE_ROUTES) if config.method == "auto" else [config.method]
    key = structure_key(model, args, kwargs, names, config.method) if config.reuse else None
    if key is not None and key in _RECENT:
        _RECENT.move_to_end(key)
        route, outcome, attempts = _RECENT[key]
        logger.debug("capture: reusing the %s graph of a model with the same structure", route)
        return _program(model, route, outcome, discovery, [*attempts[:-1], (route, "ok (reused)")])
    attempts: list[tuple[str, str]] = []
    for route in routes:
        try:
            outcome = CAPTURE_ROUTES[route](model, args, kwargs, names)
        except Exception as exc:  # a failing route is expected; the next one is tried
            msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            attempts.append((route, msg))
            if config.method != "auto":
                raise CaptureError(f"capture route {route!r} failed: {msg}; try method='auto'") from exc
            logger.info("capture route %r failed (%s); trying the next one", route, msg)
            continue
        if outcome.graph_module is not None and not outcome.owner:
            msg = "graph captured but no quantizable layer appears in it"
            attempts.append((route, msg))
            if config.method != "auto":
                raise CaptureError(f"capture route {route!r}: {msg}")
            logger.info("capture route %r: %s; trying the next one", route, msg)
            continue
        attempts.append((route, "ok"))
        if key is not None and route == "export":  # its graph holds no weights (fx's keeps the modules)
            _RECENT[key] = (route, outcome, list(attempts))
            while len(_RECENT) > _RECENT_SIZE:
                _RECENT.popitem(last=False)
        return _program(model, route, outcome, discovery, attempts)
    raise CaptureError(f"no capture route worked: {attempts}")  # module_tree never fails


def _program(model: nn.Module, route: str, outcome: RouteOutcome, discovery: Any,
             attempts: list[tuple[str, str]]) -> Program:
    return Program(
        model=model,
        graph_module=outcome.graph_module,  # shared between reuses: the passes only read it
        route=route,
        owner=dict(outcome.owner),
        static_nodes=set(outcome.static_nodes),
        layer_names=discovery.names,
        skipped=discovery.skipped,
        attempts=attempts,
        discovered=discovery,
    )

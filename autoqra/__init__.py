"""autoqra: choose, per layer, the quantization bit-width and the LoRA rank under a memory budget."""

from autoqra.analysis import analyze, min_feasible_bytes, uniform_costs
from autoqra.api import CompileResult, apply_plan, calibrate, compile, pareto
from autoqra.budget import Budget
from autoqra.config import SearchSpace
from autoqra.errors import (
    AutoQRAError,
    BudgetError,
    BudgetInfeasibleError,
    CaptureError,
    NoQuantizableLayersError,
)
from autoqra.export import export_onnx
from autoqra.io import load, save
from autoqra.ir.capture import CaptureConfig, capture
from autoqra.ir.cost import CostModel
from autoqra.ir.graph import LayerGraph
from autoqra.ir.layer import LayerKind, LayerNode
from autoqra.passes.probe import ProbeConfig
from autoqra.passes.select import SelectConfig
from autoqra.peft_interop import save_peft_adapter, to_peft_config
from autoqra.plan import Plan
from autoqra.train import FinetuneResult, finetune

__version__ = "0.1.0"

__all__ = [
    "AutoQRAError",
    "Budget",
    "BudgetError",
    "BudgetInfeasibleError",
    "CaptureConfig",
    "CompileResult",
    "Plan",
    "ProbeConfig",
    "SelectConfig",
    "CaptureError",
    "CostModel",
    "LayerGraph",
    "LayerKind",
    "LayerNode",
    "NoQuantizableLayersError",
    "SearchSpace",
    "analyze",
    "apply_plan",
    "export_onnx",
    "calibrate",
    "capture",
    "compile",
    "pareto",
    "min_feasible_bytes",
    "uniform_costs",
    "FinetuneResult",
    "finetune",
    "to_peft_config",
    "save_peft_adapter",
    "save",
    "load",
]

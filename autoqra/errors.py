"""Typed exceptions. Every message names the fix."""

from __future__ import annotations


class AutoQRAError(Exception):
    """Base class of every error autoqra raises on purpose."""


class BudgetError(AutoQRAError, ValueError):
    """A budget could not be parsed or is not positive."""


class BudgetInfeasibleError(AutoQRAError):
    """No plan fits the budget; ``min_bytes`` is the smallest feasible budget."""

    def __init__(self, message: str, *, min_bytes: int | None = None) -> None:
        super().__init__(message)
        self.min_bytes = min_bytes


class NoQuantizableLayersError(AutoQRAError):
    """The model has no layer autoqra can quantize."""


class CaptureError(AutoQRAError):
    """A capture route failed (only raised when that route was requested explicitly)."""


class PassOrderError(AutoQRAError):
    """A pass reads a field no earlier pass writes."""


class PassFailedError(AutoQRAError):
    """A pass raised; the message names the pass and the passes before it."""


class UnknownNameError(AutoQRAError, KeyError):
    """An unknown registry name; the message lists the available ones."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else ""


class ConfigError(AutoQRAError, ValueError):
    """An invalid configuration value."""


class DataError(AutoQRAError):
    """The embedded default model or text could not be fetched or read."""


class MissingDependencyError(AutoQRAError, ImportError):
    """An optional package is needed; the message names the pip extra that installs it."""


class QuantizationError(AutoQRAError, ValueError):
    """A weight cannot be quantized as asked (NaN/Inf values, bad importance vector, ...)."""


class UnsupportedLayerError(AutoQRAError, ValueError):
    """A backend or module cannot handle this layer / spec; the message says why."""


class MergeError(AutoQRAError, RuntimeError):
    """An adapter merge or unmerge is not possible in the current state."""


class NotCompiledError(AutoQRAError, ValueError):
    """A model without ``QuantLoRALinear`` layers was given where a compiled one is needed."""


class NonFiniteLossError(AutoQRAError, FloatingPointError):
    """Fine-tuning met a NaN/Inf loss or gradient; ``step`` is the step, the adapters were restored
    to the last values that gave a finite loss (``restored_step``: the step they were used at, 0 =
    before training)."""

    def __init__(self, message: str, *, step: int, restored_step: int) -> None:
        super().__init__(message)
        self.step = step
        self.restored_step = restored_step


class PeftExportError(AutoQRAError, ValueError):
    """A peft config / adapter cannot express the compiled model exactly; the message says why."""


class WorldSizeError(ConfigError):
    """Distributed fine-tuning: the number of processes does not divide the global batch
    (``batch_size``), so the ranks cannot take equal shares of it; the message names the fix."""

    def __init__(self, message: str, *, batch_size: int, world_size: int) -> None:
        super().__init__(message)
        self.batch_size = batch_size
        self.world_size = world_size


class CollectiveDeviceError(AutoQRAError, RuntimeError):
    """A tensor handed to a torch.distributed collective on a device its backend cannot reduce (NCCL: CUDA only)."""


class UnsupportedPlatformError(AutoQRAError, RuntimeError):
    """A feature needs something this platform lacks (e.g. glibc's ``mallopt``)."""


class ExportError(AutoQRAError, RuntimeError):
    """A model cannot be exported as asked (unsupported layer format, dtype, merge of a quantized
    layer, missing exporter packages); the message names what to change."""


class ExportVerificationError(ExportError):
    """The exported file runs but disagrees with the PyTorch model beyond the tolerance; the
    message gives the measured error and the tolerance. ``measured``: the numbers (e.g. ``max_rel``,
    ``mean_rel``, ``tolerance``) where the check measured them; ``directory``: where ``export_onnx``
    kept the failed files for inspection (``<path>.failed``, with ``EXPORT_FAILED.json``), else None."""

    def __init__(self, message: str, *, measured: dict[str, float] | None = None,
                 directory: object | None = None) -> None:
        super().__init__(message)
        self.measured = dict(measured or {})
        self.directory = directory


def require_module(value: object, function: str, argument: str = "model", hint: str = "") -> None:
    """Raise `ConfigError` unless ``value`` is a ``torch.nn.Module``: a public entry point's first
    check, so that a path or a name where the model belongs fails with what to pass instead of an
    ``AttributeError`` deep inside."""
    from torch import nn

    if not isinstance(value, nn.Module):
        raise ConfigError(
            f"{function}: {argument} must be a torch.nn.Module, got {type(value).__name__}"
            + (f"; {hint}" if hint else "; pass the model object (e.g. a transformers model), not its name or path")
        )

"""Quantization backends (``packed`` default, optional ``hqq`` / ``bnb``), bit-packing and LoftQ init."""

from autoqra.quant.base import (
    QuantBackend,
    QuantizedWeight,
    QuantSpec,
    Support,
    available_backends,
    get_backend,
    register_backend,
)

__all__ = [
    "QuantBackend",
    "QuantSpec",
    "QuantizedWeight",
    "Support",
    "available_backends",
    "get_backend",
    "register_backend",
]

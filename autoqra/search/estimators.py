"""Sensitivity estimators: error(bits, rank) of every layer, registered by name.

All three share one computation. With E = W − deq(Q_b(W)) the quantization error of a layer at
``bits`` (quantized by the same backend and importance as the rewrite will use), and
M = diag(g)·E·diag(d), the error a rank-r adapter cannot absorb is

    error(b, r) = ‖M − SVD_r(M)‖²_F = Σ_{i>r} σ_i(M)²

computed from the eigenvalues of the smaller Gram matrix of M (float64): one decomposition per
(layer, bits), reused for every rank.

* ``lora_residual`` (data-free): d = 1, g = 1.
* ``activation_weighted``: d = per-input-channel RMS of the calibration inputs (the error on
  the layer's output), g = 1.
* ``fisher_weighted`` (default with calibration data): d as above and g = per-output-channel RMS
  of the loss gradient at the layer's output — the error the loss actually feels.

At 16 bits the weight is kept: error 0 for every rank. d and g are clamped below at 1e-3 × their
mean so that dead channels do not vanish from the objective.
"""

from __future__ import annotations

import logging
from abc import ABC
from collections.abc import Callable
from typing import ClassVar

import torch

from autoqra.cache import JsonCache
from autoqra.errors import ConfigError, UnknownNameError
from autoqra.ir.cost import DENSE_BITS
from autoqra.quant.loftq import input_importance

logger = logging.getLogger(__name__)

CLAMP = 1e-3


def clamp_weights(v: torch.Tensor | None) -> torch.Tensor | None:
    """Clamp a per-channel weighting below at CLAMP × its mean (None stays None)."""
    if v is None:
        return None
    v = v.double()
    return v.clamp_min(CLAMP * float(v.mean()) if float(v.mean()) > 0 else 1e-12)


class Estimator(ABC):
    """Fills error(bits, rank) from a weight and (optionally) calibration statistics."""

    name: ClassVar[str]
    use_d: ClassVar[bool] = False
    use_g: ClassVar[bool] = False

    def weights(self, stats: object | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(d, g) used by this estimator (None = unweighted)."""
        if stats is None:
            return None, None
        d = clamp_weights(stats.d) if self.use_d else None
        g = clamp_weights(stats.g) if self.use_g else None
        return d, g

    def table(
        self,
        weight: torch.Tensor,
        bits: tuple[int, ...],
        ranks: tuple[int, ...],
        quantize: Callable[[torch.Tensor, int, torch.Tensor | None], torch.Tensor],
        d: torch.Tensor | None,
        g: torch.Tensor | None,
        right: torch.Tensor | None = None,
    ) -> dict[tuple[int, int], float]:
        """{(bits, rank): error} for one layer; ``quantize(W, bits, importance) -> deq(Q(W))``.

        ``right`` (a lower Cholesky factor L of the input second moments, H = L Lᵀ) replaces
        diag(d): the norm ‖diag(g)·E·L‖² is then the exact output error tr(diag(g)² E H Eᵀ)."""
        w = weight.detach().float()
        max_rank = min(w.shape)
        out: dict[tuple[int, int], float] = {}
        # the importance exactly as the rewrite computes it (float32 d, clamped): identical roundings
        importance = None if d is None else input_importance(d.float(), w.shape[1])
        for b in bits:
            if b == DENSE_BITS:
                for r in ranks:
                    if r <= max_rank:
                        out[(b, r)] = 0.0
                continue
            err = (w - quantize(w, b, importance)).double()
            if g is not None:
                err = err * g[:, None]
            if right is not None:
                err = err @ right.double()
            elif d is not None:
                err = err * d[None, :]
            gram = err @ err.T if err.shape[0] <= err.shape[1] else err.T @ err
            eig = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)
            total = float(eig.sum())
            csum = torch.cumsum(eig, 0)
            for r in ranks:
                if r <= max_rank:
                    out[(b, r)] = max(0.0, total - (float(csum[r - 1]) if r > 0 else 0.0))
        return out


class LoraResidual(Estimator):
    name = "lora_residual"


class ActivationWeighted(Estimator):
    name = "activation_weighted"
    use_d = True


class FisherWeighted(Estimator):
    name = "fisher_weighted"
    use_d = True
    use_g = True


_ESTIMATORS: dict[str, type[Estimator]] = {}


def register_estimator(cls: type[Estimator]) -> type[Estimator]:
    _ESTIMATORS[cls.name] = cls
    return cls


for _cls in (LoraResidual, ActivationWeighted, FisherWeighted):
    register_estimator(_cls)


def available_estimators() -> list[str]:
    return sorted(_ESTIMATORS)


def get_estimator(name: str) -> Estimator:
    if name not in _ESTIMATORS:
        raise UnknownNameError(f"unknown estimator {name!r}; available: {', '.join(available_estimators())}")
    return _ESTIMATORS[name]()


def default_estimator(has_calibration: bool, has_gradients: bool = True) -> str:
    if not has_calibration:
        return "lora_residual"
    return "fisher_weighted" if has_gradients else "activation_weighted"


class ErrorCache(JsonCache):
    """Error tables on disk, one JSON file per (layer content, settings) key (`JsonCache`)."""

    def get(self, key: str) -> dict[tuple[int, int], float] | None:
        rows = self.get_json(key)
        if rows is None:
            return None
        try:
            return {(int(b), int(r)): float(v) for b, r, v in rows}
        except (ValueError, TypeError) as exc:
            logger.warning("ignoring a corrupt error-cache entry %s (%s)", key, exc)
            return None

    def put(self, key: str, table: dict[tuple[int, int], float]) -> None:
        self.put_json(key, [[b, r, v] for (b, r), v in sorted(table.items())])


def check_estimator_inputs(name: str, has_stats: bool, has_gradients: bool) -> None:
    est = get_estimator(name)
    if est.use_d and not has_stats:
        raise ConfigError(f"estimator {name!r} needs calibration data; pass calib=... or use estimator='lora_residual'")
    if est.use_g and not has_gradients:
        raise ConfigError(
            f"estimator {name!r} needs gradient statistics (calibration with gradients=True); "
            "use estimator='activation_weighted'"
        )

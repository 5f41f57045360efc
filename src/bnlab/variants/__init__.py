"""BN variants: Batch Renorm, Ghost BN and frozen BN, all on bnlab's ``_NormBase``."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..norms import register_norm
from .frozen import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FrozenBatchNormAct2d,
    freeze,
    unfreeze,
)
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenBatchNormAct2d",
    "freeze",
    "unfreeze",
]

_RENORM = {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}
_GHOST = {1: GhostBatchNorm1d, 2: GhostBatchNorm2d, 3: GhostBatchNorm3d}


@register_norm("renorm")
def _renorm(num_features: int, dim: int, **kw: Any) -> nn.Module:
    return _RENORM[dim](num_features, **kw)


@register_norm("ghost")
def _ghost(num_features: int, dim: int, **kw: Any) -> nn.Module:
    return _GHOST[dim](num_features, **kw)

"""BN variants: Batch Renorm, Ghost BN, masked BN and frozen BN, all on bnlab's ``_NormBase``,
and PowerNorm (a plain module: no mean, no variance)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..norms import register_norm
from . import frozen, ghost, masked, powernorm, renorm
from .frozen import *  # noqa: F403  (the names in frozen.__all__)
from .ghost import *  # noqa: F403
from .masked import *  # noqa: F403
from .powernorm import *  # noqa: F403
from .renorm import *  # noqa: F403

# each module's public names, listed once, in that module
__all__ = [*renorm.__all__, *ghost.__all__, *masked.__all__, *frozen.__all__,
           *powernorm.__all__]

_RENORM = {1: renorm.BatchRenorm1d, 2: renorm.BatchRenorm2d, 3: renorm.BatchRenorm3d}
_GHOST = {1: ghost.GhostBatchNorm1d, 2: ghost.GhostBatchNorm2d, 3: ghost.GhostBatchNorm3d}


@register_norm("renorm")
def _renorm(num_features: int, dim: int, **kw: Any) -> nn.Module:
    return _RENORM[dim](num_features, **kw)


@register_norm("ghost")
def _ghost(num_features: int, dim: int, **kw: Any) -> nn.Module:
    return _GHOST[dim](num_features, **kw)

"""Tools for models with BN layers: fold, recalibrate, adapt, lint and monitor.

Each tool works on torch's and bnlab's BN layers, is a tensor-level function plus a
module-level wrapper, and never modifies its input unless its name or docstring says so.
"""

from __future__ import annotations

from ._graph import BN_TYPES, bn_layers, is_bn
from .adapt import Tent, adapt, entropy
from .fold import (
    FoldReport,
    fold,
    fold_bn_next_weights,
    fold_conv_bn,
    fold_conv_bn_weights,
    load_folded,
)
from .lint import Finding, lint, lint_source
from .monitor import Monitor
from .recalibrate import recalibrate

__all__ = [
    "BN_TYPES",
    "Finding",
    "FoldReport",
    "Monitor",
    "Tent",
    "adapt",
    "entropy",
    "bn_layers",
    "fold",
    "fold_bn_next_weights",
    "fold_conv_bn",
    "fold_conv_bn_weights",
    "is_bn",
    "lint",
    "lint_source",
    "load_folded",
    "recalibrate",
]

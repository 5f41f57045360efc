"""bnlab: Batch Normalization for PyTorch that is correct, fast, inspectable and honest.

Drop-in layers (``bnlab.BatchNorm1d/2d/3d``) with the tutorial's statistics modes, a functional
core (:mod:`bnlab.functional`), conversions from Keras' conventions (:mod:`bnlab.keras`) and
between torch and bnlab layers (:func:`bnlab.convert`).
"""

from __future__ import annotations

from . import functional, keras, kernels, tools, variants
from ._base import NonFiniteStatisticsError, NormBase
from ._state import allow_bad_running_stats
from .accumulate import accumulation
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .convert import convert
from .fused import BatchNormAct2d
from .norms import make_norm, norm_names, register_norm
from .sync import SyncBatchNorm
from .variants import *  # noqa: F403  (Batch Renorm, Ghost BN, frozen BN: variants.__all__)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct2d",
    "NonFiniteStatisticsError",
    "NormBase",
    "accumulation",
    "allow_bad_running_stats",
    "convert",
    "functional",
    "kernels",
    "tools",
    "keras",
    "make_norm",
    "norm_names",
    "register_norm",
    "__version__",
    "SyncBatchNorm",
    *variants.__all__,
]

"""Batch Normalization fused with its activation, and its in-place form.

Eager ``BatchNorm2d`` followed by ``relu`` keeps two full-size tensors alive for backward: the
BN input (for BN's gradient) and the activation's output (for the ReLU mask).
:class:`BatchNormAct2d` keeps only the BN input and two ``(C,)`` statistics and recomputes the
normalised values and the mask during backward, on bnlab's native kernels when they support
the input (see :mod:`bnlab.kernels`) and on PyTorch otherwise. With ``inplace=True`` and an
invertible activation it keeps only its *output* (which the next convolution saves anyway)
and writes it over its input: in-place activated BN (:mod:`bnlab.kernels.inplace`).
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

from torch import nn

from ._base import _NormBase

Activation = Literal["relu", "leaky_relu", "elu", "identity"]

__all__ = ["BatchNormAct2d", "Activation"]


class BatchNormAct2d(_NormBase, nn.BatchNorm2d):
    r"""Batch Normalization over a 4D input ``(N, C, H, W)`` followed by an activation.

    Paper: Ioffe & Szegedy, *Batch Normalization*, ICML 2015; the memory savings follow
    In-Place ABN (Rota Bulo et al., *In-Place Activated BatchNorm*, CVPR 2018).

    .. math::

        y = \mathrm{act}\Big(\frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} \gamma + \beta\Big)

    :math:`\mu_B`, :math:`\sigma_B^2` are the per-channel mean and **biased** variance of the
    batch (shape ``(C,)``), :math:`\gamma`/:math:`\beta` the ``(C,)`` ``weight``/``bias``;
    ``act`` is ``relu``, ``leaky_relu`` (slope ``negative_slope`` for negative inputs),
    ``elu`` (``alpha (exp(v) - 1)`` for negative ``v``) or ``identity``. The running
    statistics are updated exactly as in :class:`bnlab.BatchNorm2d` (the unbiased variance
    enters the running estimate), and evaluation normalises with them.

    Memory for backward, ``inplace=False`` (default): only ``x`` and ``(C,)`` values are
    saved (plus ``weight``/``bias``); the output is recomputed from them. ``inplace=True``
    (``leaky_relu`` with ``negative_slope > 0``, ``elu`` or ``identity``): only the output is
    saved, the tensor the next layer (a convolution) saves anyway, and it is written over
    ``x`` where autograd allows, as ``ReLU(inplace=True)`` does: ``x``'s values are gone after
    the call. Backward recovers ``xhat = (act^-1(y) - bias) / weight``. A call in which some
    ``|weight|`` is below ``bnlab.kernels.inplace.MIN_WEIGHT`` (1e-3) saves ``x`` instead,
    so gradients are exact for every weight; double backward is refused; inside
    ``torch.compile``/``torch.export`` graphs and ``torch.func`` transforms the layer runs as
    ``inplace=False``. Measured savings: ``bench/bench_fused_memory.py`` and the README.
    Gradients equal those of ``act(bnlab.BatchNorm2d(x))`` either way. ``elu`` runs on
    tensor ops (no native kernel).

    Args:
        num_features: ``C``. eps, momentum, affine, track_running_stats: as in
            :class:`torch.nn.BatchNorm2d`.
        act: ``"relu"`` (default), ``"leaky_relu"``, ``"elu"`` or ``"identity"``
            (keyword-only).
        negative_slope: slope of ``leaky_relu`` for negative inputs. Default: ``0.01``.
        alpha: ``elu``'s alpha. Default: ``1.0``.
        inplace: keep only the output for backward and write it over the input (above).
            Default: ``False``. ``act="relu"`` cannot be inverted and is refused.
        running, window_size, normalize_with, nonfinite, process_group, device, dtype: as in
            :class:`bnlab.BatchNorm2d` (``normalize_with="running"`` without ``inplace``).

    Shape:
        - Input: ``(N, C, H, W)``, contiguous or channels-last (others work, on PyTorch).
        - Output: same shape, dtype and memory format.

    Example::

        >>> import torch, bnlab
        >>> layer = bnlab.BatchNormAct2d(16, act="relu")
        >>> y = layer(torch.randn(8, 16, 5, 5))
        >>> bool((y >= 0).all())
        True
    """

    def __init__(
        self,
        *args: Any,
        act: Activation = "relu",
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        inplace: bool = False,
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        if act not in get_args(Activation):
            raise ValueError(
                f"{name}: act must be one of {sorted(get_args(Activation))}, got {act!r}"
            )
        for arg, value in (("negative_slope", negative_slope), ("alpha", alpha)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}: {arg} must be a float, got {type(value).__name__}")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"{name}: alpha must be a positive finite float, got {alpha!r}")
        if not isinstance(inplace, bool):
            raise TypeError(f"{name}: inplace must be a bool, got {type(inplace).__name__}")
        if inplace and act == "relu":
            raise ValueError(
                f"{name}: inplace=True needs an invertible activation, got act='relu': ReLU "
                "maps every negative input to 0, so its input cannot be recovered from its "
                "output; use act='leaky_relu' (e.g. negative_slope=0.01) or inplace=False"
            )
        if inplace and act == "leaky_relu" and not (
            math.isfinite(negative_slope) and negative_slope > 0
        ):
            raise ValueError(
                f"{name}: inplace=True with act='leaky_relu' needs negative_slope > 0 to invert "
                f"the activation, got negative_slope={negative_slope!r}"
            )
        if not math.isfinite(negative_slope):
            raise ValueError(
                f"{name}: negative_slope must be a finite float, got {negative_slope!r}"
            )
        if inplace and kwargs.get("normalize_with", "batch") != "batch":
            raise ValueError(
                f"{name}: inplace=True normalises with the batch's statistics, got "
                f"normalize_with={kwargs['normalize_with']!r}; use inplace=False"
            )
        super().__init__(*args, **kwargs)
        self.act = act
        self.negative_slope = float(negative_slope)
        self.alpha = float(alpha)
        self.inplace = inplace

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", act={self.act!r}"
        if self.act == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        if self.act == "elu":
            s += f", alpha={self.alpha}"
        if self.inplace:
            s += ", inplace=True"
        return s

    def _activation(self) -> tuple[str, float]:
        return (self.act, self.alpha if self.act == "elu" else self.negative_slope)

    def _saves_output(self) -> bool:
        return self.inplace

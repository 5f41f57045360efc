"""Batch Normalization fused with its activation, saving half the memory for backward.

Eager ``BatchNorm2d`` followed by ``relu`` keeps two full-size tensors alive for backward: the
BN input (for BN's gradient) and the activation's output (for the ReLU mask).
:class:`BatchNormAct2d` keeps only the BN input and two ``(C,)`` statistics and recomputes the
normalised values and the mask during backward, on bnlab's native kernels when they support
the input (see :mod:`bnlab.kernels`) and on PyTorch otherwise.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from torch import nn

from ._base import _NormBase

Activation = Literal["relu", "leaky_relu", "identity"]

__all__ = ["BatchNormAct2d", "Activation"]


class BatchNormAct2d(_NormBase, nn.BatchNorm2d):
    r"""Batch Normalization over a 4D input ``(N, C, H, W)`` followed by an activation.

    Paper: Ioffe & Szegedy, *Batch Normalization*, ICML 2015; the memory saving follows the
    idea of In-Place ABN (Rota Bulo et al., 2018) without needing an invertible activation.

    .. math::

        y = \mathrm{act}\Big(\frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} \gamma + \beta\Big)

    :math:`\mu_B`, :math:`\sigma_B^2` are the per-channel mean and **biased** variance of the
    batch (shape ``(C,)``), :math:`\gamma`/:math:`\beta` the ``(C,)`` ``weight``/``bias``;
    ``act`` is ``relu``, ``leaky_relu`` (slope ``negative_slope`` for negative inputs) or
    ``identity``. The running statistics are updated exactly as in :class:`bnlab.BatchNorm2d`
    (the unbiased variance enters the running estimate), and evaluation normalises with them.

    For backward only ``x`` and the per-channel mean and inverse standard deviation are saved
    (plus ``weight``/``bias``); the output is recomputed from them. Gradients equal those of
    ``act(bnlab.BatchNorm2d(x))``.

    Args:
        num_features: ``C``. eps, momentum, affine, track_running_stats: as in
            :class:`torch.nn.BatchNorm2d`.
        act: ``"relu"`` (default), ``"leaky_relu"`` or ``"identity"`` (keyword-only).
        negative_slope: slope of ``leaky_relu`` for negative inputs. Default: ``0.01``.
        running, window_size, normalize_with, nonfinite, device, dtype: as in
            :class:`bnlab.BatchNorm2d`.

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

    _input_dims = (4,)
    _input_layout = "(N, C, H, W)"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        act: Activation = "relu",
        negative_slope: float = 0.01,
        **kwargs: Any,
    ) -> None:
        if act not in get_args(Activation):
            raise ValueError(
                f"BatchNormAct2d: act must be one of {sorted(get_args(Activation))}, got {act!r}"
            )
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
            raise TypeError(
                "BatchNormAct2d: negative_slope must be a float, "
                f"got {type(negative_slope).__name__}"
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **kwargs)
        self.act = act
        self.negative_slope = float(negative_slope)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", act={self.act!r}"
        if self.act == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        return s

    def _activation(self) -> tuple[str, float]:
        return (self.act, self.negative_slope)

"""Drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d`` with the tutorial's statistics modes."""

from __future__ import annotations

from torch import nn

from ._base import _NormBase
from ._docs import fill_docs

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

# One text for the three classes, so the 1d/2d/3d docstrings cannot drift apart.
_DOC = r"""Batch Normalization over a {rank} input {layout}.

Paper: Ioffe & Szegedy, *Batch Normalization: Accelerating Deep Network Training by Reducing
Internal Covariate Shift*, ICML 2015.

.. math::

    y = \frac{{x - \mu_B}}{{\sqrt{{\sigma_B^2 + \epsilon}}}} \gamma + \beta

:math:`\mu_B` and :math:`\sigma_B^2` are the per-channel mean and **biased** variance over
every dimension but the channel dimension ``C`` of the batch (shape ``(C,)``); :math:`\gamma`
(``weight``) and :math:`\beta` (``bias``) are learnable ``(C,)`` parameters. The running
estimate stores the **unbiased** variance :math:`\sigma_B^2 \, n / (n - 1)`, ``n`` being the
number of values per channel, and normalises in evaluation.

Running statistics (``running=``):

* ``"ema"`` (default): ``running = (1 - momentum) * running + momentum * batch``, PyTorch's
  convention; ``momentum=None`` is a cumulative average (factor ``1/num_batches_tracked``).
* ``"cumulative"``: the plain average of every batch statistic seen; ``momentum`` is ignored.
* ``"window"``: the tutorial's sliding window: ``running_mean`` is the mean of the last
  ``window_size`` batch means and ``running_var`` the mean of their unbiased variances (over
  the batches seen so far while fewer than ``window_size``). The ring buffers ``window_mean``
  and ``window_var`` (shape ``(window_size, C)``) are in the state dict.

A training batch whose statistics contain NaN/Inf never enters the running statistics:
by default the update is skipped with one warning per layer (``nonfinite="skip"``);
``nonfinite="raise"`` raises :class:`bnlab.NonFiniteStatisticsError`. The output for that batch
is still returned.

Loading a state dict: running statistics with NaN/Inf or a negative variance are refused with
a ``ValueError`` naming the layer and the key, the layer left as it was; load them anyway
inside ``with bnlab.allow_bad_running_stats():`` (to inspect a broken checkpoint). A
``running="window"`` layer given a state dict without ``window_mean``/``window_var`` (torch's
BN) refuses it in strict mode; with ``strict=False`` every window slot starts as the loaded
``running_mean``/``running_var`` (the keys are still listed in ``missing_keys``).

Args:
    num_features: ``C``, the number of channels.
    eps: added to the variance for numerical stability. Default: ``1e-5``.
    momentum: weight of the new batch in the moving average, or ``None`` for a cumulative
        average. Default: ``0.1`` (Keras' ``0.99`` is ``0.01`` here, see
        :func:`bnlab.keras.momentum_from_keras`).
    affine: learn ``weight`` and ``bias``. Default: ``True``.
    track_running_stats: keep running statistics and use them in evaluation; if ``False``
        batch statistics are used in both modes. Default: ``True``.
    bias: with ``affine=True``, also learn ``bias`` (torch 2.13's keyword). Default: ``True``.
    running: ``"ema"``, ``"cumulative"`` or ``"window"`` (keyword-only). Default: ``"ema"``.
    window_size: ``k`` for ``running="window"`` (keyword-only).
    normalize_with: ``"batch"`` (default) or ``"running"``, the tutorial's literal step 5
        (keyword-only).
    nonfinite: ``"skip"`` (default) or ``"raise"`` for a batch with NaN/Inf (keyword-only).
    device, dtype: factory arguments for the parameters and buffers.

Shape:
    - Input: {layout}
    - Output: same shape and dtype as the input. Half and bfloat16 inputs are computed with
      float32 statistics.

Example::

    >>> import torch, bnlab
    >>> bn = bnlab.{name}(3, running="window", window_size=4)
    >>> y = bn(torch.randn({example_shape}))
    >>> y.shape
    torch.Size([{example_shape}])

.. warning::
    ``normalize_with="running"`` normalises each training batch with the statistics
    accumulated *before* it (from the first batch on; the very first batch uses its own
    statistics). No gradient flows through those statistics, so the layer acts as a fixed
    per-channel affine map within a step: the gradient loses the centring and scaling
    projection that makes BN's training stable, activations can drift from zero mean and unit
    variance between updates, and training is usually slower or less stable than with the
    default ``"batch"``. It exists to measure the tutorial's description, not as a recommendation.
"""


class BatchNorm1d(_NormBase, nn.BatchNorm1d):
    pass


class BatchNorm2d(_NormBase, nn.BatchNorm2d):
    pass


class BatchNorm3d(_NormBase, nn.BatchNorm3d):
    pass


fill_docs(_DOC, BatchNorm1d, BatchNorm2d, BatchNorm3d)

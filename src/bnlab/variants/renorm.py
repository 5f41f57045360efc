"""Batch Renormalization (Ioffe 2017): BN whose training output is corrected towards the
running statistics by the clipped factors ``r`` and ``d``."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from .. import functional as F
from .. import functional_variants as FV
from .._base import _NormBase
from .._docs import fill_docs
from ..kernels.library import snapshot

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]

_DOC = r"""Batch Renormalization over a {rank} input {layout}.

Paper: Ioffe, *Batch Renormalization: Towards Reducing Minibatch Dependence in
Batch-Normalized Models*, NeurIPS 2017.

.. math::

    \hat x = \frac{{x - \mu_B}}{{\sigma_B}} r + d, \qquad
    r = \mathrm{{clip}}_{{[1/r_{{\max}}, r_{{\max}}]}}
        \left(\frac{{\sigma_B}}{{\sigma}}\right), \qquad
    d = \mathrm{{clip}}_{{[-d_{{\max}}, d_{{\max}}]}}
        \left(\frac{{\mu_B - \mu}}{{\sigma}}\right),
    \qquad y = \gamma \hat x + \beta

:math:`\mu_B` is the per-channel batch mean and :math:`\sigma_B = \sqrt{{\mathrm{{Var}}_B +
\epsilon}}` with the **biased** batch variance (shape ``(C,)``). :math:`\mu` is
``running_mean`` and :math:`\sigma = \sqrt{{\mathrm{{running\_var}} + \epsilon}}`, where
``running_var`` is the usual **unbiased** running estimate (the paper keeps a moving average
of :math:`\sigma` itself; bnlab keeps torch's buffers so checkpoints stay interchangeable).
``r`` and ``d`` are constants for back-propagation (no gradient), computed from the running
statistics *before* this batch updates them. The running statistics are updated exactly as in
:class:`bnlab.BatchNorm2d`; evaluation normalises with them.

Relaxation schedule, with ``t = num_batches_tracked`` before the batch (0-based index):
``r_max(t) = 1 + (r_max - 1) * clip((t - warmup_steps) / s_r, 0, 1)`` and
``d_max(t) = d_max * clip((t - warmup_steps) / s_d, 0, 1)`` with ``(s_r, s_d) =
relax_steps``. The first ``warmup_steps + 1`` batches are therefore exactly BN (``r = 1``,
``d = 0``). Defaults follow the paper: plain BN for 5k steps, ``r_max = 3`` reached at 40k and
``d_max = 5`` at 25k steps. The current limits are :meth:`current_limits`.

Args:
{common_args}
    track_running_stats: must be ``True``: ``r`` and ``d`` need running statistics.
    r_max: final upper clip of ``r`` (>= 1, keyword-only). Default: ``3.0``.
    d_max: final clip of ``|d|`` (>= 0, keyword-only). Default: ``5.0``.
    warmup_steps: batches of plain BN before relaxing (keyword-only). Default: ``5000``.
    relax_steps: ``(s_r, s_d)`` or one int for both: batches over which the limits grow
        linearly after the warm-up (keyword-only). Default: ``(35000, 20000)``.
{factory_args}

{shape}

Example::
{example_imports}
    >>> bn = bnlab.{name}(3, warmup_steps=0, relax_steps=0)
    >>> y = bn(torch.randn({example_shape}))
    >>> bn.current_limits()
    (3.0, 5.0)
"""


def _real(v: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _BatchRenorm(_NormBase):
    #: bnlab.SyncBatchNorm.convert_sync_batchnorm refuses this layer (its statistics are local).
    _sync_policy = "refuse"
    _needs_running_stats = "Batch Renorm corrects towards running statistics"

    def __init__(
        self,
        *args: Any,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        relax_steps: int | tuple[int, int] = (35_000, 20_000),
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        if not (_real(r_max) and r_max >= 1):
            raise ValueError(f"{name}: r_max must be a finite float >= 1, got {r_max!r}")
        if not (_real(d_max) and d_max >= 0):
            raise ValueError(f"{name}: d_max must be a finite float >= 0, got {d_max!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"{name}: warmup_steps must be an int >= 0, got {warmup_steps!r}")
        pair = (relax_steps, relax_steps) if isinstance(relax_steps, int) else relax_steps
        if not (
            isinstance(pair, tuple)
            and len(pair) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in pair)
        ):
            raise ValueError(
                f"{name}: relax_steps must be an int >= 0 or a pair (r_steps, d_steps) of them, "
                f"got {relax_steps!r}"
            )
        super().__init__(*args, **kwargs)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = warmup_steps
        self.relax_steps = tuple(pair)

    def current_limits(self) -> tuple[float, float]:
        """``(r_max, d_max)`` the next training batch is clipped with."""
        return FV.renorm_limits(
            int(self.num_batches_tracked), self.r_max, self.d_max, self.warmup_steps,
            self.relax_steps,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}, relax_steps={self.relax_steps}"
        )

    def _batch_forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        # limits from the step counter as tensors: one graph serves every step
        r_max, d_max = FV.renorm_limits(
            snapshot(self.num_batches_tracked), self.r_max, self.d_max, self.warmup_steps,
            self.relax_steps,
        )
        # Snapshots of the buffers the step is about to update (see library.snapshot)
        y, mean, var, _, _ = FV.batch_renorm_train(
            x, snapshot(self.running_mean), snapshot(self.running_var), self.weight,
            self.bias, self.eps, r_max, d_max,
        )
        return y, mean, var, F.count_per_channel(x)


class BatchRenorm1d(_BatchRenorm, nn.BatchNorm1d):
    pass


class BatchRenorm2d(_BatchRenorm, nn.BatchNorm2d):
    pass


class BatchRenorm3d(_BatchRenorm, nn.BatchNorm3d):
    pass


fill_docs(_DOC, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d)

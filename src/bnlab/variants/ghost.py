"""Ghost Batch Normalization (Hoffer et al. 2017): BN over virtual batches of a large batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as F
from .. import functional_variants as FV
from .._base import _NormBase
from .._checks import check_bool
from .._docs import fill_docs

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]

_DOC = r"""Ghost Batch Normalization over a {rank} input {layout}.

Paper: Hoffer, Hubara & Soudry, *Train longer, generalize better: closing the generalization
gap in large batch training of neural networks*, NeurIPS 2017.

The batch is cut along dim 0 into virtual batches :math:`B_1, \dots, B_k` of
``virtual_batch_size`` samples and each is normalised with its own statistics:

.. math::

    y_i = \frac{{x_i - \mu_{{B_j}}}}{{\sqrt{{\sigma^2_{{B_j}} + \epsilon}}}} \gamma + \beta
    \quad \text{{for}}\ x_i \in B_j

(:math:`\sigma^2_{{B_j}}` the **biased** variance of virtual batch ``j``, all ``(C,)``).
A batch that is not a multiple of ``virtual_batch_size`` ends with a smaller virtual batch of
the remaining samples; a remainder with a single value per channel is merged into the
previous virtual batch; a batch smaller than ``virtual_batch_size`` is one virtual batch.
``strict=True`` raises ``ValueError`` instead for any batch that is not a multiple.

Running statistics: **one** update per training batch, with the count-weighted mean of the
virtual batches' means (the whole batch's mean) and the count-weighted mean of their
**unbiased** variances (so the running variance estimates the population variance, not the
smaller within-virtual-batch spread), applied with ``momentum`` as in BN. Evaluation
normalises with the running statistics, so a model's eval output does not depend on how its
input batch is cut. With ``track_running_stats=False`` evaluation uses virtual batches too.

Args:
{common_args}
    track_running_stats: keep running statistics for evaluation. Default: ``True``.
    virtual_batch_size: samples per virtual batch (keyword-only). Default: ``32``.
    strict: raise ``ValueError`` for a batch that is not a multiple of
        ``virtual_batch_size`` (keyword-only). Default: ``False``.
{factory_args}

{shape}

Example::
{example_imports}
    >>> bn = bnlab.{name}(3, virtual_batch_size=4)
    >>> bn(torch.randn({example_shape})).shape
    torch.Size([{example_shape}])
"""


class _GhostBatchNorm(_NormBase):
    #: virtual batches are per process by definition: the sync converter leaves them local.
    _sync_policy = "local"

    def __init__(
        self, *args: Any, virtual_batch_size: int = 32, strict: bool = False, **kwargs: Any
    ) -> None:
        vbs = virtual_batch_size
        if isinstance(vbs, bool) or not isinstance(vbs, int) or vbs < 2:
            raise ValueError(
                f"{type(self).__name__}: virtual_batch_size must be an int >= 2, got {vbs!r}"
            )
        check_bool(type(self).__name__, "strict", strict)
        super().__init__(*args, **kwargs)
        self.virtual_batch_size = vbs
        self.strict = strict

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}, "
            f"strict={self.strict}"
        )

    def _batch_forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        per_sample = F.count_per_channel(x[:1])
        sizes = FV.ghost_split_sizes(
            x.shape[0], self.virtual_batch_size, per_sample, strict=self.strict,
            owner=type(self).__name__,
        )
        y, means, vars_, counts = FV.ghost_batch_norm_train(
            x, sizes, self.weight, self.bias, self.eps
        )
        with torch.no_grad():
            mean, uvar = FV.pool_virtual_stats(means.detach(), vars_.detach(), counts)
            total = sum(counts)
            # The base update applies Bessel's correction over `total` values; hand it the
            # biased equivalent so the stored estimate is exactly the pooled unbiased variance.
            var = uvar * ((total - 1) / total)
        return y, mean, var, total


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    pass


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    pass


class GhostBatchNorm3d(_GhostBatchNorm, nn.BatchNorm3d):
    pass


fill_docs(_DOC, GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d)

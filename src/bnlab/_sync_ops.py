"""Batch statistics over the ranks of a ``torch.distributed`` group: the one place every bnlab
layer synchronises through (``process_group`` on any layer, :class:`bnlab.SyncBatchNorm`).

The arithmetic is the kernels' (:func:`bnlab.kernels.backends.train_synced`): global moments
merged in float64 (:func:`global_batch_stats`), the normalisation on the native operators or
torch's kernels, and a backward that all-reduces ``(sum dy, sum dy xhat)`` once per layer.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor

from .kernels import backends as _backends
from .kernels.autograd import global_moments

__all__ = ["group_size", "global_batch_stats", "sync_batch_norm", "sync_batch_norm_act_inplace"]


def group_size(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def global_batch_stats(x: Tensor, group: Any = None) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean, **biased** variance and count over ``x`` on every rank of ``group``.

    Each rank all-gathers ``(count, mean, count * biased_var)`` in float64 and merges them with
    Chan et al.'s pairwise formula (``M2 = sum(M2_i + n_i (mean_i - mean)^2)``), which is exact
    for unequal (and zero) counts and does not cancel catastrophically like sums of squares.
    Every rank gets identical results. Raises ``ValueError`` on every rank alike if the global
    count is at most 1.
    """
    return global_moments(x, group)


def sync_batch_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group: Any = None
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Training-mode BN with statistics over every rank of ``group``.

    Returns ``(y, mean, biased_var, count)`` where the statistics and ``count`` are global.
    Outputs and the input gradient equal single-process BN on the concatenation of every
    rank's batch; parameter gradients are this rank's contribution (their sum over ranks is
    the single-process gradient). Must be called on every rank, also with an empty batch.
    """
    return _backends.train_synced(x, weight, bias, eps, "identity", 0.0, group)


def sync_batch_norm_act_inplace(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: str, slope: float,
    group: Any = None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """``act(BN(x))`` with statistics over every rank of ``group``, keeping only the output for
    backward (in-place activated BN). Returns ``(y, mean, biased_var, count)`` as
    :func:`sync_batch_norm`; a ``|weight|`` too small to divide by saves the input instead."""
    return _backends.train_synced(x, weight, bias, eps, act, slope, group, inplace=True)

"""Batch statistics over the ranks of a ``torch.distributed`` group: the one place every bnlab
layer synchronises through (``process_group`` on any layer, :class:`bnlab.SyncBatchNorm`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional as F
from .functional import _per_channel as _pc
from .kernels import _ops
from .kernels import inplace as _inplace

__all__ = ["group_size", "global_batch_stats", "sync_batch_norm", "sync_batch_norm_act_inplace"]


def group_size(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


@torch.no_grad()
def global_batch_stats(x: Tensor, group: Any = None) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean, **biased** variance and count over ``x`` on every rank of ``group``.

    Each rank all-gathers ``(count, mean, count * biased_var)`` in float64 and merges them with
    Chan et al.'s pairwise formula (``M2 = sum(M2_i + n_i (mean_i - mean)^2)``), which is exact
    for unequal (and zero) counts and does not cancel catastrophically like sums of squares.
    Every rank gets identical results. Raises ``ValueError`` on every rank alike if the global
    count is at most 1.
    """
    c = x.shape[1]
    dev = x.device
    if F.count_per_channel(x) > 0:
        # Local moments in the compute dtype (var_mean is numerically stable); merge in float64.
        n, mean, m2 = F.moments(x, F.compute_dtype(x.dtype))
    else:
        n, mean = 0, torch.zeros(c, dtype=torch.float64, device=dev)
        m2 = mean
    local = torch.cat([torch.tensor([float(n)], dtype=torch.float64, device=dev), mean, m2])
    parts = [torch.empty_like(local) for _ in range(group_size(group))]
    dist.all_gather(parts, local, group=group)
    g = torch.stack(parts)
    counts, means, m2 = g[:, :1], g[:, 1 : c + 1], g[:, c + 1 :]
    total = int(counts.sum().item())
    if total <= 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got "
            f"{total} over all ranks (local input size {tuple(x.shape)})"
        )
    gmean, gm2 = F.merge_moments(counts, means, m2)
    cdt = F.compute_dtype(x.dtype)
    return gmean.to(cdt), (gm2 / total).clamp_min(0).to(cdt), total


class _SyncBNFunction(torch.autograd.Function):
    """Normalise with global statistics; backward all-reduces ``sum(dy)`` and ``sum(dy*xhat)``."""

    @staticmethod
    def forward(x, weight, bias, mean, var, count, eps, group):  # type: ignore[override]
        return F.normalize(x, mean, var, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, mean, var, count, eps, group = inputs
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps))
        ctx.count, ctx.group = count, group

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        cdt = mean.dtype
        dims = F.reduce_dims(x)
        xhat = (x.to(cdt) - _pc(mean, x)) * _pc(invstd, x)
        dyc = dy.to(cdt)
        sum_dy = dyc.sum(dims)
        sum_dy_xhat = (dyc * xhat).sum(dims)
        dx = None
        if ctx.needs_input_grad[0]:
            # Input gradient of BN needs the whole batch's sums: one all_reduce per layer.
            packed = torch.cat([sum_dy, sum_dy_xhat]).to(torch.float64)
            dist.all_reduce(packed, group=ctx.group)
            g_dy, g_dyx = (packed / ctx.count).to(cdt).chunk(2)
            scale = invstd if weight is None else invstd * weight.to(cdt)
            dx = (_pc(scale, x) * (dyc - _pc(g_dy, x) - xhat * _pc(g_dyx, x))).to(x.dtype)
        # Parameter gradients are this rank's share; DDP (or the caller) sums/averages them.
        has_w = weight is not None
        gw = sum_dy_xhat.to(weight.dtype) if has_w and ctx.needs_input_grad[1] else None
        gb = sum_dy.to(weight.dtype) if has_w and ctx.needs_input_grad[2] else None
        return dx, gw, gb, None, None, None, None, None


def sync_batch_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group: Any = None
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Training-mode BN with statistics over every rank of ``group``.

    Returns ``(y, mean, biased_var, count)`` where the statistics and ``count`` are global.
    Outputs and the input gradient equal single-process BN on the concatenation of every
    rank's batch; parameter gradients are this rank's contribution (their sum over ranks is
    the single-process gradient). Must be called on every rank, also with an empty batch.
    """
    mean, var, count = global_batch_stats(x, group)
    y = _SyncBNFunction.apply(x, weight, bias, mean, var, count, float(eps), group)
    return y, mean, var, count




class _SyncInPlaceFn(torch.autograd.Function):
    """In-place activated BN with global statistics: saves only the output (see
    :mod:`bnlab.kernels.inplace`); backward all-reduces ``sum(dz)`` and ``sum(dz xhat)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, count, eps, act, slope, group, overwrite):
        invstd = torch.rsqrt(var + eps)
        y = _ops.torch_eval_forward(x, mean, invstd, weight, bias, act, slope)
        if overwrite:
            y = x.copy_(y)
            ctx.mark_dirty(x)
        ctx.save_for_backward(y, weight, bias, invstd)
        ctx.cfg = (count, act, slope, group)
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise RuntimeError(_inplace._DOUBLE_BACKWARD)
        y, weight, bias, invstd = ctx.saved_tensors
        count, act, slope, group = ctx.cfg

        def reduce(packed: Tensor, n: int) -> tuple[Tensor, int]:
            dist.all_reduce(packed, group=group)
            return packed, count

        needed = ctx.needs_input_grad
        dx, dw, db = _ops.torch_backward_from_output(dy, y, invstd, weight, bias, act, slope,
                                                     needed[0], reduce)  # fmt: skip
        # parameter gradients: this rank's share, as in _SyncBNFunction
        dw = dw.to(weight.dtype) if weight is not None and needed[1] else None
        db = db.to(bias.dtype) if bias is not None and needed[2] else None
        return dx, dw, db, None, None, None, None, None, None, None, None


def sync_batch_norm_act_inplace(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: str, slope: float,
    group: Any = None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """``act(BN(x))`` with statistics over every rank of ``group``, keeping only the output for
    backward (in-place activated BN). Returns ``(y, mean, biased_var, count)`` as
    :func:`sync_batch_norm`; a ``|weight|`` too small to divide by takes that path instead."""
    mean, var, count = global_batch_stats(x, group)
    if not _inplace.weights_invertible(weight):
        y = _SyncBNFunction.apply(x, weight, bias, mean, var, count, float(eps), group)
        return _ops._act(y, act, slope), mean, var, count
    y = _SyncInPlaceFn.apply(x, weight, bias, mean, var, count, float(eps), act, float(slope),
                             group, _inplace.can_overwrite(x))  # fmt: skip
    return y, mean, var, count

"""Synchronised Batch Normalization over ``torch.distributed`` ranks, on CPU (gloo) and GPU.

PyTorch's ``torch.nn.SyncBatchNorm`` refuses CPU tensors; this one runs wherever the process
group's backend runs, accepts per-rank batches of different sizes (zero included), and its
converter keeps subclass behaviour (a fused activation survives).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import functional as F
from ._base import _NormBase
from .kernels._ops import _act
from .variants._dynamic import map_modules, mixed_class

__all__ = ["SyncBatchNorm", "sync_batch_norm", "global_batch_stats"]


def _group_size(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _pc(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


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
    n = F.count_per_channel(x)
    dev = x.device
    if n > 0:
        # Local moments in the compute dtype (var_mean is numerically stable); merge in float64.
        xc = x.to(F.compute_dtype(x.dtype))
        var, mean = torch.var_mean(xc, dim=F.reduce_dims(x), correction=0)
        var, mean = var.double(), mean.double()
    else:
        var = mean = torch.zeros(c, dtype=torch.float64, device=dev)
    local = torch.cat([torch.tensor([float(n)], dtype=torch.float64, device=dev), mean, var * n])
    parts = [torch.empty_like(local) for _ in range(_group_size(group))]
    dist.all_gather(parts, local, group=group)
    g = torch.stack(parts)
    counts, means, m2 = g[:, :1], g[:, 1 : c + 1], g[:, c + 1 :]
    total = int(counts.sum().item())
    if total <= 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got "
            f"{total} over all ranks (local input size {tuple(x.shape)})"
        )
    gmean = (counts * means).sum(0) / total
    gm2 = (m2 + counts * (means - gmean) ** 2).sum(0)
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


class SyncBatchNorm(_NormBase):
    r"""Batch Normalization with statistics over every rank of a ``torch.distributed`` group.

    .. math::

        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \gamma + \beta

    where :math:`\mu` and :math:`\sigma^2` (biased) are the per-channel mean and variance over
    the concatenation of the batches of all ranks (shape ``(C,)``). Forward: one ``all_gather``
    of ``(count, mean, count * var)`` per layer, merged in float64 (:func:`global_batch_stats`).
    Backward: one ``all_reduce`` of ``sum(dy)`` and ``sum(dy * xhat)``. The running statistics
    are updated from the global statistics (unbiased variance over the global count), so they
    are identical on every rank and equal single-process BN on the concatenated batch; so are
    the outputs and input gradients. Parameter gradients are each rank's share, which DDP
    averages as for any parameter.

    Works with gloo on CPU and NCCL on GPU. Batches may differ in size between ranks, including
    zero samples (that rank still joins the collectives). Without an initialised process group,
    with a world size of 1, or in evaluation it is plain BN and runs no collective.

    Args:
        num_features: ``C``. eps, momentum, affine, track_running_stats: as
            :class:`bnlab.BatchNorm2d`.
        process_group: the group to synchronise over (keyword-only); ``None`` is the default
            (world) group.
        device, dtype: factory arguments.

    Shape:
        - Input: ``(N, C, *)``, any rank from 2D to 5D.
        - Output: same shape and dtype.

    Example::

        >>> import torch, bnlab
        >>> bn = bnlab.SyncBatchNorm(3)   # plain BN until a process group is initialised
        >>> bn(torch.randn(8, 3, 4, 4)).shape
        torch.Size([8, 3, 4, 4])
    """

    _input_dims = (2, 3, 4, 5)
    _input_layout = "(N, C, *)"
    _dyn_prefix = "Sync"
    process_group: Any = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group

    def _syncing(self) -> bool:
        use_batch = self.training or not self.track_running_stats
        return use_batch and _group_size(self.process_group) > 1

    def _check_batch_size(self, x: Tensor) -> None:  # type: ignore[override]
        # Synchronised: only the global count matters, checked on every rank alike.
        if not self._syncing():
            super()._check_batch_size(x)

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == 0 and self._syncing():
            # The base skips empty batches, but this rank must still join the collectives.
            self._check_input(x)
            y, mean, var, count = self._batch_forward(x)
            if self.training and self.track_running_stats:
                self._update_running(mean.detach(), var.detach(), count)
            return y
        return super().forward(x)

    def _batch_forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        if not self._syncing():
            return super()._batch_forward(x)
        y, mean, var, count = sync_batch_norm(x, self.weight, self.bias, self.eps,
                                              self.process_group)  # fmt: skip
        act, slope = self._activation()  # a synchronised fused layer keeps its activation
        return _act(y, act, slope), mean, var, count

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Return a deep copy of ``module`` with its BN layers synchronised.

        * ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` become
          :class:`bnlab.SyncBatchNorm` (parameters, statistics, ``requires_grad`` and mode
          kept).
        * A bnlab layer of class ``X`` becomes an instance of ``SyncX(X, SyncBatchNorm)``, built
          once at run time: ``SyncBatchNorm``'s hooks sit between ``X`` and the base, so ``X``'s
          own behaviour (e.g. a fused activation) is kept. Its state is unchanged.
        * Ghost BN and frozen layers stay local (their statistics are per process by
          design); Batch Renorm and ``normalize_with="running"`` raise ``ValueError``.
        * A torch BN subclass bnlab does not know raises ``ValueError`` instead of silently
          dropping its behaviour as torch's converter does.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"convert_sync_batchnorm: module must be a torch.nn.Module, "
                f"got {type(module).__name__}"
            )

        def one(mod: nn.Module, qualname: str) -> nn.Module:
            where = qualname or "<root>"
            if isinstance(mod, SyncBatchNorm):
                mod.process_group = process_group
                return mod
            # bnlab layers are torch _BatchNorm subclasses too: they are handled below
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and not isinstance(mod, _NormBase):
                known = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
                if type(mod) not in known:
                    raise ValueError(
                        f"convert_sync_batchnorm: layer {where} is a {type(mod).__name__}, a "
                        "torch BN subclass; converting would drop its behaviour. Rewrite it "
                        "as a bnlab _NormBase subclass"
                    )
                ref = mod.running_mean if mod.track_running_stats else mod.weight
                new = cls(
                    mod.num_features, mod.eps, mod.momentum, mod.affine,
                    mod.track_running_stats, process_group=process_group,
                    **({} if ref is None else {"device": ref.device, "dtype": ref.dtype}),
                )
                new.load_state_dict(mod.state_dict())
                if mod.affine:
                    new.weight.requires_grad_(mod.weight.requires_grad)
                    new.bias.requires_grad_(mod.bias.requires_grad)
                return new.train(mod.training)
            if not isinstance(mod, _NormBase):
                return mod
            policy = getattr(type(mod), "_sync_policy", "sync")
            if policy == "local":
                return mod
            if policy == "refuse" or mod.normalize_with == "running":
                raise ValueError(
                    f"convert_sync_batchnorm: layer {where} ({type(mod).__name__}) cannot be "
                    "synchronised; replace it by a BatchNorm layer or leave the model local"
                )
            mod.__class__ = mixed_class(cls, type(mod))
            mod.process_group = process_group
            return mod

        return map_modules(copy.deepcopy(module), one)

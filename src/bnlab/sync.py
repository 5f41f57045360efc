"""Synchronised Batch Normalization over ``torch.distributed`` ranks, on CPU (gloo) and GPU.

PyTorch's ``torch.nn.SyncBatchNorm`` refuses CPU tensors; this one runs wherever the process
group's backend runs, accepts per-rank batches of different sizes (zero included), and its
converter keeps subclass behaviour (a fused activation survives).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ._base import _NormBase
from ._checks import check_materialised, check_process_group
from ._state import allow_bad_running_stats
from ._sync_ops import global_batch_stats, sync_batch_norm
from ._tree import copy_model, map_modules
from .convert import TORCH_KNOWN

__all__ = ["SyncBatchNorm", "sync_batch_norm", "global_batch_stats"]


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
        bias, running, window_size, nonfinite, device, dtype: as :class:`bnlab.BatchNorm2d`
            (keyword-only).

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

    _always_sync = True  # process_group=None: the default (world) group

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Return a deep copy of ``module`` with its BN layers synchronised.

        * ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` become
          :class:`bnlab.SyncBatchNorm` (parameters, statistics, ``requires_grad`` and mode
          kept).
        * A bnlab layer keeps its class and state and synchronises (``layer.sync`` becomes
          ``True``, ``layer.process_group`` the group): every bnlab layer reduces its batch
          statistics through :func:`bnlab._sync_ops.sync_batch_norm`, so its own behaviour (a
          fused activation, a window) is kept.
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
        check_process_group("convert_sync_batchnorm", process_group)
        check_materialised("convert_sync_batchnorm", module)

        def one(mod: nn.Module, qualname: str) -> nn.Module:
            where = qualname or "<root>"
            if isinstance(mod, _NormBase):
                # every bnlab layer synchronises through its base: no new class, its own
                # behaviour (a fused activation, a window) kept
                policy = getattr(type(mod), "_sync_policy", "sync")
                if policy == "local":
                    return mod
                if policy == "refuse" or mod.normalize_with == "running":
                    raise ValueError(
                        f"convert_sync_batchnorm: layer {where} ({type(mod).__name__}) cannot "
                        "be synchronised; replace it by a BatchNorm layer or leave the model "
                        "local"
                    )
                mod.process_group, mod.sync = process_group, True
                return mod
            if not isinstance(mod, nn.modules.batchnorm._BatchNorm):
                return mod
            if type(mod) not in TORCH_KNOWN:
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
            with allow_bad_running_stats():  # converting carries the statistics as they are
                new.load_state_dict(mod.state_dict())
            if mod.affine:
                new.weight.requires_grad_(mod.weight.requires_grad)
                new.bias.requires_grad_(mod.bias.requires_grad)
            return new.train(mod.training)

        return map_modules(copy_model(module), one)

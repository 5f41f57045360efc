"""BN under gradient accumulation: one running-statistics update per optimizer step.

With gradient accumulation (``k`` micro-batches, each forward and backward, then one
``optimizer.step()``) every BN layer moves its running statistics after every micro-batch, as if
each were a batch: the estimate follows a ``k``-times smaller batch with ``k``-times more
updates than the user meant (pytorch/pytorch#46516, Lightning #17446).
:func:`accumulation` gives each layer one update per block instead::

    with bnlab.accumulation(model):
        for xb, yb in zip(x.chunk(k), y.chunk(k)):
            (loss_fn(model(xb), yb) / k).backward()
    optimizer.step()
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._base import _NormBase
from ._checks import check_module
from ._sync_ops import group_size

__all__ = ["accumulation"]

#: buffers a layer's own update may change, restored after every micro-batch
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked", "window_mean", "window_var")

#: layers (and models) inside an active block, by id: a nested block is refused
_ACTIVE: set[int] = set()


@dataclass
class _Moments:
    """Per-channel count, mean and sum of squared deviations (M2) of every micro-batch input
    a layer saw, merged in float64 with Chan et al.'s pairwise formula."""

    n: Tensor  # (C,), every channel alike
    mean: Tensor
    m2: Tensor
    saved: dict[str, Tensor] = field(default_factory=dict)  # every buffer, on entry
    reset: tuple[str, ...] = ()  # the buffers put back after each micro-batch


def _synchronising(bn: _BatchNorm) -> bool:
    """Whether ``bn`` reduces its batch statistics over several processes in training."""
    if isinstance(bn, _NormBase):
        return bool(bn.sync) and group_size(bn.process_group) > 1
    if isinstance(bn, nn.SyncBatchNorm):
        return group_size(bn.process_group) > 1
    return False


def _hook(state: _Moments):
    def hook(module: _BatchNorm, args: tuple, output: Tensor) -> None:
        x = args[0]
        if x.numel() > 0:  # an empty micro-batch adds nothing (bnlab's layers skip it too)
            with torch.no_grad():
                dims = [d for d in range(x.dim()) if d != 1]
                xb = x.detach().to(torch.float64)
                nb = x.numel() // x.shape[1]
                mb = xb.mean(dims)
                shape = [1, -1] + [1] * (x.dim() - 2)
                m2b = (xb - mb.view(shape)).square().sum(dims)
                total = state.n + nb
                delta = mb - state.mean
                state.mean.add_(delta * (nb / total))
                state.m2.add_(m2b + delta.square() * (state.n * nb / total))
                state.n.add_(nb)
        # the layer's own update of this micro-batch is undone: one update comes on exit
        with torch.no_grad():
            for name in state.reset:
                getattr(module, name).copy_(state.saved[name])

    return hook


@torch.no_grad()
def _apply(bn: _BatchNorm, state: _Moments) -> None:
    """One running update from the merged moments (biased variance ``M2 / n``)."""
    n = int(state.n[0].item())
    mean = state.mean.to(bn.running_mean.dtype)
    biased = (state.m2 / n).to(bn.running_var.dtype)
    if isinstance(bn, _NormBase):
        bn._update_running(mean, biased, n)  # the layer's own policy: ema, cumulative, window
        return
    for name in ("running_mean", "running_var"):  # momentum 0 leaves them, unless NaN came in
        buf = getattr(bn, name)
        if not torch.equal(buf, state.saved[name]):
            buf.copy_(state.saved[name])
    bn.num_batches_tracked.add_(1)
    factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    unbiased = (state.m2 / max(n - 1, 1)).to(bn.running_var.dtype)
    bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
    bn.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)


@contextmanager
def accumulation(model: nn.Module) -> Iterator[nn.Module]:
    """Give every BN layer of ``model`` one running-statistics update per block of
    micro-batches (gradient accumulation), from the merged moments of all of them.

    Put the ``k`` forward/backward passes of one optimizer step inside the block. Each BN layer
    (bnlab's, and torch's ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm``: every
    ``torch.nn.modules.batchnorm._BatchNorm``) in training mode with running statistics
    still **normalises each micro-batch with that micro-batch's own statistics**: outputs and
    gradients are exactly those without the block. Exact full-batch normalisation would need
    the whole batch at once (which gradient accumulation exists to avoid); Ghost BN is the
    reverse case, smaller normalisation groups inside one batch.

    The running statistics change once, on exit: the per-channel count :math:`n`, mean and
    :math:`M_2 = \\sum (x - \\bar x)^2` of every micro-batch input the layer saw are merged in
    float64 with Chan et al.'s formula
    (:math:`M_2 = M_{2,a} + M_{2,b} + \\delta^2 n_a n_b / (n_a + n_b)`), and the union's mean
    and variance update the layer once: the unbiased :math:`M_2 / (n - 1)` enters the running
    variance, ``num_batches_tracked`` grows by exactly 1. A torch layer gets torch's update
    (``momentum``, or the cumulative average for ``momentum=None``); a bnlab layer goes through
    its own policy (``running="ema"``, ``"cumulative"`` or ``"window"``), so the result equals
    one training step of the layer on the concatenated batch. A Ghost BN layer's update is
    then the union's variance, not its own average of virtual-batch variances. During the
    block every running buffer stays at its value on entry (a ``normalize_with="running"``
    layer normalises every micro-batch with the same statistics): a bnlab layer's buffers are
    put back after each micro-batch, a torch layer runs with ``momentum=0.0`` (restored on
    exit), since torch's kernel keeps its running buffers for backward. Run each micro-batch's
    backward inside the block: the update on exit changes those buffers in place.

    Args:
        model: any ``nn.Module``; its BN layers are found with ``isinstance`` against torch's
            ``_BatchNorm``. Layers in evaluation mode, or without running statistics, are left
            alone: a model in evaluation mode makes the block a no-op.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a block is already active over ``model`` or one of its BN layers (nested
            blocks); a layer synchronises its statistics over several processes (the hook sees
            only this rank's input, so the merged moments would not be the global ones: leave
            the layer out of the block, or let each micro-batch update it); on exit, when no
            tracked BN layer ran a forward inside the block (an empty block).

    On an exception inside the block every buffer is restored to its value on entry, hooks
    are removed and no update is applied. The hooks are forward hooks, so the block works
    around ``torch.compile``'d models too (the hooks run inside the compiled region).

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), bnlab.BatchNorm2d(8))
        >>> with bnlab.accumulation(model):
        ...     for xb in torch.randn(64, 3, 8, 8).chunk(4):
        ...         model(xb).square().mean().backward()
        >>> int(model[1].num_batches_tracked)
        1
    """
    check_module("accumulation", "model", model)
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)
              and m.training and m.track_running_stats and m.running_mean is not None]
    ids = {id(model), *(id(m) for m in layers)}
    if ids & _ACTIVE:
        raise ValueError(
            "accumulation: a block is already active over this model (or one of its BN "
            "layers); nested blocks are not supported: use one block per optimizer step"
        )
    for bn in layers:
        if _synchronising(bn):
            raise ValueError(
                f"accumulation: {type(bn).__name__} synchronises its statistics over "
                f"{group_size(bn.process_group)} processes, and the block sees only this "
                "rank's input; accumulate over a model without synchronising BN layers"
            )
    states: dict[_BatchNorm, _Moments] = {}
    momenta: dict[_BatchNorm, float | None] = {}
    handles = []
    _ACTIVE.update(ids)
    try:
        for bn in layers:
            kw = {"dtype": torch.float64, "device": bn.running_mean.device}
            # (C,) counts, not a 0-dim tensor: dynamo drops in-place updates of a captured 0-dim
            # tensor in a hook (torch 2.x), and the count is per channel anyway
            state = _Moments(*(torch.zeros(bn.num_features, **kw) for _ in range(3)))
            state.saved = {name: getattr(bn, name).detach().clone() for name in _BUFFERS
                           if isinstance(getattr(bn, name, None), Tensor)}
            if isinstance(bn, _NormBase):
                state.reset = tuple(state.saved)
            else:
                # torch's kernel saves running_mean/running_var for backward, so copying into
                # them between forward and backward is an autograd error: momentum 0 keeps
                # them as they are instead (restored in finally)
                momenta[bn] = bn.momentum
                bn.momentum = 0.0
                state.reset = ("num_batches_tracked",)
            states[bn] = state
            handles.append(bn.register_forward_hook(_hook(state)))
        yield model
        for h in handles:
            h.remove()
        handles.clear()
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        seen = {bn: s for bn, s in states.items() if s.n[0].item() > 0}
        if layers and not seen:
            raise ValueError(
                "accumulation: no BN layer of the model ran a forward in training mode inside "
                "the block (an empty block); put the micro-batches' forward passes inside it"
            )
        for bn, state in seen.items():
            _apply(bn, state)
    except BaseException:
        with torch.no_grad():
            for bn, state in states.items():
                for name, value in state.saved.items():
                    getattr(bn, name).copy_(value)
        raise
    finally:
        for h in handles:
            h.remove()
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        _ACTIVE.difference_update(ids)

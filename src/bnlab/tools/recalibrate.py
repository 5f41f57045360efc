r"""Precise BN: replace running statistics by the exact statistics of a data set (in place).

The moving average a BN layer keeps during training lags behind the weights and mixes
statistics of old and new parameters. Precise BN (Wu & Johnson, *Rethinking "Batch" in
BatchNorm*, 2021; fvcore's ``update_bn_stats``) runs the final model over many batches and
stores the mean and variance of **all** values seen, each batch weighted by its count:

.. math::

    n = \sum_b n_b, \quad \mu = \frac{1}{n}\sum_b n_b \mu_b, \quad
    M_2 = \sum_b \left(n_b \sigma_b^2 + n_b (\mu_b - \mu)^2\right), \quad
    \hat\sigma^2 = \frac{M_2}{n - 1}

(:math:`\sigma_b^2` the biased batch variance; the stored variance is the unbiased one, the
convention of torch's and bnlab's layers). ``torch.optim.swa_utils.update_bn`` instead averages
per-batch unbiased variances, which misses the spread of the batch means.

As in fvcore, BN layers normalise each batch with its own statistics while statistics are
collected (train mode), so every layer sees the inputs it saw in training. Other modules keep
their mode (Dropout stays off in an evaluation-mode model).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .. import functional as BF
from .._checks import check_module, check_real_weights
from ._graph import bn_layers

__all__ = ["batch_moments", "check_batch_count", "check_batches", "check_num_batches",
           "combine_moments", "recalibrate", "first_tensor"]

Moments = tuple[int, Tensor, Tensor]  # count per channel, mean (C,), M2 (C,) in float64


def batch_moments(x: Tensor) -> Moments:
    """``(n, mean, M2)`` per channel of ``x`` ``(N, C, *)``, in float64 (M2 = n * biased var):
    :func:`bnlab.functional.moments`."""
    return BF.moments(x)


def combine_moments(a: Moments | None, b: Moments) -> Moments:
    """Chan et al.'s exact merge of two ``(n, mean, M2)`` summaries
    (:func:`bnlab.functional.merge_moments`)."""
    if a is None or a[0] == 0:
        return b
    counts = torch.tensor([[float(a[0])], [float(b[0])]], dtype=torch.float64, device=b[1].device)
    mean, m2 = BF.merge_moments(counts, torch.stack([a[1], b[1]]), torch.stack([a[2], b[2]]))
    return a[0] + b[0], mean, m2


def first_tensor(batch) -> Tensor:
    """The model input of a batch: the batch itself, or the first item of a tuple/list/dict."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(
        "batches must yield tensors or (input, target, ...) tuples, "
        f"got {type(batch).__name__}"
    )


def check_num_batches(owner: str, num_batches: object) -> None:
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"{owner}: num_batches must be a positive int or None, got "
                         f"{num_batches!r}")


def check_batches(owner: str, batches: object) -> None:
    """``batches`` is an iterable of batches (a tensor would iterate over single samples)."""
    what = ("an iterable of batches (a DataLoader, or a list of tensors or (input, target) "
            "tuples)")
    if isinstance(batches, Tensor):
        raise TypeError(f"{owner}: batches must be {what}, got a Tensor (iterating it would "
                        "give single samples); pass [x] for one batch")
    if not (isinstance(batches, Iterable) or hasattr(batches, "__getitem__")):
        raise TypeError(f"{owner}: batches must be {what}, got {type(batches).__name__}")


def check_batch_count(owner: str, num_batches: int | None, used: int) -> None:
    """The one answer of every tool to a loader that yields nothing, or too little."""
    if used == 0 and num_batches is None:
        raise ValueError(f"{owner}: batches yielded no batch; pass a non-empty iterable")
    if num_batches is not None and used < num_batches:
        raise ValueError(
            f"{owner}: asked for num_batches={num_batches} but batches yielded only {used}; "
            "pass fewer batches or a longer iterable"
        )


class _Collector:
    def __init__(self, name: str) -> None:
        self.name = name
        self.moments: Moments | None = None
        self.calls = 0
        self.used = 0  # batches whose statistics entered the moments
        self.skipped = 0  # batches with NaN/Inf statistics, kept out
        self.empty = 0  # batches with no value per channel: nothing to learn from

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.calls += 1
        if self.calls > 1:
            raise ValueError(
                f"recalibrate: BN layer {self.name!r} was called {self.calls} times in one "
                "forward; exact statistics need one call per forward (a reused BN layer mixes "
                "the statistics of different inputs); give each call site its own layer"
            )
        if BF.count_per_channel(args[0]) == 0:
            self.empty += 1
            return
        moments = batch_moments(args[0])
        if not (torch.isfinite(moments[1]).all() and torch.isfinite(moments[2]).all()):
            self.skipped += 1  # never let a NaN/Inf batch into the statistics
            return
        self.moments = combine_moments(self.moments, moments)
        self.used += 1


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    batches: Iterable,
    num_batches: int | None = None,
) -> nn.Module:
    """Set every BN layer's running statistics to the exact statistics over ``batches``, in place.

    Args:
        model: any module with torch or bnlab BN layers (with running statistics).
        batches: an iterable of input tensors or ``(input, target, ...)`` tuples, such as a
            ``DataLoader``. Each is passed to ``model``.
        num_batches: use this many batches; ``None`` uses all of them. If ``batches`` yields
            fewer, nothing is changed and ``ValueError`` is raised.

    Returns ``model`` (modified in place). Training flags and hooks are restored afterwards, and
    on any error the running statistics are restored too. ``num_batches_tracked`` becomes the
    number of batches used; a ``running="window"`` layer gets the exact statistics in every
    window slot.

    A batch whose values reaching a BN layer contain NaN/Inf is left out of that layer's
    statistics, with a ``RuntimeWarning`` naming the layer and the count; ``num_batches_tracked``
    is then the number of batches used.

    A batch with no value per channel (0 samples) is left out too; a layer that only ever sees
    such batches raises, saying the batches are empty.

    Raises:
        TypeError: ``model`` is not a module, or ``batches`` is not an iterable of batches (a
            tensor would iterate over single samples).
        ValueError: a BN layer is called more than once per forward, ``num_batches`` is not a
            positive int or more than ``batches`` yields, ``batches`` yields nothing, there are
            no BN layers, the model has meta or uninitialised lazy weights, or every batch
            reaching a layer is non-finite or empty (nothing is changed then).

    Example::

        >>> loader = [torch.randn(32, 3, 8, 8) for _ in range(10)]
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> _ = recalibrate(net, loader)
        >>> int(net[1].num_batches_tracked)
        10
    """
    return _recalibrate(model, batches, num_batches, "recalibrate")


def _recalibrate(model: nn.Module, batches: Iterable, num_batches: int | None,
                 owner: str) -> nn.Module:
    """:func:`recalibrate`, its errors named after ``owner`` (the tool the user called)."""
    check_module(owner, "model", model)
    check_real_weights(owner, model)
    check_batches(owner, batches)
    check_num_batches(owner, num_batches)
    layers = [(n, m) for n, m in bn_layers(model) if m.track_running_stats]
    if not layers:
        raise ValueError(f"{owner}: the model has no BN layer with running statistics")
    saved = {n: {k: v.clone() for k, v in m._buffers.items() if v is not None} for n, m in layers}
    modes = {m: m.training for m in model.modules()}
    collectors = [_Collector(n) for n, _ in layers]
    handles = [m.register_forward_pre_hook(c) for (_, m), c in zip(layers, collectors,
                                                                   strict=True)]
    used = 0
    ok = False
    try:
        for _, m in layers:
            m.train()
        for batch in batches:
            if num_batches is not None and used >= num_batches:
                break
            for c in collectors:
                c.calls = 0
            model(first_tensor(batch))
            used += 1
        check_batch_count(owner, num_batches, used)
        for (name, _), c in zip(layers, collectors, strict=True):
            if c.moments is None and c.skipped:
                raise ValueError(
                    f"{owner}: every batch that reached BN layer {name!r} ({c.skipped}"
                    f"{f', and {c.empty} empty' if c.empty else ''}) had NaN/Inf values; no "
                    "statistics were changed. Check the data (or the layers before it) for "
                    "non-finite values"
                )
            if c.moments is None and c.empty:
                raise ValueError(
                    f"{owner}: every batch that reached BN layer {name!r} was empty (0 values "
                    f"per channel, {c.empty} batches); no statistics were changed. Pass "
                    "batches with at least one sample"
                )
        ok = True
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
        if not ok:
            for n, m in layers:
                for k, v in saved[n].items():
                    m._buffers[k].copy_(v)
    for (name, m), c in zip(layers, collectors, strict=True):
        if c.moments is None:
            for k, v in saved[name].items():
                m._buffers[k].copy_(v)
            warnings.warn(f"{owner}: BN layer {name!r} was never called; its statistics "
                          "are unchanged", UserWarning, stacklevel=3)
            continue
        if c.skipped:
            warnings.warn(f"{owner}: BN layer {name!r}: skipped {c.skipped} of "
                          f"{c.skipped + c.used} batches with NaN/Inf values; its statistics "
                          f"come from the other {c.used}", RuntimeWarning, stacklevel=3)
        _store(m, c.moments, c.used)
    return model


def _store(m: nn.Module, moments: Moments, used: int) -> None:
    n, mean, m2 = moments
    var = m2 / max(n - 1, 1)  # unbiased, the convention of torch's and bnlab's running_var
    m.running_mean.copy_(mean.to(m.running_mean.dtype))
    m.running_var.copy_(var.to(m.running_var.dtype))
    m.num_batches_tracked.fill_(used)
    if getattr(m, "running", None) == "window":
        m.window_mean.copy_(mean.expand_as(m.window_mean))
        m.window_var.copy_(var.expand_as(m.window_var))

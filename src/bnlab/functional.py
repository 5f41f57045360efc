"""Pure functions for Batch Normalization: statistics in, output and new statistics out.

Nothing here mutates its arguments. Modules in :mod:`bnlab.batchnorm` own the parameters and
buffers and copy the new statistics returned by these functions into their buffers.

Conventions used throughout bnlab:

* Inputs are ``(N, C, *)``; statistics are per channel ``C`` over every other dimension.
* Batches are **normalised with the biased variance** (divide by ``n``), as in the paper and
  in PyTorch; the **running estimate stores the unbiased variance** (divide by ``n - 1``).
* Momentum follows PyTorch: ``new = (1 - m) * old + m * batch``; ``momentum=None`` is a
  cumulative average. Keras' convention is converted only by :mod:`bnlab.keras`.
* Statistics are computed in ``promote_types(x.dtype, float32)``: half and bfloat16 inputs
  get float32 statistics and an output in the input dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .kernels import backends as _backends

__all__ = [
    "compute_dtype",
    "reduce_dims",
    "count_per_channel",
    "batch_stats",
    "moments",
    "merge_moments",
    "normalize",
    "batch_norm_train",
    "batch_norm_act_train",
    "normalize_act",
    "check_eps",
    "running_update",
    "unbiased_var",
    "bessel_factor",
    "ema_update",
    "cumulative_factor",
    "window_push",
    "window_stats",
    "batch_norm",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def reduce_dims(x: Tensor) -> list[int]:
    """Every dimension except the channel dimension 1."""
    return [0, *range(2, x.dim())]


def count_per_channel(x: Tensor) -> int:
    """Number of values each channel's statistics are computed over."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """View a ``(C,)`` tensor so it broadcasts against ``x`` of shape ``(N, C, *)``."""
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


def moments(x: Tensor, dtype: torch.dtype = torch.float64) -> tuple[int, Tensor, Tensor]:
    """``(n, mean, M2)`` per channel of ``x`` ``(N, C, *)``: the count, the ``(C,)`` mean and
    ``M2 = n * biased var`` in float64, from ``var_mean`` computed in ``dtype`` (float64 by
    default; :func:`compute_dtype` where speed matters more). Summaries of parts of a batch
    merge exactly with :func:`merge_moments`."""
    var, mean = torch.var_mean(x.detach().to(dtype), dim=reduce_dims(x), correction=0)
    n = count_per_channel(x)
    return n, mean.double(), var.double() * n


def merge_moments(counts: Tensor, means: Tensor, m2: Tensor) -> tuple[Tensor, Tensor]:
    """Chan et al.'s exact merge of ``k`` summaries ``(n_i, mean_i, M2_i)``: ``counts``
    ``(k, 1)``, ``means`` and ``m2`` ``(k, C)``; returns the whole's ``(mean, M2)`` with
    ``M2 = sum(M2_i + n_i (mean_i - mean)^2)``. Exact for unequal (and zero) counts, without
    the cancellation of sums of squares. The total count must be positive."""
    mean = (counts * means).sum(0) / counts.sum()
    return mean, (m2 + counts * (means - mean) ** 2).sum(0)


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and **biased** variance of ``x`` (shape ``(N, C, *)``).

    Returns two ``(C,)`` tensors in :func:`compute_dtype`. ``torch.var_mean`` accumulates with
    a numerically stable algorithm, so a large common offset (mean 1e4, std 1e-2) does not
    destroy the variance as ``E[x^2] - E[x]^2`` would. The variance is clamped at zero.
    """
    xc = x.to(compute_dtype(x.dtype))
    var, mean = torch.var_mean(xc, dim=reduce_dims(x), correction=0)
    return mean, var.clamp_min(0)


def check_eps(eps: float, where: str) -> float:
    """``eps`` as a float, or ``ValueError`` unless it is positive and finite.

    Every entry point checks it the same way on every backend (a negative value would mean
    something else to the C kernels, and NaN would silently poison every output).
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (
        eps > 0 and math.isfinite(eps)
    ):
        raise ValueError(f"{where}: eps must be a positive finite float, got {eps!r}")
    return float(eps)


def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    r"""Apply :math:`y = \gamma (x - \mu) / \sqrt{\sigma^2 + \epsilon} + \beta` per channel.

    ``mean``, ``var``, ``weight`` and ``bias`` have shape ``(C,)``; ``weight``/``bias`` may be
    ``None`` (``affine=False``). Computed in :func:`compute_dtype`, returned in ``x.dtype``.
    Runs on the backend :mod:`bnlab.kernels.backends` selects for the tensors.
    """
    return normalize_act(x, mean, var, weight, bias, eps, "identity")


def normalize_act(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    act: str = "relu",
    negative_slope: float = 0.01,
) -> Tensor:
    """``act(normalize(x, ...))`` for ``act`` in ``identity``, ``relu``, ``leaky_relu``."""
    eps = check_eps(eps, "normalize")
    return _backends.evaluate(x, mean, var, weight, bias, eps, act, negative_slope)


def batch_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN: normalise ``x`` with its own statistics.

    Returns ``(y, mean, biased_var)``. The statistics carry gradients on the native and
    composite backends; torch's kernels (the aten backend: GPUs, half precision) return them
    detached. See :mod:`bnlab.kernels.backends` for which backend runs.
    """
    return batch_norm_act_train(x, weight, bias, eps, "identity")


def batch_norm_act_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    act: str = "relu",
    negative_slope: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor]:
    """``act(BN(x))`` with batch statistics: ``(y, mean, biased_var)``."""
    eps = check_eps(eps, "batch_norm_train")
    return _backends.train(x, weight, bias, eps, act, negative_slope)


def bessel_factor(n: int) -> float:
    """``n / (n - 1)``: biased to unbiased variance over ``n`` values (1 for ``n <= 1``)."""
    return n / (n - 1) if n > 1 else 1.0


def unbiased_var(var: Tensor, n: int | Tensor) -> Tensor:
    """Convert a biased variance over ``n`` values to the unbiased one (Bessel's correction).

    ``n`` may be a 0-dim tensor (a masked layer's count of valid positions): the factor is then
    computed with tensor ops, without reading its value, and is 1 where ``n <= 1``.
    """
    if isinstance(n, Tensor):
        nf = n.to(var.dtype)
        return var * torch.where(nf > 1, nf / (nf - 1).clamp_min(1), torch.ones_like(nf))
    return var * bessel_factor(n) if n > 1 else var


def ema_update(
    old: Tensor, new: Tensor, momentum: float | Tensor, finite: Tensor | None = None
) -> Tensor:
    """PyTorch-convention moving average: ``(1 - momentum) * old + momentum * new``.

    With a boolean tensor ``finite``, ``old`` is returned where it is false (no branch on a
    tensor's value, so a compiled graph serves every step).
    """
    out = old + momentum * (new.to(old.dtype) - old)
    return out if finite is None else torch.where(finite, out, old)


def cumulative_factor(num_batches_tracked: int | Tensor) -> float | Tensor:
    """Weight of the newest batch in a cumulative average after ``num_batches_tracked`` batches
    (an int or a tensor; a tensor gives a tensor, without reading its value)."""
    if isinstance(num_batches_tracked, Tensor):
        return 1.0 / num_batches_tracked.clamp_min(1).to(torch.float64)
    return 1.0 / max(int(num_batches_tracked), 1)


def window_push(
    window: Tensor,
    value: Tensor,
    num_batches_tracked: int | Tensor,
    finite: Tensor | None = None,
) -> Tensor:
    """Return a copy of the ring buffer ``window`` (``(k, C)``) with ``value`` written.

    ``num_batches_tracked`` (an int or a 0-dim tensor) counts the batches already in the
    buffer's history before this one; the slot written is ``num_batches_tracked % k``. With a
    boolean tensor ``finite`` that is false, the slot keeps its old row.
    """
    k = window.shape[0]
    if not isinstance(num_batches_tracked, Tensor):
        num_batches_tracked = torch.tensor(int(num_batches_tracked), device=window.device)
    slot = (num_batches_tracked % k).reshape(1)
    row = value.to(window.dtype).reshape(1, -1)
    if finite is not None:
        row = torch.where(finite, row, window.index_select(0, slot))
    return window.index_copy(0, slot, row)


def window_stats(window: Tensor, filled: int | Tensor) -> Tensor:
    """Mean over the ``filled`` valid rows of a ring buffer (all rows once it is full).

    ``filled`` may be a 0-dim tensor: the mean is then taken with a mask, without reading its
    value (a tensor ``filled`` of 0 gives the mean of no rows as 0/1 = 0, not an error).
    """
    k = window.shape[0]
    if isinstance(filled, Tensor):
        f = filled.clamp(1, k)
        mask = torch.arange(k, device=window.device) < f
        return (window * mask.to(window.dtype)[:, None]).sum(0) / f.to(window.dtype)
    filled = min(int(filled), k)
    if filled <= 0:
        raise ValueError("window_stats: the window is empty (filled=0); push a batch first")
    return window[:filled].mean(dim=0) if filled < k else window.mean(dim=0)


def running_update(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int | Tensor,
    momentum: float | None,
    *,
    running: str = "ema",
    window: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor] | None, Tensor]:
    """One step of the running statistics, as tensor ops only (no branch on a value).

    ``mean`` and biased ``var`` are one batch's statistics over ``count`` values per channel
    (an int, or a 0-dim tensor such as a mask's number of valid positions).
    Returns ``(running_mean, running_var, num_batches_tracked, window, finite)``, all new
    tensors: a batch with NaN/Inf statistics leaves everything as it was (``finite`` is then a
    false 0-dim tensor). ``running`` is ``"ema"`` (``momentum=None``: cumulative),
    ``"cumulative"`` or ``"window"`` (``window`` = the ``(k, C)`` mean and variance rings).
    """
    finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
    uvar = unbiased_var(var, count)
    seen = num_batches_tracked
    new_seen = seen + finite.to(seen.dtype)
    if running == "window":
        wm = window_push(window[0], mean, seen, finite)
        wv = window_push(window[1], uvar, seen, finite)
        rm = torch.where(finite, window_stats(wm, new_seen).to(running_mean.dtype), running_mean)
        rv = torch.where(finite, window_stats(wv, new_seen).to(running_var.dtype), running_var)
        return rm, rv, new_seen, (wm, wv), finite
    if running == "cumulative" or momentum is None:
        factor = cumulative_factor(seen + 1)
    else:
        factor = momentum
    rm = ema_update(running_mean, mean, factor, finite)
    rv = ema_update(running_var, uvar, factor, finite)
    return rm, rv, new_seen, window, finite


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Functional, non-mutating counterpart of ``torch.nn.functional.batch_norm``.

    Returns ``(y, new_running_mean, new_running_var)``. In training (or without running
    statistics) ``x`` is normalised with its batch statistics and the running statistics are
    moved towards them with the PyTorch momentum convention, the variance entering as the
    unbiased estimate. In evaluation the running statistics normalise and are returned as they
    are.

    Example::

        >>> x = torch.randn(8, 3, 4, 4)
        >>> y, rm, rv = batch_norm(x, torch.zeros(3), torch.ones(3), training=True)
        >>> y.shape, rm.shape
        (torch.Size([8, 3, 4, 4]), torch.Size([3]))
    """
    eps = check_eps(eps, "batch_norm")
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"batch_norm: momentum must be a float in [0, 1], got {momentum!r}")
    use_batch = training or running_mean is None or running_var is None
    if not use_batch:
        return normalize(x, running_mean, running_var, weight, bias, eps), running_mean, running_var
    y, mean, var = batch_norm_train(x, weight, bias, eps)
    if not training or running_mean is None or running_var is None:
        return y, running_mean, running_var
    with torch.no_grad():
        n = count_per_channel(x)
        new_mean = ema_update(running_mean, mean, momentum)
        new_var = ema_update(running_var, unbiased_var(var, n), momentum)
    return y, new_mean, new_var

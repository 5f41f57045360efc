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

import torch
from torch import Tensor

from . import kernels as _kernels

__all__ = [
    "compute_dtype",
    "reduce_dims",
    "count_per_channel",
    "batch_stats",
    "normalize",
    "batch_norm_train",
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


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and **biased** variance of ``x`` (shape ``(N, C, *)``).

    Returns two ``(C,)`` tensors in :func:`compute_dtype`. ``torch.var_mean`` accumulates with
    a numerically stable algorithm, so a large common offset (mean 1e4, std 1e-2) does not
    destroy the variance as ``E[x^2] - E[x]^2`` would. The variance is clamped at zero.
    """
    xc = x.to(compute_dtype(x.dtype))
    var, mean = torch.var_mean(xc, dim=reduce_dims(x), correction=0)
    return mean, var.clamp_min(0)


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
    Runs on bnlab's compiled kernels when they support the tensors (see :mod:`bnlab.kernels`).
    """
    if _kernels.supports_eval(x, mean, var, weight, bias):
        return _kernels.api.normalize_native(x, mean, var, weight, bias, eps)
    cdt = compute_dtype(x.dtype)
    invstd = torch.rsqrt(var.to(cdt) + eps)
    scale = invstd if weight is None else invstd * weight.to(cdt)
    # Subtract the mean before scaling: folding it into one shift (x * scale - mean * scale)
    # cancels catastrophically when the mean is large against the spread (offset 1e4).
    y = (x.to(cdt) - _per_channel(mean.to(cdt), x)) * _per_channel(scale, x)
    if bias is not None:
        y = y + _per_channel(bias.to(cdt), x)
    return y.to(x.dtype)


def batch_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN: normalise ``x`` with its own statistics.

    Returns ``(y, mean, biased_var)``; gradients flow through the statistics. This is the
    single entry point that compiled kernels replace (see :mod:`bnlab.kernels`): they run
    when they support the tensors, this pure-PyTorch code otherwise.
    """
    if _kernels.supports(x, weight, bias):
        return _kernels.api.batch_norm_train_native(x, weight, bias, eps)
    mean, var = batch_stats(x)
    return normalize(x, mean, var, weight, bias, eps), mean, var


def bessel_factor(n: int) -> float:
    """``n / (n - 1)``: biased to unbiased variance over ``n`` values (1 for ``n <= 1``)."""
    return n / (n - 1) if n > 1 else 1.0


def unbiased_var(var: Tensor, n: int) -> Tensor:
    """Convert a biased variance over ``n`` values to the unbiased one (Bessel's correction)."""
    return var * bessel_factor(n) if n > 1 else var


def ema_update(old: Tensor, new: Tensor, momentum: float) -> Tensor:
    """PyTorch-convention moving average: ``(1 - momentum) * old + momentum * new``."""
    return old + momentum * (new.to(old.dtype) - old)


def cumulative_factor(num_batches_tracked: int) -> float:
    """Weight of the newest batch in a cumulative average after ``num_batches_tracked`` batches."""
    return 1.0 / max(int(num_batches_tracked), 1)


def window_push(
    window: Tensor, value: Tensor, num_batches_tracked: int
) -> Tensor:
    """Return a copy of the ring buffer ``window`` (``(k, C)``) with ``value`` written.

    ``num_batches_tracked`` counts the batches already in the buffer's history before this one;
    the slot written is ``num_batches_tracked % k``.
    """
    out = window.clone()
    out[int(num_batches_tracked) % window.shape[0]] = value.to(window.dtype)
    return out


def window_stats(window: Tensor, filled: int) -> Tensor:
    """Mean over the ``filled`` valid rows of a ring buffer (all rows once it is full)."""
    k = window.shape[0]
    filled = min(int(filled), k)
    if filled <= 0:
        raise ValueError("window_stats: the window is empty (filled=0); push a batch first")
    return window[:filled].mean(dim=0) if filled < k else window.mean(dim=0)


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

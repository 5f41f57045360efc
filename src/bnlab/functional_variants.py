"""Pure functions for the BN variants: Batch Renormalization, Ghost Batch Normalization and
masked Batch Normalization (padded sequences).

Same conventions as :mod:`bnlab.functional` (inputs ``(N, C, *)``, per-channel statistics,
biased variance to normalise, unbiased variance for running estimates, statistics computed in
``promote_types(x.dtype, float32)``). Nothing here mutates its arguments; the modules in
:mod:`bnlab.variants` own buffers and copy new statistics into them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import functional as F
from .kernels import masked as _masked

__all__ = [
    "renorm_limits",
    "batch_renorm_train",
    "ghost_split_sizes",
    "ghost_batch_norm_train",
    "pool_virtual_stats",
    "masked_batch_stats",
    "masked_normalize",
]


def _as_pair(relax_steps: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(relax_steps, int):
        return relax_steps, relax_steps
    r_steps, d_steps = relax_steps
    return int(r_steps), int(d_steps)


def renorm_limits(
    step: int | Tensor,
    r_max: float,
    d_max: float,
    warmup_steps: int,
    relax_steps: int | tuple[int, int],
) -> tuple[float, float]:
    r"""Clipping limits ``(r_max_t, d_max_t)`` of Batch Renorm at training batch ``step``.

    ``step`` is the 0-based index of the batch (the number of batches already tracked). With
    ``(s_r, s_d) = relax_steps`` (an int applies to both) and ``w = warmup_steps``:

    .. math::

        r_{\max}(t) = 1 + (r_{\max} - 1)\,\mathrm{clip}\big((t - w) / s_r, 0, 1\big), \qquad
        d_{\max}(t) = d_{\max}\,\mathrm{clip}\big((t - w) / s_d, 0, 1\big)

    so batches ``0..w`` are plain BN (``r = 1``, ``d = 0``) and the limits grow linearly to
    their final values at batch ``w + s_r`` and ``w + s_d``. A relax length of 0 jumps to the
    final limit right after the warm-up. Ioffe (2017) used ``w = 5000``, ``r_max = 3`` reached
    at 40k steps and ``d_max = 5`` at 25k, i.e. ``relax_steps = (35000, 20000)``.
    """
    r_steps, d_steps = _as_pair(relax_steps)
    if isinstance(step, Tensor):
        # The same schedule as tensor ops (no value read), for graphs: ``(r_max_t, d_max_t)``
        # as float64 0-dim tensors.
        t = step.to(torch.float64) - int(warmup_steps)
        pr = (t > 0).to(t.dtype) if r_steps <= 0 else (t / r_steps).clamp(0, 1)
        pd = (t > 0).to(t.dtype) if d_steps <= 0 else (t / d_steps).clamp(0, 1)
        return 1.0 + (float(r_max) - 1.0) * pr, float(d_max) * pd
    t = int(step) - int(warmup_steps)
    if t <= 0:
        return 1.0, 0.0
    pr = 1.0 if r_steps <= 0 else min(1.0, t / r_steps)
    pd = 1.0 if d_steps <= 0 else min(1.0, t / d_steps)
    return 1.0 + (float(r_max) - 1.0) * pr, float(d_max) * pd


def batch_renorm_train(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    r_max: float | Tensor,
    d_max: float | Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""Training-mode Batch Renormalization (Ioffe 2017, Algorithm 1).

    .. math::

        \hat x = \frac{x - \mu_B}{\sigma_B}\, r + d, \quad
        r = \mathrm{clip}_{[1/r_{\max},\, r_{\max}]}\Big(\frac{\sigma_B}{\sigma}\Big), \quad
        d = \mathrm{clip}_{[-d_{\max},\, d_{\max}]}\Big(\frac{\mu_B - \mu}{\sigma}\Big), \quad
        y = \gamma \hat x + \beta

    with :math:`\sigma_B = \sqrt{\mathrm{biased\ batch\ var} + \epsilon}` and
    :math:`\sigma = \sqrt{\mathrm{running\_var} + \epsilon}`, ``running_var`` being the stored
    unbiased running estimate. ``r`` and ``d`` are treated as constants (no gradient flows
    through them); gradients do flow through :math:`\mu_B` and :math:`\sigma_B`.

    Returns ``(y, mean, biased_var, r, d)``; ``r`` and ``d`` are ``(C,)`` and detached.
    """
    cdt = F.compute_dtype(x.dtype)
    mean, var = F.batch_stats(x)
    sigma_b = torch.sqrt(var + eps)
    with torch.no_grad():
        inv_sigma = torch.rsqrt(running_var.to(cdt) + eps)
        if isinstance(r_max, Tensor):
            r_max, d_max = r_max.to(cdt), d_max.to(cdt)
            r = torch.minimum(torch.maximum(sigma_b * inv_sigma, 1.0 / r_max), r_max)
            d = torch.minimum(torch.maximum((mean - running_mean.to(cdt)) * inv_sigma, -d_max),
                              d_max)  # fmt: skip
        else:
            r = (sigma_b * inv_sigma).clamp(1.0 / r_max, r_max)
            d = ((mean - running_mean.to(cdt)) * inv_sigma).clamp(-d_max, d_max)
    a = r / sigma_b
    scale = a if weight is None else a * weight.to(cdt)
    shift = d - mean * a
    shift = shift if weight is None else shift * weight.to(cdt)
    if bias is not None:
        shift = shift + bias.to(cdt)
    view = [1, -1, *([1] * (x.dim() - 2))]
    y = x.to(cdt) * scale.reshape(view) + shift.reshape(view)
    return y.to(x.dtype), mean, var, r, d


def ghost_split_sizes(
    n: int,
    virtual_batch_size: int,
    values_per_sample: int = 1,
    *,
    strict: bool = False,
    owner: str = "ghost_batch_norm",
) -> list[int]:
    """Sizes of the virtual batches a batch of ``n`` samples is cut into (along dim 0).

    Consecutive chunks of ``virtual_batch_size`` samples; when ``n`` is not a multiple, the
    last virtual batch holds the remaining ``n % virtual_batch_size`` samples. If that last
    chunk would have a single value per channel (one sample with ``values_per_sample == 1``),
    whose variance is undefined, it is merged into the previous chunk. A batch smaller than
    ``virtual_batch_size`` is one virtual batch. ``strict=True`` raises ``ValueError`` for a
    batch that is not a multiple of ``virtual_batch_size``.
    """
    v = int(virtual_batch_size)
    if strict and n % v:
        raise ValueError(
            f"{owner}: batch size {n} is not divisible by virtual_batch_size={v}; "
            f"use a multiple of {v}"
        )
    if n <= v:
        return [n]
    sizes = [v] * (n // v)
    rem = n % v
    if rem:
        if rem * values_per_sample == 1:
            sizes[-1] += rem
        else:
            sizes.append(rem)
    return sizes


def ghost_batch_norm_train(
    x: Tensor,
    sizes: list[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """Normalise each virtual batch of ``x`` (cut along dim 0 by ``sizes``) with its own stats.

    Returns ``(y, means, biased_vars, counts)``: ``means`` and ``biased_vars`` are ``(k, C)``
    for the ``k`` virtual batches, ``counts`` the values per channel of each. Gradients flow
    through every virtual batch's statistics, as in BN.
    """
    per_sample = F.count_per_channel(x[:1]) if x.shape[0] else 0
    if len(set(sizes)) == 1 and len(sizes) > 1:
        # Equal chunks: one reshape and one reduction instead of a Python loop.
        k, v = len(sizes), sizes[0]
        xs = x.reshape(k, v, *x.shape[1:]).to(F.compute_dtype(x.dtype))
        dims = [1, *range(3, xs.dim())]
        var, mean = torch.var_mean(xs, dim=dims, correction=0)
        var = var.clamp_min(0)
        view = [k, 1, -1, *([1] * (x.dim() - 2))]
        xhat = (xs - mean.reshape(view)) * torch.rsqrt(var.reshape(view) + eps)
        pv = [1, 1, -1, *([1] * (x.dim() - 2))]
        if weight is not None:
            xhat = xhat * weight.to(xhat.dtype).reshape(pv)
        if bias is not None:
            xhat = xhat + bias.to(xhat.dtype).reshape(pv)
        y = xhat.reshape(x.shape).to(x.dtype)
        return y, mean, var, [v * per_sample] * k
    outs, means, vars_, counts = [], [], [], []
    for chunk in torch.split(x, sizes, dim=0):
        y, m, v = F.batch_norm_train(chunk, weight, bias, eps)
        outs.append(y)
        means.append(m)
        vars_.append(v)
        counts.append(F.count_per_channel(chunk))
    return torch.cat(outs, 0), torch.stack(means), torch.stack(vars_), counts


def pool_virtual_stats(
    means: Tensor, biased_vars: Tensor, counts: list[int]
) -> tuple[Tensor, Tensor]:
    """Pool the virtual batches' statistics into one running-statistics update.

    Returns ``(mean, unbiased_var)``: the count-weighted mean of the virtual batches' means
    (the whole batch's mean) and the count-weighted mean of their **unbiased** variances (each
    an unbiased estimate of the population variance, so their mean is too).
    """
    w = torch.tensor(counts, dtype=means.dtype, device=means.device)
    total = w.sum()
    uvars = torch.stack(
        [F.unbiased_var(biased_vars[i], c) for i, c in enumerate(counts)]
    )
    mean = (means * w[:, None]).sum(0) / total
    var = (uvars * w[:, None]).sum(0) / total
    return mean, var


def masked_batch_stats(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean and **biased** variance of ``x`` ``(N, C, L)`` over the positions where
    the boolean ``mask`` ``(N, L)`` is true, and their count (a 0-dim int64 tensor).

    Tensor ops only (no value is read: one compiled graph serves every mask). Two passes (mean,
    then the squared deviations), so a large common offset does not cancel; padded values never
    enter, NaN/Inf there included. With no valid position the statistics are 0 (count 0).
    Computed in ``promote_types(x.dtype, float32)``. (The formula of
    :func:`bnlab.kernels.masked.batch_stats`, which the layer's kernels share.)
    """
    return _masked.batch_stats(x, mask)


def masked_normalize(
    x: Tensor,
    mask: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` at the valid positions of ``x``
    ``(N, C, L)`` (boolean ``mask`` ``(N, L)``), exactly 0 at padded ones, which get no
    gradient (a ``torch.where``, so NaN/Inf padding cannot leak). Output in ``x.dtype``."""
    return _masked.normalize(x, mask, mean, var, weight, bias, eps)

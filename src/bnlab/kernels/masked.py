"""Masked BN's arithmetic (``bnlab.MaskedBatchNorm1d``): per-channel statistics over the valid
positions of a padded ``(N, C, L)`` batch (a boolean ``(N, L)`` mask), local or over the ranks
of a ``torch.distributed`` group.

Two implementations of the same formulas:

* bnlab's C++ operators (CPU float32/float64, ``(N, C, L)`` contiguous or the transpose of a
  contiguous ``(N, L, C)``, ``csrc/bn_masked.h``): ``torch.ops.bnlab.masked_forward``
  (statistics in one pass of pivoted sums, and the output), ``masked_backward`` (the two
  reductions, and the input gradient), and for given statistics ``masked_normalize`` and
  ``masked_grad_input``; ``masked_forward``, differentiable through the formula registered
  here, is what eager code and graphs both call;
* the tensor ops below (:func:`batch_stats`, :func:`normalize`): differentiable, every device
  and dtype; what ``torch.func`` transforms, forward-mode AD and a forced ``torch`` or
  ``composite`` backend get.

Neither reads a value inside a graph, so one compiled graph serves every mask. The backward
formula is written once (:func:`_grads`): the reductions ``sum(dy)`` and ``sum(dy (x - mean))``
over the valid positions, all-reduced between ranks when the statistics are synchronised
(:func:`train_synced`), then the elementwise input gradient.

:func:`train`, :func:`train_synced` and :func:`evaluate` are the entry points.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import _dispatch, _ops
from .autograd import _DOUBLE_BACKWARD_SYNC, _composed_grads, gather_moments

__all__ = ["batch_stats", "normalize", "train", "train_synced", "evaluate", "MaskedSyncBN"]


def _cdt(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _moments(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(pivot, mean - pivot, deviations, biased_var, count)`` over the valid positions.

    The pivot is each channel's value at the first valid position (no gradient; 0 without
    any): sums of ``x - pivot`` keep float32's digits under a large common offset, where a
    float32 sum of the raw values would not (mean 1e4, std 1e-2 loses the mean's last digits
    and with them the deviations). The deviations (``x - mean``, 0 at padded positions) are a
    second pass, so the variance does not cancel either."""
    cdt = _cdt(x)
    m = mask[:, None, :]
    count = mask.sum()
    if mask.numel() == 0:
        piv = x.new_zeros(x.shape[1], dtype=cdt)
    else:
        # index_select with index tensors: no value read, so graphs do not break here
        first = mask.reshape(-1).to(torch.int32).argmax().reshape(1)
        length = mask.shape[1]
        at = x.detach().index_select(0, first // length).index_select(2, first % length)
        piv = torch.where(count > 0, at.reshape(-1).to(cdt), 0.0)
    xs = torch.where(m, x.to(cdt) - piv[None, :, None], 0.0)
    denom = count.clamp_min(1).to(cdt)
    shift = xs.sum(dim=(0, 2)) / denom
    d = torch.where(m, xs - shift[None, :, None], 0.0)
    return piv, shift, d, (d * d).sum(dim=(0, 2)) / denom, count


def batch_stats(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean and **biased** variance of ``x`` ``(N, C, L)`` over the positions where
    ``mask`` ``(N, L)`` is true, and their count (0-dim int64), as tensor ops: sums shifted by
    a pivot, then squared deviations from the mean (a second pass), so a large common offset
    cancels neither; padded values (NaN/Inf too) never enter; 0 and 0 with no valid position.
    In ``promote_types(x.dtype, float32)``."""
    piv, shift, _, var, count = _moments(x, mask)
    return piv + shift, var, count


def _train_ops(x: Tensor, mask: Tensor, weight: Tensor | None, bias: Tensor | None,
               eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Training-mode masked BN as tensor ops: ``(y, mean, biased_var, count)``. The output is
    scaled from the deviations themselves, not from ``x - mean`` with the mean rounded to
    float32 (whose rounding under an offset of 1e4 is 5% of a std of 1e-2)."""
    piv, shift, d, var, count = _moments(x, mask)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    y = d * scale[None, :, None]
    if bias is not None:
        y = y + bias.to(y.dtype)[None, :, None]
    return torch.where(mask[:, None, :], y, 0.0).to(x.dtype), piv + shift, var, count


def _centred(x: Tensor, mean: Tensor, delta: Tensor | None, cdt: torch.dtype) -> Tensor:
    """``x - mean`` in ``cdt``, the exact mean being ``mean + delta`` (its rounding to
    ``mean.dtype``, from the operators or a synchronised merge): subtracting the stored mean
    first keeps float32's digits under a large common offset."""
    xmu = x.to(cdt) - mean.to(cdt)[None, :, None]
    return xmu if delta is None else xmu - delta.to(cdt)[None, :, None]


def normalize(x: Tensor, mask: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
              bias: Tensor | None, eps: float, delta: Tensor | None = None) -> Tensor:  # fmt: skip
    """``(x - mean) / sqrt(var + eps) * weight + bias`` at the valid positions, exactly 0 (and
    no gradient) at padded ones, as tensor ops (``delta``: see :func:`_centred`). Output in
    ``x.dtype``."""
    m = mask[:, None, :]
    cdt = _cdt(x)
    xmu = torch.where(m, _centred(x, mean, delta, cdt), 0.0)
    scale = torch.rsqrt(var.to(cdt) + eps)
    if weight is not None:
        scale = scale * weight.to(cdt)
    y = xmu * scale[None, :, None]
    if bias is not None:
        y = y + bias.to(cdt)[None, :, None]
    return torch.where(m, y, 0.0).to(x.dtype)


def _grad_sums(dy: Tensor, x: Tensor, mask: Tensor, mean: Tensor,
               delta: Tensor | None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``sum(dy)`` and ``sum(dy (x - mean))`` over the valid positions (tensor ops)."""
    m = mask[:, None, :]
    cdt = mean.dtype
    g = torch.where(m, dy.to(cdt), 0.0)
    xmu = torch.where(m, _centred(x, mean, delta, cdt), 0.0)
    return g.sum(dim=(0, 2)), (g * xmu).sum(dim=(0, 2))


def _grad_input(dy: Tensor, x: Tensor, mask: Tensor, mean: Tensor, delta: Tensor | None,
                invstd: Tensor, weight: Tensor | None, mean_dy: Tensor,
                mean_dy_xmu: Tensor) -> Tensor:  # fmt: skip
    """``weight invstd (dy - mean_dy - (x - mean) invstd^2 mean_dy_xmu)`` at the valid
    positions, 0 at padded ones (tensor ops)."""
    cdt = mean.dtype
    scale = invstd if weight is None else invstd * weight.to(cdt)
    k = (invstd * invstd * mean_dy_xmu)[None, :, None]
    dx = (dy.to(cdt) - mean_dy[None, :, None] - _centred(x, mean, delta, cdt) * k)
    return torch.where(mask[:, None, :], dx * scale[None, :, None], 0.0).to(x.dtype)


def _grads(gy: Tensor, x: Tensor, mask: Tensor, w: Tensor | None, b: Tensor | None,
           mean: Tensor, delta: Tensor | None, invstd: Tensor, count: Tensor | int,
           needed: tuple[bool, ...], native: bool, sync: bool,
           group: Any) -> tuple[Tensor | None, ...]:  # fmt: skip
    """``(dx, dw, db)`` of masked BN with batch statistics: the one backward formula.

    The reductions ``sum(dy)`` and ``sum(dy (x - mean))`` over the valid positions, summed
    over every rank of ``group`` when ``sync`` (one ``all_reduce``), then
    ``dx = w invstd (dy - mean(dy) - (x - mean) invstd^2 mean(dy (x - mean)))`` at the valid
    positions and 0 at padded ones. ``dw``/``db`` are this rank's sums. The exact mean is
    ``mean + delta`` (see :func:`_centred`)."""
    if native and not sync:  # the sums and dx channel by channel, in one call
        dx, s_dy, s_dyx = torch.ops.bnlab.masked_backward(gy, x, mask, mean, delta, invstd, w,
                                                          needed[0])  # fmt: skip
        dx = dx if needed[0] else None
    else:
        if native:
            _, s_dy, s_dyx = torch.ops.bnlab.masked_backward(gy, x, mask, mean, delta, invstd, w,
                                                             False)  # fmt: skip
        else:
            s_dy, s_dyx = _grad_sums(gy, x, mask, mean, delta)
        dx = None
        if needed[0]:
            sums = torch.cat([s_dy, s_dyx])
            if sync:
                # the input gradient needs the sums over every rank's valid positions
                sums = sums.to(torch.float64)
                dist.all_reduce(sums, group=group)
            m_dy, m_dyx = (sums / count).to(mean.dtype).chunk(2)
            grad_input = torch.ops.bnlab.masked_grad_input if native else _grad_input
            dx = grad_input(gy, x, mask, mean, delta, invstd, w, m_dy, m_dyx)
    dw = (s_dyx * invstd).to(w.dtype) if w is not None and needed[1] else None
    db = s_dy.to(b.dtype) if b is not None and needed[2] else None
    return dx, dw, db


def _composed(gy, x, mask, w, b, eps, needed):
    """Double backward: the gradients of the tensor-op composition, with a graph."""

    def forward(x, w, b):
        return (_train_ops(x, mask, w, b, eps)[0],)

    return _composed_grads(forward, (x, w, b), (gy,), needed)


# ---------------------------------------------------------------- the operators
# bnlab::masked_forward is the training forward eager code and graphs both call; its autograd
# formula (_grads) is registered here, as bnlab::train_forward's is in library.py.
def _forward_setup(ctx, inputs, output):
    x, mask, weight, bias, eps, _ = inputs
    _, mean, var, delta = output
    ctx.save_for_backward(x, mask, weight, bias, mean, var, delta)
    ctx.eps = eps


def _forward_backward(ctx, gy, _gmean, _gvar, _gdelta):
    x, mask, w, b, mean, var, delta = ctx.saved_tensors
    needed = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
    if gy is None or gy.numel() == 0:  # no output used (or none made: need_y=False)
        return None, None, None, None, None, None
    if torch.is_grad_enabled():
        dx, dw, db = _composed(gy, x, mask, w, b, ctx.eps, needed)
    else:
        dx, dw, db = _grads(gy, x, mask, w, b, mean, delta, torch.rsqrt(var + ctx.eps),
                            mask.sum(), needed, True, False, None)  # fmt: skip
    return dx, None, dw, db, None, None


def _fake_forward(x, mask, weight, bias, eps, need_y):
    y = torch.empty_like(x) if need_y else x.new_empty(0)
    c = x.shape[1]
    return y, x.new_empty(c), x.new_empty(c), x.new_empty(c)


def _fake_normalize(x, mask, mean, delta, var, weight, bias, eps):
    return torch.empty_like(x)


def _fake_backward(dy, x, mask, mean, delta, invstd, weight, need_dx):
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    return dx, x.new_empty(x.shape[1]), x.new_empty(x.shape[1])


def _fake_grad_input(dy, x, mask, mean, delta, invstd, weight, mean_dy, mean_dy_xmu):
    return torch.empty_like(x)


if _ops._native is not None:
    torch.library.register_fake("bnlab::masked_forward", _fake_forward)
    torch.library.register_autograd("bnlab::masked_forward", _forward_backward,
                                    setup_context=_forward_setup)  # fmt: skip
    torch.library.register_fake("bnlab::masked_normalize", _fake_normalize)
    torch.library.register_fake("bnlab::masked_backward", _fake_backward)
    torch.library.register_fake("bnlab::masked_grad_input", _fake_grad_input)


def _native(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether the operators run ``x``: CPU float32/float64 with at least one value,
    ``(N, C, L)`` contiguous or the transpose of a contiguous ``(N, L, C)``, per-channel
    tensors of its dtype, and no backend forced but ``native``. Unlike unmasked BN (torch's
    kernels in graphs, which inductor fuses with their neighbours), graphs get the operators
    too: inductor's code for the masked tensor ops measured 2-3x the time of torch's compiled
    BN on (64, 128, 200), the operators less than it (``bench/bench_masked.py``)."""
    if x.dim() != 3 or x.numel() == 0:
        return False
    if not _dispatch.native_supports(x.unsqueeze(-1), (weight, bias), capturing=True):
        return False
    if not (x.is_contiguous() or x.transpose(1, 2).is_contiguous()):
        return False
    forced = _dispatch.forced()
    return forced is None or forced == "native"


class MaskedSyncBN(torch.autograd.Function):
    """Masked BN with the statistics of every rank's valid positions: ``(y, mean,
    biased_var)``, the statistics (``stats = (mean, delta, biased_var, count)``, merged by the
    caller; ``delta`` the global mean's rounding to its dtype)
    carrying no gradient. ``native`` runs the operators, else the tensor ops. Backward
    all-reduces ``(sum dy, sum dy (x - mean))`` before the input gradient; parameter gradients
    are this rank's share (DDP sums them), as in :class:`bnlab.SyncBatchNorm`."""

    @staticmethod
    def forward(ctx, x, mask, weight, bias, eps, native, group, stats):
        ctx.set_materialize_grads(False)
        mean, delta, var, count = stats
        if native:
            y = torch.ops.bnlab.masked_normalize(x, mask, mean, delta, var, weight, bias,
                                                 float(eps))  # fmt: skip
        else:
            y = normalize(x, mask, mean, var, weight, bias, eps, delta)
        ctx.save_for_backward(x, mask, weight, bias, mean, delta, torch.rsqrt(var + eps))
        ctx.cfg = (native, group, count)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, gy, _gmean, _gvar):
        x, mask, w, b, mean, delta, invstd = ctx.saved_tensors
        native, group, count = ctx.cfg
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD_SYNC)
        if gy is None:
            gy = torch.zeros_like(x)  # this rank must still join the all_reduce
        needed = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        dx, dw, db = _grads(gy, x, mask, w, b, mean, delta, invstd, count, needed, native, True,
                            group)  # fmt: skip
        return (dx, None, dw, db, None, None, None, None)


# ---------------------------------------------------------------- entry points
def _too_few(owner: str, count: int, where: str) -> ValueError:
    return ValueError(
        f"{owner}: Expected more than 1 valid position per channel when training, got {count} "
        f"{where}; give mask/lengths with at least 2 valid positions in the batch"
    )


def _tensor_ops(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """FX traces, ``torch.func`` transforms, forward AD and a forced ``composite``/``torch``
    backend, or inputs the operators do not take: the tensor ops."""
    if isinstance(x, torch.fx.Proxy) or _dispatch.choose(x, (weight, bias), True) == "composite":
        return True
    return not _native(x, weight, bias)


def train(
    x: Tensor, mask: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, *,
    owner: str = "masked_batch_norm",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Masked BN of ``x`` ``(N, C, L)`` with the statistics of its valid positions (``mask``
    ``(N, L)`` true): ``(y, mean, biased_var, count)``, ``count`` a 0-dim int64 tensor.

    The ``bnlab::masked_forward`` operator (its autograd formula registered) where the C++
    operators take ``x``, in eager code and in graphs alike, else the differentiable tensor
    ops. No value is read in a graph, so one graph serves every mask (a batch of fewer than 2
    valid positions is then the caller's to handle, from ``count``); in eager code a count of
    at most 1 is a ``ValueError`` naming ``owner``, raised before anything is computed."""
    mask = mask.contiguous()
    count = mask.sum()
    if not (_dispatch.capturing() or isinstance(x, torch.fx.Proxy)) and int(count) <= 1:
        raise _too_few(owner, int(count), f"in mask of shape {tuple(mask.shape)}")
    if _tensor_ops(x, weight, bias):
        y, mean, var, _ = _train_ops(x, mask, weight, bias, eps)
        return y, mean, var, count
    y, mean, var, _ = torch.ops.bnlab.masked_forward(x, mask, weight, bias, float(eps), True)
    return y, mean, var, count


def train_synced(
    x: Tensor, mask: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
    group: Any = None, *, owner: str = "masked_batch_norm",
) -> tuple[Tensor, Tensor, Tensor, int]:
    """:func:`train` with the statistics of the valid positions of every rank of ``group``
    (``None``: the default group): ``(y, mean, biased_var, count)`` with the global statistics
    and count, identical on every rank. Outputs at valid positions and the input gradient
    equal one process on the concatenation of every rank's batch; parameter gradients are
    this rank's share. Must be called on every rank, also one whose positions are all padding
    (or that has no sample): its output is zero and it still joins the collectives (one
    ``all_gather`` forward, one ``all_reduce`` backward). A global count of at most 1 raises
    ``ValueError`` on every rank alike. Eager only (it reads the global count).

    The merge is Chan et al.'s of every rank's ``(count, mean, M2)`` in float64
    (:func:`bnlab.kernels.autograd.gather_moments`), not an all-reduce of ``(count, sum x,
    sum x^2)``: ``sum x^2 / n - mean^2`` cancels catastrophically under a large common offset
    (mean 1e4, std 1e-2 in float32 keeps no digit of the variance), while each rank's
    ``M2`` (two-pass or pivoted) and the merge's non-negative terms do not; it is the same one
    collective."""
    native = not _tensor_ops(x, weight, bias)
    mask = mask.contiguous()
    with torch.no_grad():
        if native:
            _, mean, var, delta = torch.ops.bnlab.masked_forward(x, mask, None, None, float(eps),
                                                                 False)  # fmt: skip
            exact = mean.double() + delta.double()
        else:
            piv, shift, _, var, _ = _moments(x, mask)
            mean, exact = piv + shift, piv.double() + shift.double()
        count = mask.sum()
        gmean, gvar, total = gather_moments(count, exact, var.double() * count, group)
    if total <= 1:
        raise _too_few(owner, total, "over all ranks")
    stored = gmean.to(mean.dtype)
    stats = (stored, (gmean - stored.double()).to(mean.dtype), gvar.to(var.dtype), total)
    y, mean, var = MaskedSyncBN.apply(x, mask, weight, bias, float(eps), native, group, stats)
    return y, mean, var, total


def evaluate(x: Tensor, mask: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
             bias: Tensor | None, eps: float) -> Tensor:  # fmt: skip
    """Masked BN of ``x`` with fixed statistics (evaluation): ``masked_normalize`` where the
    operators take the tensors and no gradient is needed (eager), else the tensor ops."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    )
    if not needs_grad and not _dispatch.capturing() and not _tensor_ops(x, weight, bias) and (
        mean.dtype == x.dtype and var.dtype == x.dtype
    ):
        return torch.ops.bnlab.masked_normalize(x, mask.contiguous(), mean, None, var, weight,
                                                bias, float(eps))  # fmt: skip
    return normalize(x, mask, mean, var, weight, bias, eps)

"""The three autograd Functions of bnlab's BN: training, evaluation, and training that keeps
only its output (in-place activated BN). Every eager path goes through one of them:

* :class:`TrainBN` - ``act(BN(x))`` with batch statistics, on the native operators or on
  torch's kernels, with local statistics or with statistics over the ranks of a
  ``torch.distributed`` group (synchronised BN), optionally moving running statistics in the
  same native pass. It saves ``x`` and a few ``(C,)`` values and recomputes the rest.
* :class:`EvalBN` - fixed statistics (no gradient to them).
* :class:`InPlaceBN` - saves only its output and writes it over ``x`` where autograd allows
  (see :mod:`bnlab.kernels.inplace`), local or synchronised.

The gradient formula of the training forward is written once, :func:`train_backward`, and is
also the registered autograd formula of the ``bnlab::train_forward`` operator that graphs
capture (:mod:`bnlab.kernels.library`). Double backward (``create_graph=True``) differentiates
the PyTorch composition of the local forward; synchronised and in-place calls refuse it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import _ops

__all__ = ["TrainBN", "EvalBN", "InPlaceBN", "train_backward", "global_moments", "gather_moments"]

_DOUBLE_BACKWARD_INPLACE = (
    "in-place activated BN (BatchNormAct2d(inplace=True)) does not support double backward "
    "(create_graph=True): it keeps only its output, not the input a second derivative needs; "
    "use inplace=False"
)
_DOUBLE_BACKWARD_SYNC = (
    "synchronised BN does not support double backward (create_graph=True): its statistics "
    "come from every rank"
)
_TAIL = (None,) * 6


def _composed_grads(forward, args, outputs_grads, needed):
    """Gradients of the PyTorch composition ``forward(*args)``, with a graph (double backward)."""
    wanted = [t for t, need in zip(args, needed, strict=True) if need]
    with torch.enable_grad():
        outs = forward(*args)
    pairs = [(o, g) for o, g in zip(outs, outputs_grads, strict=False) if g is not None]
    grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                     create_graph=True, allow_unused=True))  # fmt: skip
    return tuple(next(grads) if need else None for need in needed)


def train_backward(
    impl: str, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor | None,
    invstd: Tensor | None, delta: Tensor | None, thr: Tensor | None, gy: Tensor | None,
    gmean: Tensor | None, gvar: Tensor | None, eps: float, act: str, slope: float,
    needed: tuple[bool, ...],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dweight, dbias)`` of ``(y, mean, biased_var) = act(BN(x))`` with local batch
    statistics, on the native operators (``impl="native"``) or torch's kernels (``"torch"``).

    ``mean``/``invstd`` are the saved statistics (``None``: recomputed from ``x``, as the fused
    layer saves only ``x`` and ``thr``, the per-channel threshold where the pre-activation
    changes sign); ``gmean``/``gvar`` the gradients that reach the returned statistics
    (native only: torch's statistics carry none). With grad mode on (double backward) it
    differentiates the PyTorch composition instead."""
    if torch.is_grad_enabled():

        def forward(x, w, b):
            return _ops.torch_train_forward(x, w, b, eps, act, slope)[:3]

        return _composed_grads(forward, (x, weight, bias), (gy, gmean, gvar), needed[:3])
    if gy is None:
        gy = torch.zeros_like(x)
    if impl == "native":
        dx, dw, db = _ops.native_backward_train(
            gy, x, mean, invstd, delta, thr, weight, None, gmean, gvar, eps, act, slope,
            needed[0],
        )
    else:
        dx, dw, db = _ops.torch_kernels_backward(
            gy, x, mean, invstd, thr, weight, eps, act, slope, tuple(needed[:3])
        )
    return (dx if needed[0] else None, dw if needed[1] and weight is not None else None,
            db if needed[2] and bias is not None else None)  # fmt: skip


@torch.no_grad()
def global_moments(x: Tensor, group: Any) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean, **biased** variance and count over ``x`` on every rank of ``group``.

    Each rank all-gathers ``(count, mean, count * biased_var)`` in float64 and merges them with
    Chan et al.'s formula (:func:`gather_moments`), exact for unequal (and zero) counts. Every
    rank gets identical results; a global count of at most 1 raises ``ValueError`` on every
    rank alike.
    """
    c, dev = x.shape[1], x.device
    n = x.numel() // c if c else 0
    cdt = torch.promote_types(x.dtype, torch.float32)
    if n > 0:
        var, mean = torch.var_mean(x.to(cdt), dim=_ops._dims(x), correction=0)
        m2 = var.double() * n
    else:
        mean = m2 = torch.zeros(c, dtype=torch.float64, device=dev)
    gmean, gvar, total = gather_moments(float(n), mean, m2, group)
    if total <= 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got "
            f"{total} over all ranks (local input size {tuple(x.shape)})"
        )
    return gmean.to(cdt), gvar.to(cdt), total


@torch.no_grad()
def gather_moments(
    count: Tensor | float, mean: Tensor, m2: Tensor, group: Any
) -> tuple[Tensor, Tensor, int]:
    """Merge every rank's per-channel ``(count, mean, m2)`` (``m2`` the sum of squared
    deviations from the rank's own mean) into the global mean and **biased** variance, in
    float64, and the global count.

    One ``all_gather`` of ``2C + 1`` float64 values, merged with Chan et al.'s formula
    ``M2 = sum(M2_i + n_i (mean_i - mean)^2)``: every term is non-negative, so unlike a global
    ``sum x^2 - n mean^2`` it cannot cancel under a large common offset, and it is exact for
    unequal and zero counts. Every rank gets identical results. Must be called on every rank.
    """
    c, dev = mean.shape[0], mean.device
    n = torch.as_tensor(count, dtype=torch.float64, device=dev).reshape(1)
    local = torch.cat([n, mean.double(), m2.double()])
    size = dist.get_world_size(group)
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local, group=group)
    g = torch.stack(parts)
    counts, means, m2s = g[:, :1], g[:, 1 : c + 1], g[:, c + 1 :]
    total = int(counts.sum().item())
    if total <= 0:
        zero = torch.zeros(c, dtype=torch.float64, device=dev)
        return zero, zero, total
    gmean = (counts * means).sum(0) / total
    gm2 = (m2s + counts * (means - gmean) ** 2).sum(0)
    return gmean, (gm2 / total).clamp_min(0), total


def _all_reduce_sums(group: Any, count: int):
    """The cross-rank reduce of ``(sum dy, sum dy xhat)`` that synchronised backward needs."""

    def reduce(packed: Tensor, n: int) -> tuple[Tensor, int]:
        dist.all_reduce(packed, group=group)
        return packed, count

    return reduce


class TrainBN(torch.autograd.Function):
    """``act(BN(x))`` with batch statistics: ``(y, mean, biased_var)``.

    ``impl`` is ``"native"`` (the operators) or ``"torch"`` (torch's kernels, for an activation
    on devices and dtypes the operators do not take; its statistics carry no gradient).
    ``sync = (group, mean, biased_var, count)`` (identity only: the caller applies an
    activation after it) normalises with the statistics of every rank of that process group
    (:func:`global_moments`): parameter gradients are then this rank's share (DDP sums them)
    and the input gradient all-reduces ``(sum dy, sum dy xhat)``.
    ``update`` (native, local) moves running statistics in the same pass.

    Saves ``x``, ``weight`` and ``(C,)`` values: without an activation the statistics, with one
    only the threshold where the pre-activation changes sign (backward recomputes the
    statistics): the fused layer's memory budget.
    """

    # ctx-style forward on purpose: a Function with setup_context binds its arguments with
    # inspect.signature on every call (microseconds that small layers feel)
    @staticmethod
    def forward(ctx, x, weight, bias, eps, act, slope, impl, update=None, sync=None):
        ctx.set_materialize_grads(False)
        ctx.cfg = (eps, act, slope, impl, sync is not None, None if sync is None else sync[0])
        ctx.bias = bias  # a plain reference (the module's parameter): for double backward
        if sync is not None:
            _, mean, var, ctx.count = sync
            if impl == "native":
                y = _ops.native_eval_forward(x, mean, var, weight, bias, "identity", 0.0, eps)
            else:
                y = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
            ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps), None, None)
            ctx.mark_non_differentiable(mean, var)
            return y, mean, var
        if impl == "native":
            y, mean, var, invstd, delta, thr = _ops.native_train_forward(x, weight, bias, eps, act,
                                                                         slope, update)  # fmt: skip
            if act == "identity":
                # mean is an output the caller may modify in place: save a private copy, except
                # for a layer's step (the running update in this pass), whose caller drops the
                # statistics unread (the copy cost 1-2% of a 1-D CNN's eager training step)
                saved = mean if update is not None else mean.detach().clone()
                ctx.save_for_backward(x, weight, saved, invstd, delta, thr)
            else:
                ctx.save_for_backward(x, weight, None, None, None, thr)
            return y, mean, var
        y, mean, var, save_mean, save_invstd = _ops.torch_kernels_forward(x, weight, bias, eps)
        thr = _ops._threshold(save_mean, save_invstd, weight, bias) if act != "identity" else None
        if x.dtype in _ops.LOW_PRECISION:
            # recomputing float32 statistics of a half input would need a float32 copy of x:
            # keep the two (C,) vectors instead
            ctx.save_for_backward(x, weight, save_mean, save_invstd, None, thr)
        else:
            ctx.save_for_backward(x, weight, None, None, None, thr)
        ctx.mark_non_differentiable(mean, var)
        return _ops._act_(y, act, slope), mean, var

    @staticmethod
    def backward(ctx, gy, gmean, gvar):
        x, w, mean, invstd, delta, thr = ctx.saved_tensors
        eps, act, slope, impl, synced, group = ctx.cfg
        needed = ctx.needs_input_grad[:3]
        if not synced:
            if impl == "torch":
                gmean = gvar = None  # torch's statistics carry no gradient
            grads = train_backward(impl, x, w, ctx.bias, mean, invstd, delta, thr, gy, gmean,
                                   gvar, eps, act, slope, needed)  # fmt: skip
            return (*grads, *_TAIL)
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD_SYNC)
        if gy is None:
            gy = torch.zeros_like(x)
        cdt = mean.dtype
        dims = _ops._dims(x)
        xhat = (x.to(cdt) - _ops._shape(mean, x)) * _ops._shape(invstd, x)
        dyc = gy.to(cdt)
        sum_dy, sum_dy_xhat = dyc.sum(dims), (dyc * xhat).sum(dims)
        dx = None
        if needed[0]:
            # the input gradient needs the whole batch's sums: one all_reduce per layer
            packed = torch.cat([sum_dy, sum_dy_xhat]).to(torch.float64)
            dist.all_reduce(packed, group=group)
            g_dy, g_dyx = (packed / ctx.count).to(cdt).chunk(2)
            scale = invstd if w is None else invstd * w.to(cdt)
            dx = (_ops._shape(scale, x) * (dyc - _ops._shape(g_dy, x)
                                           - xhat * _ops._shape(g_dyx, x))).to(x.dtype)  # fmt: skip
        # parameter gradients are this rank's share; DDP (or the caller) sums them
        dw = sum_dy_xhat.to(w.dtype) if w is not None and needed[1] else None
        db = sum_dy.to(w.dtype) if ctx.bias is not None and needed[2] else None
        return (dx, dw, db, *_TAIL)


class EvalBN(torch.autograd.Function):
    """BN (+ activation) with fixed statistics ``mean`` and ``invstd`` (no gradient to them),
    on the native operators."""

    @staticmethod
    def forward(ctx, x, mean, invstd, weight, bias, act, slope):
        y = _ops.native_eval_forward(x, mean, invstd, weight, bias, act, slope)
        ctx.save_for_backward(x, mean, invstd, weight, bias)
        ctx.cfg = (act, slope)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, mean, invstd, w, b = ctx.saved_tensors
        act, slope = ctx.cfg
        needed = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        if torch.is_grad_enabled():

            def forward(x, w, b):
                return (_ops.torch_eval_forward(x, mean, invstd, w, b, act, slope),)

            dx, dw, db = _composed_grads(forward, (x, w, b), (gy,), needed)
            return dx, None, None, dw, db, None, None
        dx, dw, db = _ops.native_backward_eval(gy, x, mean, invstd, w, b, act, slope, needed[0])
        return (dx if needed[0] else None, None, None, dw if needed[1] else None,
                db if needed[2] else None, None, None)  # fmt: skip


class InPlaceBN(torch.autograd.Function):
    """``(y, mean, biased_var)`` keeping only ``y``, the parameters and ``invstd`` (``C``
    values) for backward, ``y`` written over ``x`` when ``overwrite``. ``native`` runs the
    operators (identity / leaky ReLU); otherwise tensor ops (any device, ELU). ``sync``
    synchronises the statistics as in :class:`TrainBN`; ``update`` as there (native, local)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, act, slope, native, overwrite, update=None,
                sync=None):  # fmt: skip
        out = x if overwrite else None
        group = count = None
        if sync is None and native:
            y, mean, var, invstd, _, _ = _ops.native_train_forward(
                x, weight, bias, eps, act, slope, update, out=out
            )
        else:
            if sync is not None:
                group, mean, var, count = sync
                invstd = torch.rsqrt(var + eps)
            else:
                mean, var, invstd = _ops._stats(x, eps)
            y = _ops.torch_eval_forward(x, mean, invstd, weight, bias, act, slope)
            if out is not None:
                y = out.copy_(y)
        if overwrite:
            ctx.mark_dirty(x)
        ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(y, weight, bias, invstd)
        ctx.cfg = (act, slope, native and sync is None, sync is not None, group, count)
        return y, mean, var

    @staticmethod
    def backward(ctx, gy, _gmean, _gvar):
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD_INPLACE)
        y, w, b, invstd = ctx.saved_tensors
        act, slope, native, synced, group, count = ctx.cfg
        needed = ctx.needs_input_grad
        if native:
            dx, dw, db = _ops.native_backward_from_output(gy, y, invstd, w, b, act, slope,
                                                          needed[0])  # fmt: skip
        else:
            reduce = _all_reduce_sums(group, count) if synced else None
            dx, dw, db = _ops.torch_backward_from_output(gy, y, invstd, w, b, act, slope,
                                                         needed[0], reduce)  # fmt: skip
        dw = dw.to(w.dtype) if w is not None and needed[1] else None
        db = db.to(b.dtype) if b is not None and needed[2] else None
        return (dx, dw, db, *(None,) * 7)

"""bnlab's native kernels as ``torch.library`` custom ops, for graphs (compile, export).

Two ops, the two native calls a training step makes:

* ``bnlab::train_forward(x, weight?, bias?, eps, act, slope) -> (y, mean, var, invstd, delta,
  thr)``: batch moments (biased variance), ``y = act(normalise(x))``, and the per-channel
  values backward needs (``thr`` is empty for ``act="identity"``);
* ``bnlab::backward_train(dy, x, mean?, invstd?, delta?, thr?, weight?, bias?, grad_mean?,
  grad_var?, eps, act, slope, need_dx) -> (dx, dw, db)``: the backward reduction and the
  elementwise input gradient in one pass pair (``dx`` is empty when ``need_dx`` is false).

Each has a fake (meta) implementation, so ``torch.compile`` and ``torch.export`` trace them
without running C, and ``train_forward`` has an autograd formula that calls ``backward_train``.
The running-statistics update is not an op: it is a handful of tensor ops on ``(C,)`` values
(:func:`bnlab.functional.running_update`), which graphs capture as they are.

Eager layers do not go through these ops: a ``custom_op`` call costs ~7 us against ~3 us for
the autograd Function of :mod:`bnlab.kernels.api` (measured with torch 2.13, see
``bench/bench_bn.py``), so eager keeps the cheaper path and graphs get the op. Both call the
same C functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ops

__all__ = ["train_forward", "backward_train", "snapshot"]


def _empty(x: Tensor) -> Tensor:
    return x.new_empty(0)


@torch.library.custom_op("bnlab::train_forward", mutates_args=())
def train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: str, slope: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if _ops._layout(x) is None:  # a graph may hand over strides the kernels do not take
        x = x.contiguous()
    y, mean, var, invstd, delta, thr = _ops.native_train_forward(x, weight, bias, eps, act, slope)
    return y, mean, var, invstd, delta, _empty(x) if thr is None else thr


@train_forward.register_fake
def _train_forward_fake(x, weight, bias, eps, act, slope):
    c = x.shape[1]
    stats = [x.new_empty(c) for _ in range(4)]
    return (torch.empty_like(x), *stats, x.new_empty(0 if act == "identity" else c))


@torch.library.custom_op("bnlab::backward_train", mutates_args=())
def backward_train(
    dy: Tensor, x: Tensor, mean: Tensor | None, invstd: Tensor | None, delta: Tensor | None,
    thr: Tensor | None, weight: Tensor | None, bias: Tensor | None, grad_mean: Tensor | None,
    grad_var: Tensor | None, eps: float, act: str, slope: float, need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    if _ops._layout(x) is None:
        x = x.contiguous()
    thr = None if thr is None or thr.numel() == 0 else thr
    dx, dw, db = _ops.native_backward_train(
        dy, x, mean, invstd, delta, thr, weight, bias, grad_mean, grad_var, eps, act, slope,
        need_dx,
    )
    return _empty(x) if dx is None else dx, dw, db


@backward_train.register_fake
def _backward_train_fake(dy, x, mean, invstd, delta, thr, weight, bias, grad_mean, grad_var,
                         eps, act, slope, need_dx):  # fmt: skip
    c = x.shape[1]
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    return dx, x.new_empty(c), x.new_empty(c)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, act, slope = inputs
    _, mean, _, invstd, delta, thr = output
    if act == "identity":
        ctx.save_for_backward(x, weight, bias, mean, invstd, delta, None)
    else:
        # as the eager Function: the fused layer keeps x and one (C,) threshold; backward
        # recomputes the statistics
        ctx.save_for_backward(x, weight, bias, None, None, None, thr)
    ctx.cfg = (eps, act, slope)


def _backward(ctx, gy, gmean, gvar, _ginvstd, _gdelta, _gthr):
    x, weight, bias, mean, invstd, delta, thr = ctx.saved_tensors
    eps, act, slope = ctx.cfg
    needed = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # double backward: differentiate the PyTorch composition
        from .api import _composed_grads

        def forward(x, w, b):
            return _ops.torch_train_forward(x, w, b, eps, act, slope)[:3]

        grads = _composed_grads(forward, (x, weight, bias), (gy, gmean, gvar), needed,
                                (x, weight, bias))  # fmt: skip
        return (*grads, None, None, None)
    if gy is None:
        gy = torch.zeros_like(x)
    dx, dw, db = torch.ops.bnlab.backward_train(
        gy, x, mean, invstd, delta, thr, weight, bias, gmean, gvar, eps, act, slope, needed[0]
    )
    return (dx if needed[0] else None, dw if needed[1] and weight is not None else None,
            db if needed[2] and bias is not None else None, None, None, None)  # fmt: skip


train_forward.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("bnlab::snapshot", mutates_args=())
def _snapshot_op(t: Tensor) -> Tensor:
    return t.clone()


@_snapshot_op.register_fake
def _snapshot_fake(t):
    return torch.empty_like(t)


def snapshot(t: Tensor) -> Tensor:
    """A copy of a buffer (no gradient) that a layer reads before updating it in place.

    Inside a graph it is the opaque ``bnlab::snapshot`` op: AOT autograd's partitioner would
    otherwise recompute a plain copy in backward from the buffer it has already updated, and
    give wrong gradients (Batch Renorm's ``r`` and ``d``; pytorch/pytorch PR #197039 is the
    fix upstream). In eager it is ``t.clone()``.
    """
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return torch.ops.bnlab.snapshot(t)
    return t.clone()

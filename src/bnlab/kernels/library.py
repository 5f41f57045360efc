"""Registrations for bnlab's C++ operators (``csrc/bnlab_ops.cpp``): their fake (meta)
implementations, so ``torch.compile`` and ``torch.export`` trace them without running C, and
the one autograd formula of the training forward.

The operators (``torch.ops.bnlab``):

* ``train_forward(x, weight?, bias?, eps, act, slope) -> (y, mean, var, invstd, delta, thr)``:
  batch moments (biased variance), ``y = act(normalise(x))`` and the per-channel values
  backward needs (``thr`` is empty for the identity). Functional: graphs capture it and its
  autograd formula (:func:`_backward`) is registered here;
* ``train_forward_update(...)``: the same with the running update (and optionally the output
  written over ``x``) in the same pass, for eager layers (:mod:`bnlab.kernels.autograd`);
* ``backward(dy, x, mean?, invstd?, delta?, thr?, weight?, bias?, grad_mean?, grad_var?, eps,
  act, slope, train, need_dx) -> (dx, dw, db)``: the backward reduction and the elementwise
  input gradient (``dx`` empty unless ``need_dx``);
* ``eval_forward(x, mean, invstd, weight?, bias?, act, slope, eps) -> y``: fixed statistics;
* ``empty_like(x)``: an output buffer as the operators allocate them.

``act`` is an integer code here (:data:`bnlab.kernels._ops.ACT_CODES`). The running-statistics
update inside graphs is not an op: it is a handful of tensor ops on ``(C,)`` values
(:func:`bnlab.functional.running_update`), which graphs capture as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ops

__all__ = ["train_forward", "snapshot", "available"]


def available() -> bool:
    """Whether the C++ operators are loaded (the extension imported)."""
    return _ops._native is not None


def _fake_train(x, weight, bias, eps, act, slope):
    c = x.shape[1]
    stats = [x.new_empty(c) for _ in range(4)]
    return (torch.empty_like(x), *stats, x.new_empty(0 if act == 0 else c))


def _fake_backward(dy, x, mean, invstd, delta, thr, weight, bias, grad_mean, grad_var, eps, act,
                   slope, train, need_dx):  # fmt: skip
    c = x.shape[1]
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    return dx, x.new_empty(c), x.new_empty(c)


def _fake_eval(x, mean, invstd, weight, bias, act, slope, eps):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, act, slope = inputs
    _, mean, _, invstd, delta, thr = output
    if act == 0:
        ctx.save_for_backward(x, weight, bias, mean, invstd, delta, None)
    else:
        # the fused layer keeps x and one (C,) threshold; backward recomputes the statistics
        ctx.save_for_backward(x, weight, bias, None, None, None, thr)
    ctx.cfg = (eps, act, slope)


def _backward(ctx, gy, gmean, gvar, _ginvstd, _gdelta, _gthr):
    from .autograd import train_backward  # the one formula, shared with the eager Function

    x, weight, bias, mean, invstd, delta, thr = ctx.saved_tensors
    eps, act, slope = ctx.cfg
    name = next(k for k, v in _ops.ACT_CODES.items() if v == act)
    dx, dw, db = train_backward(
        "native", x, weight, bias, mean, invstd, delta, thr, gy, gmean, gvar, eps, name, slope,
        ctx.needs_input_grad[:3],
    )
    return dx, dw, db, None, None, None


if available():
    torch.library.register_fake("bnlab::train_forward", _fake_train)
    torch.library.register_fake("bnlab::backward", _fake_backward)
    torch.library.register_fake("bnlab::eval_forward", _fake_eval)
    torch.library.register_autograd("bnlab::train_forward", _backward,
                                    setup_context=_setup_context)  # fmt: skip


def train_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: str, slope: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``act(BN(x))`` through the functional operator (graphs): ``(y, mean, biased_var)``."""
    if _ops._layout(x) is None:  # a graph may hand over strides the kernels do not take
        x = x.contiguous()
    y, mean, var, *_ = torch.ops.bnlab.train_forward(x, weight, bias, float(eps),
                                                     _ops.ACT_CODES[act], float(slope))  # fmt: skip
    return y, mean, var


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

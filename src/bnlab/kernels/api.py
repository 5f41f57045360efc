"""Autograd functions over the BN primitives of :mod:`bnlab.kernels._ops`.

They save only the input and the per-channel statistics for backward and recompute the rest
(the normalised values and the activation mask), on the native kernels when
:func:`bnlab.kernels.supports` the tensors, otherwise on the PyTorch versions of the same
primitives. Double backward (``create_graph=True``) differentiates the PyTorch composition.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from . import _ops, supports

Act = Literal["identity", "relu", "leaky_relu"]

__all__ = ["batch_norm_train", "normalize", "batch_norm_act_train", "normalize_act", "Act"]


def _impl(native: bool):
    """``(train_forward, backward_train, eval_forward, backward_eval)`` of one backend."""
    if native:
        return (_ops.native_train_forward, _ops.native_backward_train,
                _ops.native_eval_forward, _ops.native_backward_eval)  # fmt: skip
    return (_ops.torch_train_forward, _ops.torch_backward_train,
            _ops.torch_eval_forward, _ops.torch_backward_eval)  # fmt: skip


def _composed_grads(forward, args, outputs_grads, needed, inputs):
    """Gradients of the PyTorch composition ``forward(*args)``, with a graph (double backward)."""
    wanted = [t for t, need in zip(inputs, needed, strict=True) if need]
    with torch.enable_grad():
        outs = forward(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, outputs_grads, strict=False) if g is not None]
    grads = iter(
        torch.autograd.grad(
            [o for o, _ in pairs], wanted, [g for _, g in pairs],
            create_graph=True, allow_unused=True,
        )  # fmt: skip
    )
    return tuple(next(grads) if need else None for need in needed)


class _TrainFn(torch.autograd.Function):
    """Training BN (+ activation): outputs ``(y, mean, biased_var)``, all differentiable.

    Saves ``x`` and ``weight`` and, without an activation, the ``(C,)`` statistics (mean,
    invstd, the mean's rounding), so backward needs two reductions; with an activation only
    one ``(C,)`` threshold (the bias only moves it), and backward recomputes the statistics
    as well as the mask from ``x`` (the fused layer's memory budget: at most half the bytes
    eager BN + activation saves).
    Double backward differentiates the PyTorch composition and needs ``bias`` itself, which is
    then kept as a plain reference (it is the module's parameter: no extra memory).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, act, slope, native, update=None):
        y, mean, var, invstd, delta, thr = _impl(native)[0](x, weight, bias, eps, act, slope,
                                                            update)  # fmt: skip
        ctx.set_materialize_grads(False)
        if act == "identity":
            # mean is an output the caller may modify in place: save a private copy (C
            # values); invstd and delta are not returned
            ctx.save_for_backward(x, weight, mean.detach().clone(), invstd, delta, thr)
        else:
            ctx.save_for_backward(x, weight, None, None, None, thr)
        ctx.bias = bias
        ctx.cfg = (eps, act, slope, native)
        return y, mean, var

    @staticmethod
    def backward(ctx, gy, gmean, gvar):
        x, w, mean, invstd, delta, thr = ctx.saved_tensors
        b = ctx.bias
        eps, act, slope, native = ctx.cfg
        needed = ctx.needs_input_grad[:3]
        tail = (None, None, None, None, None)
        if torch.is_grad_enabled():

            def forward(x, w, b):
                return _ops.torch_train_forward(x, w, b, eps, act, slope)[:3]

            grads = _composed_grads(forward, (x, w, b), (gy, gmean, gvar), needed, (x, w, b))
            return (*grads, *tail)
        if gy is None:
            gy = torch.zeros_like(x)
        dx, dw, db = _impl(native)[1](
            gy, x, mean, invstd, delta, thr, w, None, gmean, gvar, eps, act, slope, needed[0]
        )
        return dx, dw if needed[1] else None, db if needed[2] else None, *tail


class _EvalFn(torch.autograd.Function):
    """BN (+ activation) with fixed statistics ``mean`` and ``invstd`` (no gradient to them)."""

    @staticmethod
    def forward(ctx, x, mean, invstd, weight, bias, act, slope, native):
        y = _impl(native)[2](x, mean, invstd, weight, bias, act, slope)
        ctx.save_for_backward(x, mean, invstd, weight, bias)
        ctx.cfg = (act, slope, native)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, mean, invstd, w, b = ctx.saved_tensors
        act, slope, native = ctx.cfg
        needed = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        tail = (None, None, None)
        if torch.is_grad_enabled():

            def forward(x, w, b):
                return _ops.torch_eval_forward(x, mean, invstd, w, b, act, slope)

            dx, dw, db = _composed_grads(forward, (x, w, b), (gy,), needed, (x, w, b))
            return dx, None, None, dw, db, *tail
        dx, dw, db = _impl(native)[3](gy, x, mean, invstd, w, b, act, slope, needed[0])
        return dx, None, None, dw if needed[1] else None, db if needed[2] else None, *tail


def _check_act(act: str, owner: str) -> None:
    if act not in _ops.ACT_CODES:
        raise ValueError(f"{owner}: act must be one of {sorted(_ops.ACT_CODES)}, got {act!r}")


def batch_norm_act_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    act: Act = "relu",
    negative_slope: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor]:
    """``act(BN(x))`` with batch statistics. Returns ``(y, mean, biased_var)``.

    Saves only ``x``, ``weight`` and a few ``(C,)`` statistics for backward.
    Runs on the native kernels when :func:`bnlab.kernels.supports` ``x``, else on PyTorch.
    """
    _check_act(act, "batch_norm_act_train")
    native = supports(x, weight, bias)
    return _TrainFn.apply(x, weight, bias, float(eps), act, float(negative_slope), native)


def batch_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN without activation; see :func:`bnlab.functional.batch_norm_train`."""
    return batch_norm_act_train(x, weight, bias, eps, "identity")


def batch_norm_act_train_update(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    act: Act,
    negative_slope: float,
    update: _ops.RunningUpdate,
) -> Tensor:
    """``act(BN(x))`` with batch statistics, moving the running statistics in the same native
    call (one pass fewer over Python for a layer's whole training step); ``update.finite``
    tells whether they moved. The caller has checked :func:`supports` for ``x``, the
    parameters and the running buffers."""
    return _TrainFn.apply(x, weight, bias, float(eps), act, float(negative_slope), True,
                          update)[0]  # fmt: skip


def supports_eval(x: Tensor, mean: Tensor, var: Tensor, weight, bias) -> bool:
    """Native evaluation applies when :func:`supports` does and no gradient reaches the stats."""
    stats_need_grad = torch.is_grad_enabled() and (mean.requires_grad or var.requires_grad)
    return not stats_need_grad and supports(x, mean, var, weight, bias)


def normalize_act(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    act: Act = "relu",
    negative_slope: float = 0.01,
) -> Tensor:
    """``act((x - mean) / sqrt(var + eps) * weight + bias)`` with given statistics."""
    _check_act(act, "normalize_act")
    if supports_eval(x, mean, var, weight, bias):
        return _normalize_act_native(x, mean, var, weight, bias, eps, act, negative_slope)
    cdt = torch.promote_types(x.dtype, torch.float32)
    invstd = torch.rsqrt(var.to(cdt) + eps)
    return _ops.torch_eval_forward(x, mean, invstd, weight, bias, act, negative_slope)


def _normalize_act_native(x, mean, var, weight, bias, eps, act, slope) -> Tensor:
    """Native evaluation BN; the caller has checked :func:`supports_eval`."""
    if not torch.is_grad_enabled() or not (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        # Nothing to differentiate (inference): the kernel alone, no autograd node, and the
        # kernel takes 1/sqrt(var + eps) itself.
        return _ops.native_eval_forward(x, mean, var, weight, bias, act, slope, eps)
    invstd = torch.rsqrt(var.detach() + eps)
    # A copy of the mean: the caller's tensor is often a running buffer that the layer
    # updates in place before backward runs (normalize_with="running"); saving it would
    # trip autograd's version check. It is (C,) values, so the copy costs nothing.
    return _EvalFn.apply(x, mean.detach().clone(), invstd, weight, bias, act, slope, True)


def normalize(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """Evaluation-mode BN on the native kernels; see :func:`bnlab.functional.normalize`."""
    return normalize_act(x, mean, var, weight, bias, eps, "identity")

"""In-place activated BN: ``act(BN(x))`` that keeps only its output for backward.

The idea of In-Place ABN (Rota Bulo, Porzi and Kontschieder, CVPR 2018): in a network, the
layer after a BN + activation (a convolution) saves that output for its own backward anyway.
If BN's backward can work from the output too, the input need not be kept at all, and the
output may even be written over the input. For an invertible activation (identity, leaky ReLU
with a positive slope, ELU) the pre-activation is ``z = act^-1(y)`` and the normalised input
``xhat = (z - bias) / weight``, which is all BN's backward needs besides ``(C,)`` statistics.

Rules a user can rely on:

* **Exact gradients for every weight.** Recovering ``xhat`` divides by ``weight``. A call in
  which some ``|weight|`` is below :data:`MIN_WEIGHT` (a zero-initialised residual branch, a
  channel pruned by L1 decay) saves its input instead, as the plain fused layer does: the
  gradients stay exact and only that call's memory saving is lost. Above it, the
  reconstruction error is about ``u |bias| / |weight|`` per element (``u`` the unit
  roundoff: 6e-8 in float32), i.e. at most 6e-5 of ``xhat``'s scale at the threshold.
* **The output is written over the input where autograd allows it**: not for a leaf that
  requires grad, a view, an inference tensor outside inference mode, or a layout the kernels
  do not take (then a new tensor, still the only one saved). As with ``ReLU(inplace=True)``,
  a tensor that another operation saved for its backward (the output of ``exp``, ``sigmoid``,
  ``relu``...) may not be overwritten: autograd raises "modified by an inplace operation" in
  backward rather than computing anything wrong.
* **Double backward is refused** with an error (the input it would differentiate is gone).
* In graphs (``torch.compile``, ``torch.export``) and under ``torch.func`` transforms the
  layer runs as the plain fused one (functional, saves its input; the compiler plans memory).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ops, supports

__all__ = ["MIN_WEIGHT", "INVERTIBLE", "train_inplace", "can_overwrite", "weights_invertible"]

#: Below this ``|weight|`` (any channel) a call saves its input instead of recovering it.
MIN_WEIGHT = 1e-3
#: Activations whose output determines their input (``elu`` with ``alpha = slope``).
INVERTIBLE = ("identity", "leaky_relu", "elu")
_NATIVE_ACTS = ("identity", "leaky_relu")

_DOUBLE_BACKWARD = (
    "in-place activated BN (BatchNormAct2d(inplace=True)) does not support double backward "
    "(create_graph=True): it keeps only its output, not the input a second derivative needs; "
    "use inplace=False"
)


def can_overwrite(x: Tensor) -> bool:
    """Whether autograd lets a function write its output over ``x``."""
    if x.requires_grad and x.is_leaf:
        return False
    if x._base is not None:  # a view: its base may be saved, and mark_dirty rules are strict
        return False
    return not (x.is_inference() and not torch.is_inference_mode_enabled())


def weights_invertible(weight: Tensor | None) -> bool:
    """Every ``|weight| >= MIN_WEIGHT`` (no weight: the identity scale). Reads one value."""
    if weight is None:
        return True
    return bool(weight.detach().abs().min() >= MIN_WEIGHT)


class _InPlaceTrainFn(torch.autograd.Function):
    """``(y, mean, biased_var)``; saves ``y``, the parameters and ``invstd`` (``C`` values)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, act, slope, native, overwrite, update=None):
        out = x if overwrite else None
        if native:
            y, mean, var, invstd, _, _ = _ops.native_train_forward(
                x, weight, bias, eps, act, slope, update, out=out
            )
        else:
            mean, var, invstd = _ops._stats(x, eps)
            y = _ops.torch_eval_forward(x, mean, invstd, weight, bias, act, slope)
            if out is not None:
                y = out.copy_(y)
        if overwrite:
            ctx.mark_dirty(x)
        ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(y, weight, bias, invstd)
        ctx.cfg = (act, slope, native)
        return y, mean, var

    @staticmethod
    def backward(ctx, gy, _gmean, _gvar):
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD)
        y, w, b, invstd = ctx.saved_tensors
        act, slope, native = ctx.cfg
        needed = ctx.needs_input_grad
        if native:
            dx, dw, db = _ops.native_backward_from_output(gy, y, invstd, w, b, act, slope,
                                                          needed[0])  # fmt: skip
        else:
            dx, dw, db = _ops.torch_backward_from_output(gy, y, invstd, w, b, act, slope,
                                                         needed[0])  # fmt: skip
        dw = dw.to(w.dtype) if w is not None and needed[1] else None
        db = db.to(b.dtype) if b is not None and needed[2] else None
        return dx, dw, db, None, None, None, None, None, None


def train_inplace(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: str, slope: float,
    update: _ops.RunningUpdate | None = None,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """``act(BN(x))`` with batch statistics, saving only the output: ``(y, mean, biased_var)``,
    or ``None`` when this call must save its input instead (a ``|weight|`` below
    :data:`MIN_WEIGHT`); then the caller runs the plain fused path. Eager only.

    ``update`` (native kernels only) moves running statistics in the same call, as
    :func:`bnlab.kernels.api.batch_norm_act_train_update`.
    """
    if act not in INVERTIBLE:
        raise ValueError(f"train_inplace: act must be one of {list(INVERTIBLE)}, got {act!r}")
    if not weights_invertible(weight):
        return None
    native = act in _NATIVE_ACTS and supports(x, weight, bias)
    if update is not None and not native:
        raise ValueError("train_inplace: the in-forward running update is native-only")
    overwrite = can_overwrite(x)
    return _InPlaceTrainFn.apply(x, weight, bias, float(eps), act, float(slope), native,
                                 overwrite, update)  # fmt: skip

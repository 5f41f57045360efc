"""torch's own batch-norm kernels behind bnlab's policy (the backend named ``"torch"``).

Training calls torch's kernel without its running update (``native_batch_norm`` with
temporary buffers, or none), so bnlab's running policy (moving average, cumulative, window, the
non-finite guard) decides what the statistics do. The speed, the devices, autocast and the
graph behaviour are torch's own: inside ``torch.compile`` a plain layer's step is torch's
``native_batch_norm``, which inductor decomposes and fuses as it does torch's own BN, and the
running update from its saved statistics in a few ``(C,)`` ops that keep NaN/Inf out. The
statistics it returns carry no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import Tensor

from .. import _dispatch, _ops
from .._dispatch import capturing as _capturing
from ..autograd import TrainBN

NAME = "torch"

# (bound once: a traced step reads no module attributes, so dynamo guards one object each and
# no "same module reached twice" check, which runs in Python on every call of the graph)
_native_batch_norm = torch.native_batch_norm
_isfinite = torch.isfinite
_where = torch.where


def supports(x: Tensor, per_channel: tuple, train: bool) -> bool:
    return _dispatch.torch_supports(x, per_channel)


def train(x, weight, bias, eps, act, slope) -> tuple[Tensor, Tensor, Tensor]:
    if act != "identity" and torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    ) and not _capturing():
        # the fused layer's memory budget: x and one (C,) threshold, not x and BN's output
        return TrainBN.apply(x, weight, bias, float(eps), act, float(slope), "torch")
    y, mean, var, _, _ = _ops.torch_kernels_forward(x, weight, bias, eps)
    return _ops._act_(y, act, slope), mean, var


def evaluate(x, mean, var, weight, bias, eps, act, slope) -> Tensor:
    y = TF.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
    return _ops._act_(y, act, slope)


def step(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, act,
         slope, inplace):  # fmt: skip
    """A plain layer's training step on torch's kernels with the running update (``momentum``
    ``None``: the cumulative average), guarded so no NaN/Inf batch enters the statistics;
    ``None`` for what it does not cover (an activation, in-place ABN, a cumulative average
    inside a graph), which the caller runs generically."""
    if inplace or act != "identity":
        return None
    if _capturing():
        if momentum is None:
            return None
        # torch's kernel without its running update (so nothing it saves for backward is
        # modified after it), then the update from its saved statistics as running_update_
        # does in eager, kept out where they are not finite: (C,) ops inductor fuses (measured
        # ~1% faster on a small MLP than torch's update on copies of the buffers)
        y, mean, invstd = _native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        n = x.numel() // x.shape[1]
        ok = (_isfinite(mean) & _isfinite(invstd) & (invstd > 0)).all()
        rm, rv = running_mean, running_var
        var = (invstd.double().reciprocal().square() - eps).clamp_min(0) * (n / (n - 1))
        new_mean = rm + momentum * (mean.to(rm.dtype) - rm)
        new_var = rv + momentum * (var.to(rv.dtype) - rv)
        rm.copy_(_where(ok, new_mean, rm))
        rv.copy_(_where(ok, new_var, rv))
        num_batches_tracked.add_(ok.to(num_batches_tracked.dtype))
        return y, ok
    rdt = running_mean.dtype
    if (
        _ops._native is None
        or rdt not in (torch.float32, torch.float64)
        or running_var.dtype is not rdt
        or not (x.dtype is rdt or x.dtype in _ops.LOW_PRECISION and rdt is torch.float32
                and weight is not None and weight.dtype is rdt)
        or not x.is_cpu
        or not (running_mean.is_contiguous() and running_var.is_contiguous())
    ):
        return None
    # torch's kernel and autograd node for y; the running update (and the count) from its
    # saved statistics in one small operator that refuses NaN/Inf (var = 1/invstd^2 - eps).
    # A bfloat16/half input beside float32 parameters (autocast) gets torch's mixed kernel,
    # whose statistics are float32 like the running buffers (without parameters torch's
    # kernel would compute them in the input's dtype: the generic path handles that case).
    y, mean, invstd = _native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    n = x.numel() // x.shape[1]
    finite = _ops._RUNNING(running_mean, running_var, num_batches_tracked, mean, invstd,
                           -1.0 if momentum is None else momentum,
                           n / (n - 1) if n > 1 else 1.0, eps)  # fmt: skip
    return y, finite

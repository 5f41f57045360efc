"""torch's own batch-norm kernels (``torch.nn.functional.batch_norm``) behind bnlab's policy.

Training calls torch's kernel with temporary ``(C,)`` running buffers and ``momentum=1``, so
the one call that normalises also hands back the batch mean and unbiased variance; bnlab's
running policy (moving average, cumulative, window, the non-finite guard) then uses them.
The speed, the devices, autocast and the graph behaviour are torch's own. The statistics it
returns carry no gradient (torch's kernel does not differentiate them); the output does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import Tensor

from .. import _ops

NAME = "aten"
_LOW = (torch.float16, torch.bfloat16)


def supports(x: Tensor, per_channel: tuple, train: bool) -> bool:
    # torch's CPU/GPU kernels take per-channel tensors of x's dtype, or float32 beside a
    # half/bfloat16 input (mixed precision); anything else goes to the composite backend.
    if not x.is_floating_point() or x.dim() < 2:
        return False
    for t in per_channel:
        if t is not None and t.dtype != x.dtype and not (
            x.dtype in _LOW and t.dtype == torch.float32
        ):
            return False
    return True


def _act(y: Tensor, act: str, slope: float) -> Tensor:
    # In place when nothing is recorded for backward (batch_norm's backward does not need y);
    # otherwise the activation would save the very tensor a user's in-place op changes next.
    inplace = isinstance(y, Tensor) and not (torch.is_grad_enabled() and y.requires_grad)
    if act == "relu":
        # clamp_min's backward reads its input, not its output: in-place ops on the output
        # (another ReLU(inplace=True), a residual +=) stay legal, as on the native backend
        return torch.relu_(y) if inplace else y.clamp_min(0)
    if act == "leaky_relu":
        return TF.leaky_relu(y, slope, inplace=inplace)
    return y


def _stats_dtype(x: Tensor, per_channel: tuple) -> torch.dtype:
    ref = next((t for t in per_channel if t is not None), None)
    return x.dtype if ref is None else ref.dtype


class _ActTrain(torch.autograd.Function):
    """``act(BN(x))`` on torch's kernels, keeping only ``x`` and ``(C,)`` values for backward.

    Forward is ``torch.native_batch_norm`` plus the activation in place; backward recomputes
    the activation's mask from ``x`` and a per-channel threshold (where the pre-activation
    changes sign), recomputes the ``(C,)`` statistics and calls ``native_batch_norm_backward``:
    the fused layer's memory budget (``x``, ``weight`` and one ``(C,)`` threshold) on every
    device, for one extra read of ``x`` and one elementwise pass in backward.
    """

    # ctx-style forward on purpose: a Function with setup_context binds its arguments with
    # inspect.signature on every call (tens of microseconds); torch.func never reaches this
    # Function (the registry sends transforms to the composite backend)
    @staticmethod
    def forward(ctx, x, weight, bias, eps, act, slope, mean_buf, var_buf):
        y, save_mean, save_invstd = torch.native_batch_norm(
            x, weight, bias, mean_buf, var_buf, True, 1.0, eps
        )
        thr = _ops._threshold(save_mean, save_invstd, weight, bias)
        if x.dtype in _LOW:
            # recomputing float32 statistics of a half input would need a float32 copy of x:
            # keep the two (C,) vectors instead (nothing against x's size)
            ctx.save_for_backward(x, weight, thr, save_mean, save_invstd)
        else:
            ctx.save_for_backward(x, weight, thr)
        ctx.cfg = (eps, act, slope, bias is not None)
        return _act(y, act, slope)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, weight, thr, *stats = ctx.saved_tensors
        eps, act, slope, has_bias = ctx.cfg
        if stats:
            save_mean, save_invstd = stats
        else:  # torch's one-pass statistics kernel: the same numbers native_batch_norm saved
            save_mean, save_var = torch.batch_norm_update_stats(x, None, None, 0.0)
            save_invstd = torch.rsqrt(save_var + eps)
        shape = [1, -1] + [1] * (x.dim() - 2)
        sign = 1.0 if weight is None else torch.where(weight < 0, -1.0, 1.0).to(thr.dtype)
        pre = (x.to(thr.dtype) - thr.reshape(shape)) * (sign if weight is None
                                                         else sign.reshape(shape))  # fmt: skip
        g = torch.where(pre > 0, gy, gy * slope if act == "leaky_relu" else 0).to(gy.dtype)
        needed = ctx.needs_input_grad
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            g, x, weight, None, None, save_mean, save_invstd, True, eps,
            [needed[0], weight is not None and needed[1], has_bias and needed[2]],
        )  # fmt: skip
        return dx, dw, db, None, None, None, None, None


def train(x, weight, bias, eps, act, slope) -> tuple[Tensor, Tensor, Tensor]:
    c = x.shape[1]
    # torch's kernel wants running buffers of the parameters' dtype (a bfloat16 model keeps
    # bfloat16 ones); without parameters, the statistics of a half input stay float32
    dtype = _stats_dtype(x, (weight, bias))
    if weight is None and bias is None and x.dtype in _LOW:
        dtype = torch.float32
    with torch.no_grad():
        mean = torch.zeros(c, dtype=dtype, device=x.device)
        uvar = torch.ones(c, dtype=dtype, device=x.device)
    n = x.numel() // c
    if act == "identity" or not torch.is_grad_enabled():
        y = _act(TF.batch_norm(x, mean, uvar, weight, bias, True, 1.0, eps), act, slope)
    else:
        y = _ActTrain.apply(x, weight, bias, eps, act, slope, mean, uvar)
    var = uvar * ((n - 1) / n) if n > 1 else uvar
    return y, mean, var


def evaluate(x, mean, var, weight, bias, eps, act, slope) -> Tensor:
    y = TF.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
    return _act(y, act, slope)

"""bnlab's C++ operators (``torch.ops.bnlab``): CPU float32/float64, contiguous or channels-last
(and bfloat16 activations beside float32 parameters for a plain layer's step and evaluation).

Eager calls run :class:`bnlab.kernels.autograd.TrainBN` / ``EvalBN`` over the operators (a
layer's step moves its running statistics in the same pass); inside ``torch.compile`` and
``torch.export`` (when forced: ``use_backend("native")``) training is the functional
``bnlab::train_forward`` operator with its registered autograd formula. Evaluation inside a
graph is left to torch's kernels (inductor fuses it; ONNX shows ``BatchNormalization``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _dispatch, _ops, library
from ..autograd import EvalBN, InPlaceBN, TrainBN
from ..inplace import can_overwrite, weights_invertible

NAME = "native"


def supports(x: Tensor, per_channel: tuple, train: bool) -> bool:
    return _dispatch.native_supports(x, per_channel, _dispatch.capturing())


def train(x, weight, bias, eps, act, slope) -> tuple[Tensor, Tensor, Tensor]:
    if _dispatch.capturing():
        return library.train_forward(x, weight, bias, eps, act, slope)
    return TrainBN.apply(x, weight, bias, float(eps), act, float(slope), "native")


def evaluate(x, mean, var, weight, bias, eps, act, slope) -> Tensor:
    grads = torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )
    if grads and act != "identity" and x.dtype is torch.bfloat16:
        from . import aten  # the bf16 operators' backward knows the identity only

        return aten.evaluate(x, mean, var, weight, bias, eps, act, slope)
    if not torch.is_grad_enabled() or not (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        # nothing to differentiate (inference): the operator alone, which takes
        # 1 / sqrt(var + eps) itself
        return _ops.native_eval_forward(x, mean, var, weight, bias, act, slope, eps)
    invstd = torch.rsqrt(var.detach() + eps)
    # a copy of the mean: the caller's tensor is often a running buffer that the layer updates
    # in place before backward runs (normalize_with="running")
    return EvalBN.apply(x, mean.detach().clone(), invstd, weight, bias, act, float(slope))


def step(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, act,
         slope, inplace):  # fmt: skip
    """The eager training step with the running update in the same native pass."""
    if _dispatch.capturing() or not (running_mean.is_contiguous() and running_var.is_contiguous()):
        return None
    if inplace and (not weights_invertible(weight) or act not in ("identity", "leaky_relu")):
        return None  # saves its input this call (the plain fused path), or tensor ops
    if x.dtype is torch.bfloat16 and (inplace or act != "identity"):
        return None  # the bf16 operators train the identity only: torch's kernels do the rest
    n = x.numel() // x.shape[1]
    factor = 1.0 / (int(num_batches_tracked) + 1) if momentum is None else momentum
    update = _ops.RunningUpdate(running_mean, running_var, factor, n / (n - 1) if n > 1 else 1.0)
    if inplace:
        y = InPlaceBN.apply(x, weight, bias, float(eps), act, float(slope), True,
                            can_overwrite(x), update)[0]  # fmt: skip
    else:
        y = TrainBN.apply(x, weight, bias, float(eps), act, float(slope), "native", update)[0]
    if update.finite:
        num_batches_tracked.add_(1)
    return y, update.finite

"""BN as plain differentiable tensor ops: runs everywhere, under every ``torch.func``
transform (vmap, jvp, grad) and forward-mode AD, and differentiates its statistics."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ops

NAME = "composite"


def supports(x: Tensor, per_channel: tuple, train: bool) -> bool:
    return True


def train(x, weight, bias, eps, act, slope) -> tuple[Tensor, Tensor, Tensor]:
    return _ops.torch_train_forward(x, weight, bias, eps, act, slope)[:3]


def evaluate(x, mean, var, weight, bias, eps, act, slope) -> Tensor:
    invstd = torch.rsqrt(var.to(_ops._cdt(x)) + eps)
    return _ops.torch_eval_forward(x, mean, invstd, weight, bias, act, slope)

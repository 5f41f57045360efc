"""A naive float64 reference for Batch Normalization, written from the paper's formulas."""

from __future__ import annotations

import torch


def ref_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance in float64 by explicit sums."""
    xd = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
    n = xd.shape[1]
    mean = xd.sum(dim=1) / n
    var = ((xd - mean[:, None]) ** 2).sum(dim=1) / n
    return mean, var


def ref_bn(x, mean, var, weight=None, bias=None, eps=1e-5):
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (x.double() - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.double().view(shape) + bias.double().view(shape)
    return y


def ref_bn_backward(x, dy, weight, eps=1e-5):
    """Input gradient of training-mode BN (float64), from the paper's backward formulas."""
    mean, var = ref_stats(x)
    shape = [1, -1] + [1] * (x.dim() - 2)
    dims = [0, *range(2, x.dim())]
    n = x.numel() // x.shape[1]
    invstd = 1.0 / torch.sqrt(var + eps)
    xhat = (x.double() - mean.view(shape)) * invstd.view(shape)
    g = torch.ones_like(mean) if weight is None else weight.double()
    dxhat = dy.double() * g.view(shape)
    s1 = dxhat.sum(dims)
    s2 = (dxhat * xhat).sum(dims)
    dx = (dxhat - s1.view(shape) / n - xhat * s2.view(shape) / n) * invstd.view(shape)
    dgamma = (dy.double() * xhat).sum(dims)
    dbeta = dy.double().sum(dims)
    return dx, dgamma, dbeta

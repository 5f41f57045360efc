"""Named conversions from Keras' BatchNormalization conventions to bnlab's (PyTorch's).

Keras 3 ``BatchNormalization(momentum=0.99, epsilon=1e-3)``: momentum is the weight of the
**old** value (``new = m * old + (1 - m) * batch``), the default epsilon is ``1e-3``, and the
moving variance is the **biased** batch variance. bnlab follows PyTorch: momentum is the weight
of the **new** batch, and the running variance is unbiased. These functions are the only place
where one convention becomes the other.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "KERAS_MOMENTUM",
    "KERAS_EPSILON",
    "momentum_from_keras",
    "momentum_to_keras",
    "variance_from_keras",
    "keras_kwargs",
    "load_keras_weights",
]

KERAS_MOMENTUM = 0.99
KERAS_EPSILON = 1e-3


def momentum_from_keras(momentum: float) -> float:
    """Keras momentum (weight of the old value) -> PyTorch momentum: ``1 - momentum``.

    >>> momentum_from_keras(0.99)
    0.01
    """
    if not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum_from_keras: momentum must be in [0, 1], got {momentum!r}")
    return round(1.0 - float(momentum), 12)


def momentum_to_keras(momentum: float) -> float:
    """PyTorch momentum (weight of the new batch) -> Keras momentum: ``1 - momentum``."""
    if not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum_to_keras: momentum must be in [0, 1], got {momentum!r}")
    return round(1.0 - float(momentum), 12)


def variance_from_keras(moving_variance: Tensor, count: int) -> Tensor:
    """Keras' biased moving variance -> the unbiased one PyTorch/bnlab store.

    ``count`` is the number of values per channel in one training batch (``N`` for dense
    layers, ``N * H * W`` for 2-D convolutions). A moving average of biased variances times
    ``count / (count - 1)`` is the moving average of the unbiased ones.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ValueError(
            f"variance_from_keras: count (values per channel in a batch) must be an int >= 2, "
            f"got {count!r}"
        )
    return moving_variance * (count / (count - 1))


def keras_kwargs(
    momentum: float = KERAS_MOMENTUM, epsilon: float = KERAS_EPSILON
) -> dict[str, Any]:
    """Constructor keywords that make a bnlab/torch BN layer behave like a Keras one.

    >>> keras_kwargs()
    {'eps': 0.001, 'momentum': 0.01}
    """
    return {"eps": float(epsilon), "momentum": momentum_from_keras(momentum)}


@torch.no_grad()
def load_keras_weights(
    layer: torch.nn.Module,
    gamma: Any,
    beta: Any,
    moving_mean: Any,
    moving_variance: Any,
    *,
    count: int,
) -> torch.nn.Module:
    """Copy a Keras layer's ``[gamma, beta, moving_mean, moving_variance]`` into ``layer`` in place.

    Works for bnlab and torch BN layers with ``affine=True`` and running statistics.
    """
    name = type(layer).__name__
    if getattr(layer, "weight", None) is None or getattr(layer, "running_mean", None) is None:
        raise ValueError(
            f"load_keras_weights: {name} needs affine=True and track_running_stats=True"
        )
    c = layer.running_mean.shape[0]
    values = {"gamma": gamma, "beta": beta, "moving_mean": moving_mean,
              "moving_variance": moving_variance}
    tensors = {}
    for key, value in values.items():
        t = torch.as_tensor(value, dtype=layer.running_mean.dtype)
        if t.shape != (c,):
            raise ValueError(
                f"load_keras_weights: {key} must have shape ({c},) for {name}, got {tuple(t.shape)}"
            )
        tensors[key] = t
    layer.weight.copy_(tensors["gamma"])
    layer.bias.copy_(tensors["beta"])
    layer.running_mean.copy_(tensors["moving_mean"])
    layer.running_var.copy_(variance_from_keras(tensors["moving_variance"], count))
    return layer

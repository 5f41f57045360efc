"""Named conversions from Keras' BatchNormalization conventions to bnlab's (PyTorch's).

Keras 3 ``BatchNormalization(momentum=0.99, epsilon=1e-3)``: momentum is the weight of the
**old** value (``new = m * old + (1 - m) * batch``), the default epsilon is ``1e-3``, and the
moving variance is the **biased** batch variance. bnlab follows PyTorch: momentum is the weight
of the **new** batch, and the running variance is unbiased. These functions are the only place
where one convention becomes the other. In evaluation both normalise with the stored variance,
so :func:`load_keras_weights` keeps Keras' moving variance as it is by default.
"""

from __future__ import annotations

import math
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


def variance_from_keras(
    moving_variance: Tensor,
    count: int,
    *,
    steps: int | None = None,
    momentum: float = KERAS_MOMENTUM,
    initial: float = 1.0,
) -> Tensor:
    """Keras' moving variance (of biased batch variances) -> the unbiased one PyTorch keeps.

    ``count`` is the number of values per channel in one training batch (``N`` for dense
    layers, ``N * H * W`` for 2-D convolutions), ``steps`` the number of training calls that
    updated the layer, ``momentum`` the Keras momentum of the layer and ``initial`` the value
    its moving variance started from (Keras' ``moving_variance_initializer``, ``1``).

    After ``k`` steps Keras holds ``m**k * initial + (1 - m) * sum(m**(k-j) * biased_j)``;
    PyTorch with the same momentum holds the same sum of *unbiased* variances
    (``biased * n / (n - 1)``) and the same ``m**k * initial``, which was never a batch
    variance. So, exactly::

        m**k * initial + (moving_variance - m**k * initial) * n / (n - 1)

    This is exact when every step used ``count`` values per channel (a constant batch size,
    e.g. ``drop_remainder=True``) and the momentum never changed. With ``steps=None`` the
    initial value is taken as forgotten and the result is ``moving_variance * n / (n - 1)``,
    an approximation that is too large by ``m**k * initial / (n - 1)``: 0.026 after 20 steps
    at ``m=0.99``, ``n=32`` (3.1% of a variance of 0.85), below ``1e-4 / (n - 1)`` after 920.

    Only for continuing training with PyTorch's convention: to evaluate as Keras does, keep
    the moving variance as stored (:func:`load_keras_weights` does by default).

    >>> import torch
    >>> # one step, biased batch variance 0.5 over 11 values: Keras 0.9 * 1 + 0.1 * 0.5
    >>> variance_from_keras(torch.tensor([0.95]), 11, steps=1, momentum=0.9)  # 0.9 + 0.1 * 0.55
    tensor([0.9550])
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ValueError(
            f"variance_from_keras: count (values per channel in a batch) must be an int >= 2, "
            f"got {count!r}"
        )
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or steps < 0):
        raise ValueError(
            f"variance_from_keras: steps (training calls of the layer) must be an int >= 0 "
            f"or None, got {steps!r}"
        )
    if not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"variance_from_keras: momentum must be in [0, 1], got {momentum!r}")
    factor = count / (count - 1)
    if steps is None:
        return moving_variance * factor
    kept = float(momentum) ** steps * float(initial)  # what is left of the initial value
    return kept + (moving_variance - kept) * factor


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
    epsilon: float | None = KERAS_EPSILON,
    variance: str = "keras",
    count: int | None = None,
    steps: int | None = None,
    momentum: float = KERAS_MOMENTUM,
) -> torch.nn.Module:
    """Copy a Keras layer's ``[gamma, beta, moving_mean, moving_variance]`` into ``layer`` in place.

    By default the layer then evaluates exactly as Keras' ``model(x, training=False)``: the
    moving variance is stored as Keras has it (Keras normalises with it unchanged), and
    ``epsilon`` (Keras' default ``1e-3``; pass the Keras layer's) must equal ``layer.eps``
    (build the layer with :func:`keras_kwargs`), or ``None`` to skip that check.

    ``variance="unbiased"`` instead stores PyTorch's unbiased convention, for continuing to
    train in bnlab: :func:`variance_from_keras` with ``count`` (values per channel in a
    batch), ``steps`` (exact when given) and ``momentum`` (the Keras layer's). Evaluation then
    differs from Keras' (by a factor of up to ``count / (count - 1)`` in the variance).

    Works for bnlab and torch BN layers with ``affine=True`` and running statistics.
    """
    name = type(layer).__name__
    if getattr(layer, "weight", None) is None or getattr(layer, "running_mean", None) is None:
        raise ValueError(
            f"load_keras_weights: {name} needs affine=True and track_running_stats=True"
        )
    if variance not in ("keras", "unbiased"):
        raise ValueError(
            f"load_keras_weights: variance must be 'keras' or 'unbiased', got {variance!r}"
        )
    if variance == "unbiased" and count is None:
        raise ValueError("load_keras_weights: variance='unbiased' needs count (values per "
                         "channel in a batch) and, to be exact, steps")
    if variance == "keras" and (count is not None or steps is not None):
        raise ValueError(
            "load_keras_weights: count/steps are used only with variance='unbiased'; by "
            "default the moving variance is loaded as Keras stores it, so that evaluation "
            "equals Keras'"
        )
    if epsilon is not None and not math.isclose(float(layer.eps), float(epsilon),
                                                 rel_tol=1e-9):
        raise ValueError(
            f"load_keras_weights: {name} has eps={layer.eps!r} but the Keras layer has "
            f"epsilon={epsilon!r}; build it with keras_kwargs(epsilon={epsilon!r}) (or pass "
            f"epsilon=None to load anyway)"
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
    var = tensors["moving_variance"]
    if variance == "unbiased":
        var = variance_from_keras(var, count, steps=steps, momentum=momentum)
    layer.weight.copy_(tensors["gamma"])
    layer.bias.copy_(tensors["beta"])
    layer.running_mean.copy_(tensors["moving_mean"])
    layer.running_var.copy_(var)
    return layer

"""Networks for 28x28 images (MNIST, Fashion-MNIST), with the normaliser as a parameter: a
small CNN (the Keras tutorial's network this project started from) and Ioffe & Szegedy's MLP.

Every normaliser is built by :func:`bnlab.norms.make_norm`, so ``norm="none"``, ``"bn"``,
``"bn-window"``, ``"bn-running"``, ``"gn"``, ... all give the same network around a different
normalisation layer, and an unknown name fails with the list of valid ones.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from bnlab.norms import make_norm

__all__ = ["small_cnn", "ioffe_mlp", "Placement"]

Placement = Literal["after", "before"]


def _check_placement(placement: str) -> None:
    if placement not in ("after", "before"):
        raise ValueError(
            f"placement must be 'after' (activation, then norm: the tutorial's order) or 'before' "
            f"(norm, then activation), got {placement!r}"
        )


def _conv_block(
    cin: int, cout: int, norm: str, placement: str, norm_kwargs: dict[str, Any]
) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, 3)
    # A fresh layer per block: the tutorial's bug was one BN instance shared by both blocks.
    layer = make_norm(norm, cout, dim=2, **norm_kwargs)
    if placement == "after":
        return [conv, nn.ReLU(), layer, nn.MaxPool2d(2)]
    return [conv, layer, nn.ReLU(), nn.MaxPool2d(2)]


def small_cnn(
    norm: str = "bn",
    placement: Placement = "after",
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    norm_kwargs: dict[str, Any] | None = None,
) -> nn.Sequential:
    """A small CNN: the Keras tutorial's network in PyTorch, with its BN-reuse bug fixed.

    ``Conv2d(32, 3x3) - ReLU - norm - MaxPool(2) - Conv2d(64, 3x3) - ReLU - norm - MaxPool(2) -
    Flatten - Linear(10)``: two separate normalisation layers (32 and 64 channels). With
    ``placement="before"`` each norm comes between the convolution and the ReLU, as in Ioffe &
    Szegedy. The output is logits; the tutorial's softmax lives in the cross-entropy loss.

    Args:
        norm: a name registered in :mod:`bnlab.norms` (``"none"`` for no normalisation).
        placement: ``"after"`` (the tutorial's order) or ``"before"`` the activation.
        in_channels, num_classes, image_size: input channels, classes and square image side.
        norm_kwargs: extra keyword arguments for every normalisation layer (e.g. momentum).

    Example::

        >>> model = small_cnn("bn-window")
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    _check_placement(placement)
    kw = dict(norm_kwargs or {})
    side = ((image_size - 2) // 2 - 2) // 2
    if side < 1:
        raise ValueError(f"small_cnn: image_size must be at least 10, got {image_size}")
    return nn.Sequential(
        *_conv_block(in_channels, 32, norm, placement, kw),
        *_conv_block(32, 64, norm, placement, kw),
        nn.Flatten(),
        nn.Linear(64 * side * side, num_classes),
    )


def ioffe_mlp(
    norm: str = "bn",
    *,
    in_features: int = 784,
    hidden: int = 100,
    depth: int = 3,
    num_classes: int = 10,
    init_std: float | None = 0.1,
    norm_kwargs: dict[str, Any] | None = None,
) -> nn.Sequential:
    """Ioffe & Szegedy's (2015) MNIST network: 784-100-100-100-10, sigmoid, BN before each sigmoid.

    The paper initialises with "small random Gaussian values" without giving the scale;
    ``init_std`` (default ``0.1``) is that scale, ``None`` keeps PyTorch's default init. Input
    images of any shape are flattened.

    Example::

        >>> ioffe_mlp("none")(torch.zeros(3, 1, 28, 28)).shape
        torch.Size([3, 10])
    """
    kw = dict(norm_kwargs or {})
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), make_norm(norm, hidden, dim=1, **kw), nn.Sigmoid()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    model = nn.Sequential(*layers)
    if init_std is not None:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, init_std)
                    m.bias.zero_()
    return model

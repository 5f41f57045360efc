"""Models of bnlab's experiments, each taking the normaliser as a name (``norm="bn"``).

:func:`build_model` builds one by name; unknown model names fail with the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .mnist1d import MNIST1DCNN, mnist1d_cnn, mnist1d_mlp
from .resnet import SmallResNet, small_resnet
from .seed import ioffe_mlp, seed_cnn

__all__ = [
    "seed_cnn",
    "ioffe_mlp",
    "mnist1d_mlp",
    "mnist1d_cnn",
    "MNIST1DCNN",
    "small_resnet",
    "SmallResNet",
    "MODELS",
    "model_names",
    "build_model",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "seed_cnn": seed_cnn,
    "ioffe_mlp": ioffe_mlp,
    "mnist1d_mlp": mnist1d_mlp,
    "mnist1d_cnn": mnist1d_cnn,
    "small_resnet": small_resnet,
}


def model_names() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, norm: str = "bn", **kwargs: Any) -> nn.Module:
    """Build model ``name`` with normaliser ``norm``; extra keywords go to the model."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(model_names())}")
    return MODELS[name](norm, **kwargs)

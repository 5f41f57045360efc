"""Models of bnlab's experiments, each taking the normaliser as a name (``norm="bn"``).

:func:`build_model` builds one by name; unknown model names fail with the valid ones. Old names
(:data:`OLD_NAMES`) still build their model, with a one-line note naming the new name.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from torch import nn

from .mnist import ioffe_mlp, small_cnn
from .mnist1d import MNIST1DCNN, mnist1d_cnn, mnist1d_mlp
from .resnet import SmallResNet, small_resnet

#: the old name of :func:`small_cnn`, kept so code written against it keeps working
seed_cnn = small_cnn

__all__ = [
    "small_cnn",
    "seed_cnn",
    "ioffe_mlp",
    "mnist1d_mlp",
    "mnist1d_cnn",
    "MNIST1DCNN",
    "small_resnet",
    "SmallResNet",
    "MODELS",
    "OLD_NAMES",
    "canonical_model",
    "model_names",
    "build_model",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": small_cnn,
    "ioffe_mlp": ioffe_mlp,
    "mnist1d_mlp": mnist1d_mlp,
    "mnist1d_cnn": mnist1d_cnn,
    "small_resnet": small_resnet,
}


#: old model name -> its name now (the old one still works, with a note)
OLD_NAMES = {"seed_cnn": "small_cnn"}
_noted: set[str] = set()


def model_names() -> list[str]:
    return sorted(MODELS)


def canonical_model(name: str) -> str:
    """``name`` itself, or for an old name the name now (noted once per process on stderr)."""
    new = OLD_NAMES.get(name)
    if new is None:
        return name
    if name not in _noted:
        _noted.add(name)
        print(f"bnlab: note: model {name!r} is now called {new!r}; the old name still works",
              file=sys.stderr)
    return new


def build_model(name: str, norm: str = "bn", **kwargs: Any) -> nn.Module:
    """Build model ``name`` with normaliser ``norm``; extra keywords go to the model."""
    name = canonical_model(name)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(model_names())}")
    return MODELS[name](norm, **kwargs)

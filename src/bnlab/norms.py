"""A registry of normalisers by name, so models and experiments take the normaliser as a string.

``make_norm("bn", 32, dim=2)`` builds a ``bnlab.BatchNorm2d(32)``. Unknown names fail loudly
with the sorted list of valid names. Other modules add their variants with
:func:`register_norm`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["register_norm", "make_norm", "norm_names"]

NormFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, NormFactory] = {}
_BN = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}


def register_norm(name: str, factory: NormFactory | None = None):
    """Register ``factory(num_features, dim, **kwargs) -> nn.Module`` under ``name``.

    Usable as a decorator. Registering a name twice is an error.
    """

    if not (isinstance(name, str) and name):
        raise TypeError(f"register_norm: name must be a non-empty str, got {name!r}")
    if factory is not None and not callable(factory):
        raise TypeError(f"register_norm: factory must be callable, got {type(factory).__name__}")

    def deco(f: NormFactory) -> NormFactory:
        if not callable(f):
            raise TypeError(f"register_norm: factory must be callable, got {type(f).__name__}")
        if name in _REGISTRY:
            raise ValueError(f"register_norm: {name!r} is already registered")
        _REGISTRY[name] = f
        return f

    return deco(factory) if factory is not None else deco


def norm_names() -> list[str]:
    """Every registered normaliser name, sorted."""
    return sorted(_REGISTRY)


def make_norm(name: str, num_features: int, dim: int = 2, **kwargs: Any) -> nn.Module:
    """Build the normaliser ``name`` for ``num_features`` channels of a ``dim``-D layer.

    ``dim`` is 1 for ``(N, C)``/``(N, C, L)`` inputs, 2 for images, 3 for volumes.
    """
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown normaliser {name!r}; valid names: {', '.join(norm_names())}")
    if isinstance(dim, bool) or dim not in (1, 2, 3):
        raise ValueError(f"make_norm: dim must be 1, 2 or 3, got {dim!r}")
    return factory(num_features, dim, **kwargs)


def _bn(num_features: int, dim: int, **kw: Any) -> nn.Module:
    return _BN[dim](num_features, **kw)


@register_norm("none")
def _none(num_features: int, dim: int, **kw: Any) -> nn.Module:
    return nn.Identity()


@register_norm("bn")
def _bn_ema(num_features: int, dim: int, **kw: Any) -> nn.Module:
    return _bn(num_features, dim, **kw)


@register_norm("torch-bn")
def _torch_bn(num_features: int, dim: int, **kw: Any) -> nn.Module:
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim](num_features, **kw)


@register_norm("bn-window")
def _bn_window(num_features: int, dim: int, window_size: int = 10, **kw: Any) -> nn.Module:
    return _bn(num_features, dim, running="window", window_size=window_size, **kw)


@register_norm("bn-running")
def _bn_running(num_features: int, dim: int, **kw: Any) -> nn.Module:
    return _bn(num_features, dim, normalize_with="running", **kw)


@register_norm("gn")
def _gn(num_features: int, dim: int, num_groups: int = 8, **kw: Any) -> nn.Module:
    groups = num_groups
    while num_features % groups:
        groups //= 2
    return nn.GroupNorm(groups, num_features, **kw)


@register_norm("ln")
def _ln(num_features: int, dim: int, **kw: Any) -> nn.Module:
    # LayerNorm over channels and positions of each sample: GroupNorm with one group.
    return nn.GroupNorm(1, num_features, **kw)

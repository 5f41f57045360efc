"""Image corruptions at severities 1-5, as pure seeded tensor functions.

Modelled on CIFAR-10-C / ImageNet-C (Hendrycks & Dietterich, ICLR 2019), with parameters
chosen for 28x28 grayscale images in ``[0, 1]`` (Fashion-MNIST). Every function takes ``x`` of
shape ``(..., H, W)`` with values in ``[0, 1]``, returns a new tensor of the same shape and
dtype clipped to ``[0, 1]``, and never modifies ``x``. Random corruptions draw from a
``torch.Generator`` seeded with ``seed``, so the same call gives the same result.

Severity tables (index = severity - 1):

* ``gaussian_noise``: additive noise with std ``(0.08, 0.12, 0.18, 0.26, 0.38)`` (CIFAR-10-C's).
* ``gaussian_blur``: Gaussian kernel with std ``(0.6, 0.9, 1.2, 1.6, 2.0)`` pixels, reflect
  padding.
* ``contrast``: ``(x - mean) * c + mean`` per image, ``c = (0.4, 0.3, 0.2, 0.1, 0.05)``
  (CIFAR-10-C's).
* ``brightness``: ``x + b``, ``b = (0.1, 0.2, 0.3, 0.4, 0.5)``.
* ``pixel_dropout``: each pixel set to 0 with probability ``(0.1, 0.2, 0.3, 0.4, 0.5)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CORRUPTIONS",
    "brightness",
    "contrast",
    "corrupt",
    "corruption_names",
    "gaussian_blur",
    "gaussian_noise",
    "pixel_dropout",
]

_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)
_BLUR = (0.6, 0.9, 1.2, 1.6, 2.0)
_CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
_BRIGHT = (0.1, 0.2, 0.3, 0.4, 0.5)
_DROP = (0.1, 0.2, 0.3, 0.4, 0.5)


def _level(table: tuple[float, ...], severity: int, name: str) -> float:
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ValueError(f"{name}: severity must be an int from 1 to 5, got {severity!r}")
    return table[severity - 1]


def _check(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise TypeError(
            f"{name}: expected a floating-point tensor of shape (..., H, W), got "
            f"{type(x).__name__}" + (f" {x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor)
                                     else "")
        )


def _generator(x: Tensor, seed: int) -> torch.Generator:
    return torch.Generator(device=x.device).manual_seed(int(seed))


def gaussian_noise(x: Tensor, severity: int = 1, seed: int = 0) -> Tensor:
    """Add zero-mean Gaussian noise; std grows with ``severity``."""
    _check(x, "gaussian_noise")
    std = _level(_NOISE, severity, "gaussian_noise")
    noise = torch.randn(x.shape, generator=_generator(x, seed), device=x.device, dtype=x.dtype)
    return (x + std * noise).clamp(0, 1)


def gaussian_blur(x: Tensor, severity: int = 1, seed: int = 0) -> Tensor:
    """Blur with a separable Gaussian kernel (``seed`` is unused: deterministic)."""
    _check(x, "gaussian_blur")
    sigma = _level(_BLUR, severity, "gaussian_blur")
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    h, w = x.shape[-2:]
    flat = x.reshape(-1, 1, h, w)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, k.view(1, 1, 1, -1))
    flat = F.conv2d(flat, k.view(1, 1, -1, 1))
    return flat.reshape(x.shape).clamp(0, 1)


def contrast(x: Tensor, severity: int = 1, seed: int = 0) -> Tensor:
    """Pull every pixel towards its image's mean (``seed`` is unused)."""
    _check(x, "contrast")
    c = _level(_CONTRAST, severity, "contrast")
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return ((x - mean) * c + mean).clamp(0, 1)


def brightness(x: Tensor, severity: int = 1, seed: int = 0) -> Tensor:
    """Add a constant to every pixel (``seed`` is unused)."""
    _check(x, "brightness")
    return (x + _level(_BRIGHT, severity, "brightness")).clamp(0, 1)


def pixel_dropout(x: Tensor, severity: int = 1, seed: int = 0) -> Tensor:
    """Set each pixel to 0 independently with a probability that grows with ``severity``."""
    _check(x, "pixel_dropout")
    p = _level(_DROP, severity, "pixel_dropout")
    keep = torch.rand(x.shape, generator=_generator(x, seed), device=x.device) >= p
    return (x * keep).clamp(0, 1)


CORRUPTIONS: dict[str, Callable[..., Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "brightness": brightness,
    "pixel_dropout": pixel_dropout,
}


def corruption_names() -> list[str]:
    """Every corruption name, sorted."""
    return sorted(CORRUPTIONS)


def corrupt(x: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """Apply the corruption ``name`` at ``severity`` (1-5) to ``x``."""
    fn = CORRUPTIONS.get(name)
    if fn is None:
        raise ValueError(
            f"corrupt: unknown corruption {name!r}; valid names: {', '.join(corruption_names())}"
        )
    return fn(x, severity, seed)

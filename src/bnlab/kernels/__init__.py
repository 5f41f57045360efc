"""BN's arithmetic: bnlab's compiled CPU operators, torch's kernels, and the one choice between
them. This package is the front door; layers and :mod:`bnlab.functional` call it, nothing
else.

How a call reaches the arithmetic::

    bnlab.BatchNorm2d.forward             (bnlab._base: checks, the running policy)
      -> bnlab.functional / kernels.backends.train_step | train | evaluate | train_inplace
           -> kernels.choose(x, ...)      one function picks "native" | "torch" | "composite"
                                          (or a registered GPU backend)
           -> backends/native.py          autograd.TrainBN / EvalBN / InPlaceBN over
                                          torch.ops.bnlab.* (csrc/bnlab_ops.cpp, stable ABI)
              backends/aten.py            torch's kernels (name "torch")
              backends/composite.py       tensor ops (torch.func, forward AD)

The compiled extension (``bnlab.kernels._native``, built by ``setup.py``) holds the C kernels
(OpenMP, vectorised; training forward with the running update, evaluation forward, backward,
for contiguous NCHW and channels-last float32/float64, optionally fused with a ReLU or leaky
ReLU) and registers them as torch operators, ``torch.ops.bnlab.train_forward``,
``train_forward_update``, ``backward``, ``eval_forward``, ``running_update_`` and
``empty_like``, each of which checks its tensors (an exception, never a crash).

Which backend runs is :func:`choose`'s answer (:mod:`bnlab.kernels._dispatch` says the rules):
``auto`` by default; ``BNLAB_KERNELS=native|torch|composite``, :func:`set_backend` and the
context manager :func:`use_backend` force one. If the extension is missing (no compiler at
install time) bnlab works on PyTorch alone and warns once, saying why.

Outputs of 1 MiB and more (``y`` forward, ``dx`` backward) are written into memory mapped by
the extension with transparent huge pages, and freed outputs are kept for reuse, so a training
step does not page-fault its outputs afresh every time. The cache holds at most
``BNLAB_BUFFER_CACHE_BYTES`` bytes (default 512 MiB, ``0`` disables it); :func:`buffer_stats`
reports it and :func:`empty_cache` releases it.

Example::

    >>> import torch, bnlab
    >>> bnlab.kernels.backend() in ("native", "torch")
    True
    >>> with bnlab.kernels.use_backend("torch"):
    ...     y = bnlab.BatchNorm2d(3)(torch.randn(4, 3, 5, 5))
"""

from __future__ import annotations

from torch import Tensor

from . import _ops, backends, library
from ._dispatch import (
    NATIVE_MIN_VALUES,
    backend,
    choose,
    native_available,
    native_error,
    set_backend,
    use_backend,
)
from .backends import register

__all__ = [
    "NATIVE_MIN_VALUES",
    "backend",
    "choose",
    "native_available",
    "native_error",
    "set_backend",
    "use_backend",
    "supports",
    "register",
    "batch_norm_train",
    "normalize",
    "batch_norm_act_train",
    "normalize_act",
    "empty_cache",
    "buffer_stats",
    "library",
]


def empty_cache() -> None:
    """Release the freed output buffers the native kernels keep for reuse."""
    if _ops._native is not None:
        _ops._native.empty_cache()


def buffer_stats() -> dict[str, int]:
    """The output-buffer cache: ``cached_buffers``, ``cached_bytes``, ``limit_bytes``, ``hits``
    (outputs served from it) and ``misses`` (fresh mappings). Empty without the extension."""
    if _ops._native is None or not hasattr(_ops._native, "buffer_stats"):
        return {}
    return dict(_ops._native.buffer_stats())


def supports(x: Tensor, *per_channel: Tensor | None) -> bool:
    """Whether a training call on ``x`` (and the ``(C,)`` tensors given) runs on the native
    operators now: :func:`choose` answers ``"native"``."""
    return isinstance(x, Tensor) and choose(x, per_channel, True) == "native"


def batch_norm_act_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: str = "relu",
    negative_slope: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor]:
    """``act(BN(x))`` with batch statistics: ``(y, mean, biased_var)``, on the backend
    :func:`choose` picks (see :func:`bnlab.functional.batch_norm_act_train`)."""
    _check_act(act, "batch_norm_act_train")
    return backends.train(x, weight, bias, float(eps), act, float(negative_slope))


def batch_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN without activation: ``(y, mean, biased_var)``."""
    return batch_norm_act_train(x, weight, bias, eps, "identity")


def normalize_act(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
    eps: float, act: str = "relu", negative_slope: float = 0.01,
) -> Tensor:
    """``act((x - mean) / sqrt(var + eps) * weight + bias)`` with given statistics."""
    _check_act(act, "normalize_act")
    return backends.evaluate(x, mean, var, weight, bias, float(eps), act, float(negative_slope))


def normalize(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """Evaluation-mode BN with given statistics (no activation)."""
    return normalize_act(x, mean, var, weight, bias, eps, "identity")


def _check_act(act: str, owner: str) -> None:
    if act not in _ops.ACT_CODES:
        raise ValueError(f"{owner}: act must be one of {sorted(_ops.ACT_CODES)}, got {act!r}")

"""The backend registry: which implementation of BN's arithmetic runs for a given input.

Every bnlab layer and functional call reaches the arithmetic through two functions,
:func:`train` (batch statistics) and :func:`evaluate` (given statistics). Each backend is one
module with ``NAME``, ``supports(x, per_channel, train) -> bool``, ``train(x, w, b, eps, act,
slope) -> (y, mean, biased_var)`` and ``evaluate(x, mean, var, w, b, eps, act, slope) -> y``:

* :mod:`.native` - bnlab's C kernels on CPU float32/float64 (contiguous or channels-last):
  an autograd Function in eager mode, the ``bnlab::train_forward`` custom op inside
  ``torch.compile`` / ``torch.export`` graphs;
* :mod:`.aten` - torch's own batch-norm kernels (``torch.nn.functional.batch_norm``) for
  everything else: GPUs, half and bfloat16, autocast, odd strides, ``BNLAB_KERNELS=torch``,
  FX tracing, evaluation inside graphs (exported as ``aten.batch_norm``, so ONNX shows
  ``BatchNormalization``);
* :mod:`.composite` - plain differentiable tensor ops, for ``torch.func`` transforms (vmap,
  jvp, grad), forward-mode AD and statistics that need a gradient; it supports everything.

The first registered backend whose ``supports`` is true runs, in the order of
:func:`backends`; a GPU backend (Triton or CUDA) is one new module registered with
:func:`register` before ``aten``.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from .. import inplace
from .. import supports as _native_eager
from . import aten, composite, native

__all__ = ["register", "backends", "select", "train", "train_inplace", "evaluate"]

_ORDER: list[ModuleType] = [native, aten]


def register(module: ModuleType, *, before: str | None = "aten") -> None:
    """Add a backend module, tried before the backend named ``before`` (``None``: last)."""
    for attr in ("NAME", "supports", "train", "evaluate"):
        if not hasattr(module, attr):
            raise TypeError(f"register: backend module {module.__name__} lacks {attr!r}")
    names = [b.NAME for b in _ORDER]
    if module.NAME in names:
        raise ValueError(f"register: a backend named {module.NAME!r} exists already")
    if before is None:
        _ORDER.append(module)
        return
    if before not in names:
        raise ValueError(f"register: before must be one of {sorted(names)}, got {before!r}")
    _ORDER.insert(names.index(before), module)


def backends() -> list[str]:
    """Names of the registered backends, in the order they are tried (composite last)."""
    return [b.NAME for b in _ORDER] + [composite.NAME]


def _transformed(x: Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False  # dynamo sees through transforms; the query itself is not traceable
    return (
        torch._C._functorch.is_functorch_wrapped_tensor(x)
        or torch.autograd.forward_ad._current_level >= 0
    )


def select(x: Tensor, per_channel: tuple, train: bool) -> ModuleType:
    """The backend module that runs for input ``x`` and its ``(C,)`` tensors."""
    if isinstance(x, torch.fx.Proxy):
        return aten  # symbolic_trace records one call torch's FX passes understand
    if _transformed(x):
        return composite
    for b in _ORDER:
        if b.supports(x, per_channel, train):
            return b
    return composite


#: activations only the composite backend implements (``elu``: alpha is ``slope``)
_COMPOSITE_ACTS = ("elu",)


def train_inplace(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: str = "identity",
    slope: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor]:
    """As :func:`train`, keeping only the output for backward and writing it over ``x`` where
    autograd allows (:mod:`bnlab.kernels.inplace`). Graphs, FX traces and ``torch.func``
    transforms get the functional :func:`train` (same numbers, input saved), and so does a
    call with a ``|weight|`` too small to divide by."""
    if not (isinstance(x, torch.fx.Proxy) or _transformed(x) or native._capturing()):
        out = inplace.train_inplace(x, weight, bias, eps, act, slope)
        if out is not None:
            return out
    return train(x, weight, bias, eps, act, slope)


def train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: str = "identity",
    slope: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor]:
    """``act(BN(x))`` with batch statistics: ``(y, mean, biased_var)`` (``(C,)`` statistics)."""
    if act in _COMPOSITE_ACTS:
        return composite.train(x, weight, bias, eps, act, slope)
    if _ORDER[0] is native and _native_eager(x, weight, bias):
        # the common case first, without the registry walk: small layers are call-bound
        return native.train(x, weight, bias, eps, act, slope)
    return select(x, (weight, bias), True).train(x, weight, bias, eps, act, slope)


def evaluate(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
    eps: float, act: str = "identity", slope: float = 0.01,
) -> Tensor:
    """``act(BN(x))`` with the given mean and (running, unbiased) variance."""
    if act in _COMPOSITE_ACTS:
        return composite.evaluate(x, mean, var, weight, bias, eps, act, slope)
    if isinstance(x, torch.fx.Proxy):
        return aten.evaluate(x, mean, var, weight, bias, eps, act, slope)
    if torch.is_grad_enabled() and (mean.requires_grad or var.requires_grad):
        return composite.evaluate(x, mean, var, weight, bias, eps, act, slope)
    if _ORDER[0] is native and _native_eager(x, mean, var, weight, bias):
        return native.evaluate(x, mean, var, weight, bias, eps, act, slope)
    return select(x, (mean, var, weight, bias), False).evaluate(
        x, mean, var, weight, bias, eps, act, slope
    )

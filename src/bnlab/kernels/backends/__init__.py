"""The backends and the calls every bnlab layer and functional reaches the arithmetic through.

:func:`bnlab.kernels.choose` picks a backend per call; these functions run the call on it:

* :func:`train` - ``act(BN(x))`` with batch statistics: ``(y, mean, biased_var)``;
* :func:`evaluate` - with given statistics;
* :func:`train_step` - a layer's whole training step: :func:`train` plus the running update
  (in the same native pass, or guarded tensor ops), never letting NaN/Inf in;
* :func:`train_inplace` - in-place activated BN (keeps only the output);
* :func:`train_synced` - statistics over the ranks of a process group.

Each backend is one module with ``NAME``, ``supports(x, per_channel, train) -> bool``,
``train(x, w, b, eps, act, slope)`` and ``evaluate(x, mean, var, w, b, eps, act, slope)``;
``step`` (training with the running update) is optional. :mod:`.native` (bnlab's operators),
:mod:`.aten` (torch's kernels, name ``"torch"``) and :mod:`.composite` (tensor ops) are built
in; **a GPU backend is one more module** given to :func:`register`. A registered backend gets
every path: what it lacks (the fused running update, in-place ABN, synchronised statistics)
runs on its ``train``/``evaluate`` plus tensor ops that work on every device.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from .. import _dispatch, _ops
from ..autograd import InPlaceBN, TrainBN, global_moments
from ..inplace import INVERTIBLE, MIN_WEIGHT, can_overwrite, weights_invertible
from . import aten, composite, native

__all__ = ["register", "backends", "get", "train", "train_step", "train_inplace",
           "train_synced", "evaluate", "MIN_WEIGHT"]  # fmt: skip

_BUILTIN = {b.NAME: b for b in (native, aten, composite)}
_BUILTIN_STEPS = {name: getattr(b, "step", None) for name, b in _BUILTIN.items()}
_choose = _dispatch.choose
#: activations only the composite backend implements (``elu``: alpha is ``slope``)
_COMPOSITE_ACTS = ("elu",)


def register(module: ModuleType) -> None:
    """Add a backend module (``NAME``, ``supports``, ``train``, ``evaluate``), tried before the
    built-in ones for the tensors its ``supports`` accepts."""
    for attr in ("NAME", "supports", "train", "evaluate"):
        if not hasattr(module, attr):
            raise TypeError(f"register: backend module {module.__name__} lacks {attr!r}")
    if module.NAME in backends():
        raise ValueError(f"register: a backend named {module.NAME!r} exists already")
    _dispatch.registered.append(module)


def backends() -> list[str]:
    """Names of the backends, in the order :func:`bnlab.kernels.choose` tries them."""
    return [b.NAME for b in _dispatch.registered] + ["native", "torch", "composite"]


def get(name: str) -> ModuleType:
    """The backend module named ``name``."""
    for b in _dispatch.registered:
        if b.NAME == name:
            return b
    return _BUILTIN[name]


def train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: str = "identity",
    slope: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor]:
    """``act(BN(x))`` with batch statistics: ``(y, mean, biased_var)`` (``(C,)`` statistics)."""
    if act in _COMPOSITE_ACTS:
        return composite.train(x, weight, bias, eps, act, slope)
    return get(_dispatch.choose(x, (weight, bias), True)).train(x, weight, bias, eps, act, slope)


def evaluate(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
    eps: float, act: str = "identity", slope: float = 0.01,
) -> Tensor:
    """``act(BN(x))`` with the given mean and (running, unbiased) variance."""
    if act in _COMPOSITE_ACTS or (torch.is_grad_enabled() and (mean.requires_grad
                                                               or var.requires_grad)):
        return composite.evaluate(x, mean, var, weight, bias, eps, act, slope)
    name = _dispatch.choose(x, (mean, var, weight, bias), False, detached=True)
    return get(name).evaluate(x, mean, var, weight, bias, eps, act, slope)


def train_step(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor,
    running_var: Tensor, num_batches_tracked: Tensor, momentum: float | None, eps: float,
    act: str = "identity", slope: float = 0.01, *, inplace: bool = False,
) -> tuple[Tensor, Any] | None:
    """A plain layer's training step with the running update (``momentum=None``: cumulative
    average): ``(y, finite)``. ``finite`` (a bool, or a 0-dim tensor inside graphs) tells
    whether the batch's statistics were finite and so moved ``running_mean``, ``running_var``
    and ``num_batches_tracked`` (in place). ``None`` when the chosen backend has no such step:
    the caller then runs :func:`train` and moves the statistics itself (same results)."""
    if act in _COMPOSITE_ACTS:
        return None
    name = _choose(x, (weight, bias, running_mean, running_var), True, detached=True)
    # (the built-in steps from a dict of functions: traced, no backend module is reached by a
    # second path, which would cost dynamo an aliasing check in Python on every call)
    step = _BUILTIN_STEPS[name] if name in _BUILTIN_STEPS else getattr(get(name), "step", None)
    if step is None:
        return None
    return step(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                act, slope, inplace)  # fmt: skip


def train_inplace(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: str = "identity",
    slope: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor]:
    """As :func:`train`, keeping only the output for backward and writing it over ``x`` where
    autograd allows (:class:`bnlab.kernels.autograd.InPlaceBN`). Graphs, FX traces and
    ``torch.func`` transforms get the functional :func:`train` (same numbers, input saved),
    and so does a call with a ``|weight|`` below :data:`MIN_WEIGHT` (dividing by it would lose
    the gradient's precision). (A layer's step with the running update in the same pass is
    :func:`train_step` with ``inplace=True``.)"""
    if act not in INVERTIBLE:
        raise ValueError(f"train_inplace: act must be one of {list(INVERTIBLE)}, got {act!r}")
    name = _dispatch.choose(x, (weight, bias), True)
    if name == "composite" or _dispatch.capturing() or isinstance(x, torch.fx.Proxy) or (
        not weights_invertible(weight)
    ):
        return train(x, weight, bias, eps, act, slope)
    is_native = name == "native" and act in ("identity", "leaky_relu")
    return InPlaceBN.apply(x, weight, bias, float(eps), act, float(slope), is_native,
                           can_overwrite(x))  # fmt: skip


def train_synced(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: str, slope: float,
    group: Any, *, inplace: bool = False,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """``act(BN(x))`` with statistics over every rank of ``group``: ``(y, mean, biased_var,
    count)`` with global statistics and count. Outputs and the input gradient equal one process
    on the concatenation of every rank's batch; parameter gradients are this rank's share.
    Must be called on every rank, also with an empty batch. ``inplace`` keeps only the output
    (in-place activated BN); a ``|weight|`` below :data:`MIN_WEIGHT` saves the input instead."""
    # the normalisation's implementation, by the one choice (any other answer: torch's kernels
    # and tensor ops, which work on every device)
    impl = "native" if _dispatch.choose(x, (weight, bias), True) == "native" else "torch"
    sync = (group, *global_moments(x, group))
    if inplace and weights_invertible(weight):
        y, mean, var = InPlaceBN.apply(x, weight, bias, float(eps), act, float(slope), False,
                                       can_overwrite(x), None, sync)  # fmt: skip
        return y, mean, var, sync[3]
    y, mean, var = TrainBN.apply(x, weight, bias, float(eps), "identity", 0.0, impl, None, sync)
    return _ops._act(y, act, slope), mean, var, sync[3]

"""Swap torch BN layers for bnlab's and back, keeping parameters and statistics."""

from __future__ import annotations

from typing import Literal

from torch import nn

from ._base import _NormBase
from ._checks import check_bool, check_materialised
from ._state import allow_bad_running_stats
from ._tree import copy_model, map_modules
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .fused import BatchNormAct2d

__all__ = ["convert"]

#: torch's BN layers and bnlab's equivalents: the one table every converter reads
#: (:func:`convert`, :meth:`bnlab.SyncBatchNorm.convert_sync_batchnorm`, :func:`bnlab.freeze`)
TORCH_TO_BNLAB: dict[type[nn.Module], type[_NormBase]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}
_BNLAB_TO_TORCH: dict[type[nn.Module], type[nn.Module]] = {
    v: k for k, v in TORCH_TO_BNLAB.items()
}
#: the torch module for each activation of a fused layer, from its ``_activation()`` slope
_ACT_MODULES = {
    "relu": lambda slope: nn.ReLU(),
    "leaky_relu": lambda slope: nn.LeakyReLU(slope),
    "elu": lambda slope: nn.ELU(slope),
}
#: the torch BN classes the converters know (``SyncBatchNorm`` takes any rank); any other
#: subclass of torch's ``_BatchNorm`` has behaviour of its own that converting would drop
TORCH_KNOWN: tuple[type[nn.Module], ...] = (*TORCH_TO_BNLAB, nn.SyncBatchNorm)


def torch_rank_class(mod: nn.Module) -> type[nn.Module] | None:
    """The ``torch.nn.BatchNorm1d/2d/3d`` that ``mod`` (torch's or bnlab's) is an instance of,
    or ``None`` for a layer of any rank (``SyncBatchNorm``)."""
    return next((cls for cls in TORCH_TO_BNLAB if isinstance(mod, cls)), None)


def _same_device_dtype(src: nn.Module) -> dict:
    for t in list(src.parameters()) + list(src.buffers()):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {}


def _bias_kwarg(old: nn.Module, target: type[nn.Module]) -> dict:
    """Pass ``bias=False`` only when needed: torch before 2.13 has no such argument."""
    if old.affine and getattr(old, "bias", None) is None:
        return {"bias": False}
    return {}


def _swap(old: nn.Module, target: type[nn.Module], **extra) -> nn.Module:
    for hook_dict in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
        if getattr(old, hook_dict):
            raise ValueError(
                f"convert: {type(old).__name__} has {hook_dict.strip('_')}; remove them before "
                "converting (they cannot be carried over safely)"
            )
    new = target(
        old.num_features,
        old.eps,
        old.momentum,
        old.affine,
        old.track_running_stats,
        **_bias_kwarg(old, target),
        **extra,
        **_same_device_dtype(old),
    )
    with allow_bad_running_stats():  # a conversion carries the statistics as they are
        new.load_state_dict(old.state_dict())
    new.train(old.training)
    for pname in ("weight", "bias"):
        p_old, p_new = getattr(old, pname, None), getattr(new, pname, None)
        if p_old is not None and p_new is not None:
            p_new.requires_grad_(p_old.requires_grad)
    return new


def _to_torch(mod: _NormBase, where: str) -> nn.Module:
    """The torch module computing what bnlab layer ``mod`` computes, or a ``ValueError``."""
    name = type(mod).__name__
    target = nn.BatchNorm2d if type(mod) is BatchNormAct2d else _BNLAB_TO_TORCH.get(type(mod))
    if target is None:
        raise ValueError(
            f"convert: layer {where} ({name}) has no torch.nn equivalent; converting it would "
            "drop its behaviour. Replace it by a bnlab BatchNorm1d/2d/3d first (a frozen layer: "
            "bnlab.unfreeze), or keep the model on bnlab"
        )
    if mod.running == "window" or mod.normalize_with == "running":
        raise ValueError(
            f"convert: layer {where} uses running={mod.running!r}, "
            f"normalize_with={mod.normalize_with!r}, which torch.nn.{target.__name__} "
            "cannot express; use running='ema' or 'cumulative' and normalize_with='batch'"
        )
    if mod.sync:
        raise ValueError(
            f"convert: layer {where} ({name}) synchronises its statistics (process_group), "
            f"which torch.nn.{target.__name__} does not; convert the local model and apply "
            "torch.nn.SyncBatchNorm.convert_sync_batchnorm to the result"
        )
    new = _swap(mod, target)
    if mod.running == "cumulative":
        new.momentum = None
    act, slope = mod._activation()
    if act == "identity":
        return new
    return nn.Sequential(new, _ACT_MODULES[act](slope)).train(mod.training)


def convert(
    model: nn.Module, to: Literal["bnlab", "torch"] = "bnlab", *, inplace: bool = False
) -> nn.Module:
    """Return ``model`` with every BN layer swapped for the other library's equivalent.

    ``to="bnlab"`` replaces ``torch.nn.BatchNorm1d/2d/3d`` (exact types; subclasses such as
    ``SyncBatchNorm`` are left alone) by :class:`bnlab.BatchNorm1d/2d/3d` with
    ``running="ema"``; ``to="torch"`` converts back. Parameters, running statistics,
    ``num_batches_tracked``, ``requires_grad`` flags and train/eval mode are kept, so outputs
    are unchanged. The input model is deep-copied unless ``inplace=True``.

    With ``to="torch"`` a :class:`bnlab.BatchNormAct2d` becomes
    ``nn.Sequential(nn.BatchNorm2d, activation)`` (``nn.ReLU``, ``nn.LeakyReLU(negative_slope)``
    or ``nn.ELU(alpha)``; ``act="identity"`` a plain ``nn.BatchNorm2d``), with the same outputs
    in both modes; its state-dict keys gain a ``.0``. ``running="cumulative"`` becomes
    ``momentum=None``. Every other bnlab layer that torch cannot express raises ``ValueError``
    naming it, never staying a bnlab layer silently: ``running="window"``,
    ``normalize_with="running"``, a synchronising layer (``process_group``), and the layers
    torch has no class for (Ghost BN, Batch Renorm, frozen layers, ``bnlab.SyncBatchNorm``, a
    user's subclass). A lazy module must have run its first forward.

    Example::

        >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
        >>> type(convert(m)[1]).__name__
        'BatchNorm2d'
    """
    if to not in ("bnlab", "torch"):
        raise ValueError(f"convert: to must be 'bnlab' or 'torch', got {to!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    check_bool("convert", "inplace", inplace)
    check_materialised("convert", model)
    if not inplace:
        model = copy_model(model)
    table = TORCH_TO_BNLAB if to == "bnlab" else _BNLAB_TO_TORCH

    def convert_one(mod: nn.Module, qualname: str) -> nn.Module:
        if to == "torch":
            return _to_torch(mod, qualname or "<root>") if isinstance(mod, _NormBase) else mod
        target = table.get(type(mod))
        return mod if target is None else _swap(mod, target)

    return map_modules(model, convert_one)  # a layer shared by two places stays shared


"""Frozen BN: a fixed per-channel affine map from the running statistics, plus the model-level
tools :func:`freeze` and :func:`unfreeze`.

A frozen layer's ``training`` flag is always ``False``: ``model.train()`` (or assigning
``layer.training = True``) cannot make it normalise with batch statistics or update its
running statistics, the fine-tuning trap of torch's BN. Its ``weight`` and ``bias`` are
buffers, not parameters, so ``model.parameters()`` and ``model.requires_grad_(True)`` do not
reach them either; the state-dict keys are those of BN.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._base import _NormBase
from .._checks import check_materialised
from .._docs import fill_docs
from .._state import allow_bad_running_stats
from .._tree import copy_model, map_modules
from ..batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ..convert import TORCH_KNOWN, TORCH_TO_BNLAB, torch_rank_class
from ..fused import BatchNormAct2d

__all__ = [
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenBatchNormAct2d",
    "freeze",
    "unfreeze",
]

_DOC = r"""Frozen Batch Normalization over a {rank} input {layout}: a fixed affine map.

.. math::

    y = \frac{{x - \mu}}{{\sqrt{{\sigma^2 + \epsilon}}}} \gamma + \beta

with :math:`\mu` = ``running_mean``, :math:`\sigma^2` = ``running_var`` (the stored unbiased
estimate), :math:`\gamma` = ``weight`` and :math:`\beta` = ``bias``, all ``(C,)`` buffers. The
output never depends on the rest of the batch, in training or evaluation; the statistics are
never updated and no parameter is trainable. ``layer.training`` is always ``False``.

Build one from a trained model with :func:`bnlab.freeze` (or load a BN state dict into it);
:func:`bnlab.unfreeze` turns it back into a trainable :class:`bnlab.BatchNorm2d`.

Args:
{common_args}
    track_running_stats: must be ``True`` (the map is made of running statistics).
{factory_args}

{shape}

Example::
{example_imports}
    >>> bn = bnlab.{name}(3)
    >>> _ = bn.train()
    >>> bn.training
    False
"""


def _params_to_buffers(layer: nn.Module) -> None:
    for name in ("weight", "bias"):
        p = layer._parameters.get(name)
        if p is not None:
            del layer._parameters[name]
            layer._buffers[name] = p.detach()


def _buffers_to_params(layer: nn.Module) -> None:
    for name in ("weight", "bias"):
        b = layer._buffers.get(name)
        if b is not None:
            del layer._buffers[name]
            layer._parameters[name] = nn.Parameter(b.detach().clone(), requires_grad=True)


class _FrozenBase(_NormBase):
    """A BN layer that stays in evaluation mode for good (an explicit base, not a mixin)."""

    _sync_policy = "local"
    _needs_running_stats = "a frozen layer is made of running statistics"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _params_to_buffers(self)

    @property
    def training(self) -> bool:  # type: ignore[override]
        return False

    @training.setter
    def training(self, mode: bool) -> None:
        # Module.train() and Module.__init__ assign this; a frozen layer ignores them.
        pass


class FrozenBatchNorm1d(BatchNorm1d, _FrozenBase):
    pass


class FrozenBatchNorm2d(BatchNorm2d, _FrozenBase):
    pass


class FrozenBatchNorm3d(BatchNorm3d, _FrozenBase):
    pass


fill_docs(_DOC, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d)


class FrozenBatchNormAct2d(BatchNormAct2d, _FrozenBase):
    """:class:`FrozenBatchNorm2d` followed by the activation of a
    :class:`bnlab.BatchNormAct2d` (``act``, ``negative_slope`` or ``alpha``): what
    :func:`freeze` makes of a fused layer (in place or not: frozen, it saves nothing of its
    own). Arguments as :class:`bnlab.BatchNormAct2d`; ``track_running_stats`` must be
    ``True``.
    """


_FROZEN = {nn.BatchNorm1d: FrozenBatchNorm1d, nn.BatchNorm2d: FrozenBatchNorm2d,
           nn.BatchNorm3d: FrozenBatchNorm3d}  # fmt: skip
_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn_state(mod: nn.Module) -> dict[str, torch.Tensor]:
    state = mod.state_dict()
    return {k: state[k] for k in _BN_KEYS if k in state}


def _freeze_one(mod: nn.Module, qualname: str) -> nn.Module:
    where = qualname or "<root>"
    if isinstance(mod, _FrozenBase) or not isinstance(mod, _BatchNorm):
        return mod
    name = type(mod).__name__
    if not isinstance(mod, _NormBase) and type(mod) not in TORCH_KNOWN:
        raise ValueError(
            f"freeze: layer {where} is a {name}, a torch BN subclass bnlab does not know; "
            "freezing it would drop its behaviour. Convert it first"
        )
    if not mod.track_running_stats:
        raise ValueError(
            f"freeze: layer {where} ({name}) has track_running_stats=False, so there are no "
            "statistics to freeze; train it with running statistics first"
        )
    act, slope = ("identity", 0.0)
    if isinstance(mod, _NormBase):
        if type(mod).forward is not _NormBase.forward:
            raise ValueError(
                f"freeze: layer {where} is a {name}, which overrides forward, so its frozen "
                "form is unknown; declare an activation with _activation() (or subclass "
                "bnlab.BatchNormAct2d) instead of overriding forward"
            )
        act, slope = mod._activation()
        if act == "identity" and not mod.eval_is_affine():
            raise ValueError(f"freeze: layer {where} ({name}) does not evaluate as an affine "
                             "map (eval_is_affine() is False)")
    rank = torch_rank_class(mod)
    ref = mod.running_mean
    kw: dict[str, Any] = {"device": ref.device, "dtype": ref.dtype}
    if mod.affine and getattr(mod, "bias", None) is None:
        kw["bias"] = False
    if act != "identity":
        if rank is not nn.BatchNorm2d:
            raise ValueError(f"freeze: layer {where} ({name}) applies {act}: only 2d layers "
                             "with an activation can be frozen (FrozenBatchNormAct2d)")
        kw["alpha" if act == "elu" else "negative_slope"] = slope
        new = FrozenBatchNormAct2d(mod.num_features, mod.eps, mod.momentum, mod.affine, True,
                                   act=act, **kw)  # fmt: skip
    else:
        new = _FROZEN[rank or nn.BatchNorm2d](mod.num_features, mod.eps, mod.momentum,
                                              mod.affine, True, **kw)  # fmt: skip
        if rank is None:  # a synchronised layer takes any rank: so does its frozen form
            new._input_dims, new._input_layout = (2, 3, 4, 5), "(N, C, *)"
    with allow_bad_running_stats():  # freezing carries the statistics as they are
        new.load_state_dict(_bn_state(mod))
    # The layer it was frozen from, for unfreeze (not a submodule: no parameters, no state
    # dict entries); a model rebuilt from a state dict unfreezes to plain bnlab layers.
    object.__setattr__(new, "_frozen_from", mod)
    return new


def freeze(model: nn.Module) -> nn.Module:
    """Return a deep copy of ``model`` with every BN layer frozen into a fixed affine map.

    Handles ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm`` and every bnlab layer
    that declares what it computes in evaluation: each becomes a
    :class:`FrozenBatchNorm1d/2d/3d` of its rank, or a :class:`FrozenBatchNormAct2d` when it
    applies an activation (``BatchNormAct2d``, or a variant whose ``_activation()`` says so).
    :func:`unfreeze` turns each back into the layer it was frozen from. The input model is not
    modified; a layer shared by two places stays one layer.

    Raises ``ValueError`` for a layer without running statistics, an unknown torch BN
    subclass, or a bnlab subclass that overrides ``forward`` (its frozen form is unknown).

    Example::

        >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
        >>> type(bnlab.freeze(m)[1]).__name__
        'FrozenBatchNorm2d'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze: model must be a torch.nn.Module, got {type(model).__name__}")
    check_materialised("freeze", model)
    return map_modules(copy_model(model), _freeze_one)


def unfreeze(model: nn.Module) -> nn.Module:
    """Return a deep copy of ``model`` with every frozen layer trainable again.

    Each frozen layer becomes the layer it was frozen from (a torch layer goes back to torch,
    a window-mode layer keeps its window; a directly built ``FrozenBatchNorm2d``, or one loaded
    from a state dict, becomes :class:`bnlab.BatchNorm2d`, a ``FrozenBatchNormAct2d`` a
    :class:`bnlab.BatchNormAct2d`), with the frozen layer's statistics and
    ``num_batches_tracked``, ``weight``/``bias`` as parameters with ``requires_grad=True``, and
    the training flag of ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unfreeze: model must be a torch.nn.Module, got {type(model).__name__}")
    check_materialised("unfreeze", model)
    model = copy_model(model)
    mode = model.training

    def one(mod: nn.Module, qualname: str) -> nn.Module:
        if not isinstance(mod, _FrozenBase):
            return mod
        target = mod.__dict__.get("_frozen_from")
        if target is None:
            kw: dict[str, Any] = {"device": mod.running_mean.device,
                                  "dtype": mod.running_mean.dtype}  # fmt: skip
            if mod.affine and mod.bias is None:
                kw["bias"] = False
            if isinstance(mod, FrozenBatchNormAct2d):
                kw.update(act=mod.act, negative_slope=mod.negative_slope)
                cls: type[nn.Module] = BatchNormAct2d
            else:
                cls = TORCH_TO_BNLAB[torch_rank_class(mod) or nn.BatchNorm2d]
            target = cls(mod.num_features, mod.eps, mod.momentum, mod.affine, True, **kw)
        state = _bn_state(mod)
        for key in ("window_mean", "window_var"):  # a window layer keeps its own ring
            if getattr(target, key, None) is not None:
                state[key] = getattr(target, key)
        with allow_bad_running_stats():
            target.load_state_dict(state, strict=False)
        for p in (target.weight, target.bias):
            if p is not None:
                p.requires_grad_(True)
        return target.train(mode)

    return map_modules(model, one)

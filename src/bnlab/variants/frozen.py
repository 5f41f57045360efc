"""Frozen BN: a fixed per-channel affine map from the running statistics, plus the model-level
tools :func:`freeze` and :func:`unfreeze`.

A frozen layer's ``training`` flag is always ``False``: ``model.train()`` (or assigning
``layer.training = True``) cannot make it normalise with batch statistics or update its
running statistics, the fine-tuning trap of torch's BN. Its ``weight`` and ``bias`` are
buffers, not parameters, so ``model.parameters()`` and ``model.requires_grad_(True)`` do not
reach them either; the state-dict keys are those of BN.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .._base import _NormBase
from ..batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ._docs import fill_docs
from ._dynamic import is_dynamic, map_modules, mixed_class

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "freeze", "unfreeze"]

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

Shape:
    - Input: {layout}
    - Output: same shape and dtype as the input.

Example::

    >>> import torch, bnlab
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


class _FrozenMixin(_NormBase):
    """Inserted above ``_NormBase``: the layer stays in evaluation mode for good."""

    _dyn_prefix = "Frozen"
    _sync_policy = "local"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not track_running_stats:
            raise ValueError(
                f"{type(self).__name__}: a frozen layer is made of running statistics and "
                "needs track_running_stats=True, got track_running_stats=False"
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        _params_to_buffers(self)

    @property
    def training(self) -> bool:  # type: ignore[override]
        return False

    @training.setter
    def training(self, mode: bool) -> None:
        # Module.train() and Module.__init__ assign this; a frozen layer ignores them.
        pass


class FrozenBatchNorm1d(BatchNorm1d, _FrozenMixin):
    pass


class FrozenBatchNorm2d(BatchNorm2d, _FrozenMixin):
    pass


class FrozenBatchNorm3d(BatchNorm3d, _FrozenMixin):
    pass


fill_docs(_DOC, {"1d": FrozenBatchNorm1d, "2d": FrozenBatchNorm2d, "3d": FrozenBatchNorm3d})

_STATIC = {
    BatchNorm1d: FrozenBatchNorm1d,
    BatchNorm2d: FrozenBatchNorm2d,
    BatchNorm3d: FrozenBatchNorm3d,
}
_UNSTATIC = {v: k for k, v in _STATIC.items()}


def _torch_equivalents() -> dict[type, type]:
    from ..sync import SyncBatchNorm

    return {
        nn.BatchNorm1d: BatchNorm1d,
        nn.BatchNorm2d: BatchNorm2d,
        nn.BatchNorm3d: BatchNorm3d,
        nn.SyncBatchNorm: SyncBatchNorm,
    }


def _freeze_one(mod: nn.Module, qualname: str) -> nn.Module:
    where = qualname or "<root>"
    if isinstance(mod, _FrozenMixin):
        return mod
    torch_table = _torch_equivalents()
    unfreeze_to = None
    if isinstance(mod, nn.modules.batchnorm._BatchNorm) and not isinstance(mod, _NormBase):
        if type(mod) not in torch_table:
            raise ValueError(
                f"freeze: layer {where} is a {type(mod).__name__}, a torch BN subclass bnlab "
                "does not know; freezing it would drop its behaviour. Convert it first"
            )
        unfreeze_to = type(mod)
    elif not isinstance(mod, _NormBase):
        return mod
    if not mod.track_running_stats:
        raise ValueError(
            f"freeze: layer {where} ({type(mod).__name__}) has track_running_stats=False, "
            "so there are no statistics to freeze; train it with running statistics first"
        )
    if unfreeze_to is not None:
        target = torch_table[unfreeze_to]
        p = next(iter(mod.buffers()))
        new = target(
            mod.num_features, mod.eps, mod.momentum, mod.affine, True,
            device=p.device, dtype=mod.running_mean.dtype,
        )
        new.load_state_dict(mod.state_dict())
        new._unfreeze_to = unfreeze_to
        mod = new
    mod.__class__ = _STATIC.get(type(mod)) or mixed_class(_FrozenMixin, type(mod))
    _params_to_buffers(mod)
    return mod


def freeze(model: nn.Module) -> nn.Module:
    """Return a deep copy of ``model`` with every BN layer frozen into a fixed affine map.

    Handles ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm`` and every bnlab layer
    (``BatchNorm*``, ``BatchRenorm*``, ``GhostBatchNorm*``, ``SyncBatchNorm``, and subclasses
    such as a fused BN + activation, whose extra behaviour is kept: the frozen class is the
    layer's own class with :class:`FrozenBatchNorm2d`'s behaviour inserted above the base).
    bnlab's ``BatchNorm1d/2d/3d`` become :class:`FrozenBatchNorm1d/2d/3d`. The input model is
    not modified.

    Raises ``ValueError`` for a layer without running statistics or an unknown torch BN
    subclass.

    Example::

        >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
        >>> type(bnlab.freeze(m)[1]).__name__
        'FrozenBatchNorm2d'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze: model must be a torch.nn.Module, got {type(model).__name__}")
    return map_modules(copy.deepcopy(model), _freeze_one)


def unfreeze(model: nn.Module) -> nn.Module:
    """Return a deep copy of ``model`` with every frozen layer trainable again.

    Each frozen layer becomes the class it was frozen from (a torch layer goes back to torch;
    a directly built ``FrozenBatchNorm2d`` becomes :class:`bnlab.BatchNorm2d`), with the same
    running statistics and ``num_batches_tracked``, ``weight``/``bias`` as parameters with
    ``requires_grad=True``, and the training flag of ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unfreeze: model must be a torch.nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model)
    mode = model.training

    def one(mod: nn.Module, qualname: str) -> nn.Module:
        if not isinstance(mod, _FrozenMixin):
            return mod
        cls = type(mod)
        target = _UNSTATIC.get(cls) or (cls._dyn_parent if is_dynamic(cls) else None)
        if target is None:
            raise ValueError(f"unfreeze: cannot tell which class {cls.__name__} was frozen from")
        _buffers_to_params(mod)
        unfreeze_to = mod.__dict__.pop("_unfreeze_to", None)
        mod.__class__ = target
        mod.training = mode
        if unfreeze_to is None:
            return mod
        p = mod.running_mean
        new = unfreeze_to(
            mod.num_features, mod.eps, mod.momentum, mod.affine, True,
            device=p.device, dtype=p.dtype,
        )
        new.load_state_dict(mod.state_dict())
        return new.train(mode)

    return map_modules(model, one)

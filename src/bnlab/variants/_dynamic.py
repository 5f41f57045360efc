"""Layer classes built at run time by inserting a mixin just above ``_NormBase``.

``mixed_class(SyncBatchNorm, BatchNormAct2d)`` is ``class SyncBatchNormAct2d(BatchNormAct2d,
SyncBatchNorm)``. Because the mixin derives from ``_NormBase`` itself, Python's method order
places it *between* the layer's own class and ``_NormBase``: every override of the layer
(a fused activation in ``forward``, a ``_batch_forward`` that calls ``super()``) still runs and
reaches the mixin's hooks where it would have reached the base ones. This is how bnlab's
converters keep subclass behaviour that ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
drops.

The classes are cached, and instances pickle and deep-copy by rebuilding the class from its
importable root and mixins, so ``torch.save(model)`` works across processes.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["mixed_class", "map_modules", "is_dynamic", "root_and_mixins"]

_CACHE: dict[tuple[type, tuple[type, ...]], type] = {}


def is_dynamic(cls: type) -> bool:
    return "_dyn_root" in cls.__dict__


def root_and_mixins(cls: type) -> tuple[type, tuple[type, ...]]:
    """The importable class and the mixins a (possibly dynamic) class was built from."""
    if is_dynamic(cls):
        return cls._dyn_root, cls._dyn_mixins
    return cls, ()


def _build(root: type, mixins: tuple[type, ...]) -> type:
    key = (root, mixins)
    cls = _CACHE.get(key)
    if cls is not None:
        return cls
    cls = root
    for i, mixin in enumerate(mixins):
        sub = _CACHE.get((root, mixins[: i + 1]))
        if sub is None:
            name = f"{mixin._dyn_prefix}{cls.__name__}"
            sub = type(
                name,
                (cls, mixin),
                {
                    "_dyn_root": root,
                    "_dyn_mixins": mixins[: i + 1],
                    "_dyn_parent": cls,
                    "__module__": root.__module__,
                    "__qualname__": name,
                    "__reduce_ex__": _reduce_ex,
                },
            )
            _CACHE[(root, mixins[: i + 1])] = sub
        cls = sub
    return cls


def mixed_class(mixin: type, base: type) -> type:
    """The cached class ``base`` + ``mixin`` (``mixin`` placed just above ``_NormBase``)."""
    root, mixins = root_and_mixins(base)
    return _build(root, (*mixins, mixin))


def _rebuild(root: type, mixins: tuple[type, ...]) -> nn.Module:
    cls = _build(root, mixins)
    return cls.__new__(cls)


def _reduce_ex(self: nn.Module, protocol: int):
    cls = type(self)
    return _rebuild, (cls._dyn_root, cls._dyn_mixins), self.__dict__.copy()


def map_modules(model: nn.Module, fn: Callable[[nn.Module, str], nn.Module]) -> nn.Module:
    """Replace every module ``m`` (root included) by ``fn(m, qualified_name)``, in place.

    Children of a replaced module are not visited again. Returns the (possibly new) root.
    """
    root = fn(model, "")
    if root is not model:
        return root

    def visit(mod: nn.Module, prefix: str) -> None:
        for name, child in list(mod.named_children()):
            full = f"{prefix}.{name}" if prefix else name
            new = fn(child, full)
            if new is not child:
                setattr(mod, name, new)
            else:
                visit(child, full)

    visit(model, "")
    return model

"""Replacing modules in a model tree: the one walk every converter (convert, freeze, unfreeze,
the sync converter) uses."""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

__all__ = ["copy_model", "map_modules"]


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares its layers' process groups: torch can neither copy
    nor pickle a ``ProcessGroup``, and a copy synchronises over the same ranks anyway."""
    memo: dict[int, object] = {}
    for mod in model.modules():
        group = getattr(mod, "process_group", None)
        if group is not None:
            memo[id(group)] = group
    return copy.deepcopy(model, memo)


def map_modules(model: nn.Module, fn: Callable[[nn.Module, str], nn.Module]) -> nn.Module:
    """Replace every module ``m`` (root included) by ``fn(m, qualified_name)``, in place.

    Children of a replaced module are not visited again. A module reachable from two places
    (a shared layer) is mapped once and both places get the same result, so sharing (and the
    parameter count) survives the conversion. Returns the (possibly new) root.
    """
    done: dict[int, nn.Module] = {}

    def one(mod: nn.Module, name: str) -> nn.Module:
        if id(mod) not in done:
            done[id(mod)] = fn(mod, name)
        return done[id(mod)]

    root = one(model, "")
    if root is not model:
        return root
    seen: set[int] = set()

    def visit(mod: nn.Module, prefix: str) -> None:
        if id(mod) in seen:
            return
        seen.add(id(mod))
        for name, child in list(mod._modules.items()):  # every slot: shared ones too
            if child is None:
                continue
            full = f"{prefix}.{name}" if prefix else name
            new = one(child, full)
            if new is not child:
                setattr(mod, name, new)
            else:
                visit(child, full)

    visit(model, "")
    return model

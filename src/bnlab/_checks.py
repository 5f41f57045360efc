"""Argument checks shared by the layers, the converters and the tools.

Each check raises where an argument enters, before anything is built or changed, with the
message form of the whole library: who complains, which argument, what was expected, what was
received (``"BatchNorm2d: affine must be a bool, got 'yes'"``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "check_bool",
    "check_factory",
    "check_materialised",
    "check_module",
    "check_process_group",
    "check_real_weights",
]


def check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a bool, got {value!r}")


def check_process_group(owner: str, group: Any) -> None:
    """``None`` or a ``torch.distributed.ProcessGroup`` (one can be built before
    ``init_process_group``, e.g. with ``torch.distributed.new_group`` afterwards)."""
    cls = getattr(torch.distributed, "ProcessGroup", None)
    if group is None or (cls is not None and isinstance(group, cls)):
        return
    raise TypeError(
        f"{owner}: process_group must be None or a torch.distributed.ProcessGroup, got "
        f"{type(group).__name__}; pass the group torch.distributed.new_group returned, or None "
        "for the default group"
    )


def check_factory(owner: str, device: Any, dtype: Any) -> None:
    """The ``device=`` and ``dtype=`` factory arguments of a layer."""
    if device is not None and not isinstance(device, torch.device):
        expected = (f"{owner}: device must be None, a torch.device or a device string such as "
                    f"'cpu' or 'cuda:0', got {device!r}")
        if isinstance(device, bool) or not isinstance(device, (str, int)):
            raise TypeError(expected)
        try:
            torch.device(device)
        except (RuntimeError, ValueError) as e:
            raise ValueError(expected) from e
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"{owner}: dtype must be None or a floating-point torch.dtype, got {dtype!r}"
        )


def check_module(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, nn.Module):
        raise TypeError(f"{owner}: {name} must be a torch.nn.Module, got {type(value).__name__}")


def check_materialised(owner: str, model: nn.Module) -> None:
    """Refuse a model holding a lazy module (``nn.LazyBatchNorm2d``, ``nn.LazyConv2d``...) whose
    parameters are not created yet: nothing can be copied, converted or measured before its
    first forward."""
    for name, mod in model.named_modules():
        lazy = getattr(mod, "has_uninitialized_params", None)
        if isinstance(mod, nn.modules.lazy.LazyModuleMixin) and lazy is not None and lazy():
            raise ValueError(
                f"{owner}: layer {name or '<root>'} ({type(mod).__name__}) is an uninitialised "
                "lazy module (its parameters are created by its first forward); run one "
                "forward with an example batch first"
            )


def check_real_weights(owner: str, model: nn.Module) -> None:
    """Refuse a model whose parameters or buffers are on the meta device (shapes, no values)."""
    check_materialised(owner, model)
    for kind, items in (("parameter", model.named_parameters()),
                        ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_meta:
                raise ValueError(
                    f"{owner}: {kind} {name!r} is on the meta device (a shape without values); "
                    f"{owner} needs real weights: materialise the model (e.g. "
                    "model.to_empty(device='cpu')) and load its state dict first"
                )

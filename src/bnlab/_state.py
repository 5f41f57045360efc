"""What a bnlab layer accepts from a state dict (its ``_load_from_state_dict`` calls these).

* Running statistics with NaN/Inf, or negative variances, are refused: evaluation would turn
  every output into NaN. :func:`allow_bad_running_stats` loads them anyway, to inspect a broken
  checkpoint.
* A ``running="window"`` layer given a checkpoint without its ring buffers (torch's BN, or a
  bnlab layer with another ``running``) starts its window from the loaded ``running_mean`` /
  ``running_var``: every slot holds them, so the ``num_batches_tracked`` batches they stand for
  are averaged as those statistics, never as empty zero slots. In strict mode it refuses and
  says how to load.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["allow_bad_running_stats", "bad_values", "check_statistics", "missing_window",
           "start_window"]

#: state-dict keys of statistics, and whether each is a variance (negative values are wrong)
_STAT_KEYS = {"running_mean": False, "running_var": True, "window_mean": False,
              "window_var": True, "running_phi": True, "ema_gz": False}  # (PowerNorm's)
_WINDOW_FROM = {"window_mean": "running_mean", "window_var": "running_var"}

_ALLOW: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "bnlab_allow_bad_running_stats", default=False
)


@contextlib.contextmanager
def allow_bad_running_stats() -> Iterator[None]:
    """Let bnlab layers load running statistics that hold NaN, Inf or negative variances.

    Refused by default (evaluation with them gives NaN outputs); inside this context they load
    as they are, e.g. to find the broken layers of a checkpoint::

        with bnlab.allow_bad_running_stats():
            model.load_state_dict(torch.load("broken.pt"))
        print(bnlab.tools.lint(model))   # BN006 names each layer
        bnlab.tools.recalibrate(model, loader)   # or recompute the statistics
    """
    token = _ALLOW.set(True)
    try:
        yield
    finally:
        _ALLOW.reset(token)


def bad_values(t: Any, variance: bool) -> str:
    """What is wrong with a statistics tensor in words (``"1 NaN of 4 values"``), or ``""``.
    Tensors without readable values (meta, fake, integer) are never judged."""
    if type(t) not in (Tensor, nn.Parameter) or t.is_meta or not t.is_floating_point():
        return ""
    parts = []
    for what, mask in (("NaN", torch.isnan(t)), ("Inf", torch.isinf(t))) + (
        (("negative", t < 0),) if variance else ()
    ):
        if bool(mask.any()):
            parts.append(f"{int(mask.sum())} {what}")
    return f"{', '.join(parts)} of {t.numel()} values" if parts else ""


def _who(layer: nn.Module, prefix: str) -> str:
    return f"{type(layer).__name__} {prefix[:-1]!r}" if prefix else type(layer).__name__


def check_statistics(layer: nn.Module, state_dict: dict[str, Any], prefix: str) -> None:
    """Refuse NaN/Inf statistics and negative variances in ``state_dict`` (before anything of
    ``layer`` is loaded), unless :func:`allow_bad_running_stats` is active."""
    if _ALLOW.get():
        return
    for key, variance in _STAT_KEYS.items():
        words = bad_values(state_dict.get(prefix + key), variance)
        if words:
            raise ValueError(
                f"{_who(layer, prefix)}: state dict key '{prefix}{key}' holds {words}; "
                "evaluation with it would give NaN outputs. Recompute the statistics "
                "(bnlab.tools.recalibrate) or fix the checkpoint, or load it anyway inside "
                "`with bnlab.allow_bad_running_stats():` to inspect it"
            )


def _caller_strict(default: bool) -> bool:
    """The ``strict`` the caller of ``Module.load_state_dict`` chose.

    torch passes ``strict=True`` to every module's ``_load_from_state_dict`` and applies the
    caller's choice itself, after every module has loaded; a layer that must refuse before it
    is modified reads that choice from the ``load_state_dict`` frame. Without one (another
    loader calling the hook), ``default``, the argument torch passed, holds.
    """
    code = nn.Module.load_state_dict.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return bool(frame.f_locals.get("strict", default))
        frame = frame.f_back
    return default


def missing_window(
    layer: nn.Module, state_dict: dict[str, Any], prefix: str, strict: bool
) -> list[str]:
    """The window buffers ``state_dict`` lacks while it has the running statistics to start
    them from (``[]`` otherwise). Refuses with ``ValueError`` when the load is strict."""
    missing = [k for k in _WINDOW_FROM if prefix + k not in state_dict]
    if not missing or any(prefix + _WINDOW_FROM[k] not in state_dict for k in missing):
        return []  # a complete window checkpoint, or nothing to start from (torch reports it)
    if _caller_strict(strict):
        raise ValueError(
            f"{_who(layer, prefix)}: the state dict has no "
            f"{', '.join(repr(prefix + k) for k in missing)} (a checkpoint of a layer without "
            f"running='window', such as torch's BN); load it with "
            "load_state_dict(state, strict=False): the window then starts from its "
            "running_mean/running_var, as num_batches_tracked batches of them"
        )
    return missing


@torch.no_grad()
def start_window(layer: nn.Module, missing: list[str]) -> None:
    """Fill each missing ring buffer with the (just loaded) running statistic in every slot.
    The keys stay in ``missing_keys``: they were not in the checkpoint."""
    for key in missing:
        buffer, source = getattr(layer, key), getattr(layer, _WINDOW_FROM[key])
        if source.shape == buffer.shape[1:]:
            buffer.copy_(source.reshape(1, -1).expand_as(buffer))

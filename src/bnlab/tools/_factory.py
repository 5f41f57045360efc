"""Build models from ``module:callable`` strings and read state-dict checkpoints safely.

Checkpoints are read with ``torch.load(weights_only=True)`` (no pickled code runs). Accepted
layouts: a plain state dict, or a dict holding one under ``state_dict``, ``model_state_dict``,
``model_state`` or ``model``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

__all__ = ["build_model", "load_factory", "load_state_dict", "parse_shape"]

_STATE_KEYS = ("state_dict", "model_state_dict", "model_state", "model")


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """``"package.module:callable"`` or ``"path/to/file.py:callable"`` -> the callable."""
    if not isinstance(spec, str) or spec.count(":") != 1 or spec.startswith(":") or \
            spec.endswith(":"):
        raise ValueError(f"model factory must look like 'module:callable' or 'file.py:callable', "
                         f"got {spec!r}")
    mod_name, attr = spec.split(":")
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise ValueError(f"model factory file {mod_name!r} does not exist")
        loaded = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    else:
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        module = importlib.import_module(mod_name)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{mod_name!r} has no callable {attr!r}")
    return factory


def build_model(spec: str) -> nn.Module:
    model = load_factory(spec)()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {spec!r} must return an nn.Module, got "
                        f"{type(model).__name__}")
    return model


def load_state_dict(path: str | Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # missing or unreadable: the OS's message names the file
    except Exception as e:  # noqa: BLE001 - truncated, garbage or pickled code: one answer
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: not a state-dict checkpoint torch.load(weights_only=True) "
                         f"can read ({first[:160]})") from e
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in _STATE_KEYS:
            if isinstance(obj.get(key), dict):
                return obj[key]
    raise ValueError(f"{path}: expected a state dict or a dict with one of {list(_STATE_KEYS)}, "
                     f"got {type(obj).__name__} with keys "
                     f"{list(obj)[:8] if isinstance(obj, dict) else '-'}")


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``"2,1,28,28"`` -> ``(2, 1, 28, 28)``."""
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(v < 0 for v in shape):
        raise ValueError(f"--example-shape must be comma-separated sizes like 2,1,28,28, "
                         f"got {text!r}")
    return shape

"""Build models from ``module:callable`` strings and read state-dict checkpoints safely.

Checkpoints are read with ``torch.load(weights_only=True)`` (no pickled code runs). Accepted
layouts: a plain state dict, or a dict holding one under ``state_dict``, ``model_state_dict``,
``model_state`` or ``model``.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

__all__ = ["build_model", "load_error", "load_factory", "load_into", "load_state_dict",
           "parse_shape"]

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
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"model factory {spec!r}: cannot import {mod_name!r} ({e})") from e
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
    """The state dict in checkpoint ``path``; a ValueError naming the file and what it holds
    instead (nothing, garbage, a cut-off file, a whole pickled model) otherwise."""
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes), not a checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # missing or unreadable: the OS's message names the file
    except Exception as e:  # noqa: BLE001 - truncated, garbage or pickled code: one answer
        if "Unsupported global" in str(e) and "torch.nn.modules" in str(e):
            raise ValueError(f"{path}: a whole pickled model, not a state dict (it would run "
                             "pickled code to load); save it with "
                             "torch.save(model.state_dict(), path)") from e
        raise ValueError(f"{path}: not a state-dict checkpoint torch.load(weights_only=True) "
                         f"can read ({load_error(e)})") from e
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in _STATE_KEYS:
            if isinstance(obj.get(key), dict):
                return obj[key]
    raise ValueError(f"{path}: expected a state dict or a dict with one of {list(_STATE_KEYS)}, "
                     f"got {type(obj).__name__} with keys "
                     f"{list(obj)[:8] if isinstance(obj, dict) else '-'}")


def load_error(e: BaseException) -> str:
    """What went wrong in ``torch.load(weights_only=True)``, in a few words: torch's own
    message is paragraphs of advice (and terminal escapes) around the one line that says it."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    if "WeightsUnpickler error:" in text:
        after = text.split("WeightsUnpickler error:", 1)[1]
        words = next((ln.strip() for ln in after.splitlines() if ln.strip()), "")
        words = words.split(" was not an allowed global")[0]
        return f"not a file of tensors: {words}" if words else "not a file of tensors"
    if "failed finding central directory" in text or "PytorchStreamReader" in text:
        return "truncated or damaged: its zip archive is incomplete"
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return first[:160]


def load_into(model: nn.Module, path: str | Path, spec: str) -> nn.Module:
    """Load checkpoint ``path`` into ``model`` (built by factory ``spec``); a checkpoint of
    another architecture is a ValueError naming both, not torch's multi-line RuntimeError."""
    state = load_state_dict(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        why = "; ".join(line.strip() for line in str(e).splitlines()[1:] if line.strip())
        raise ValueError(f"{path} does not fit the model from {spec}: {why or e}") from e
    return model


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

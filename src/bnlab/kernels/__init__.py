"""Compiled CPU kernels for Batch Normalization, and the choice between them and PyTorch.

bnlab ships a small C extension (``bnlab.kernels._native``, built by ``setup.py``) with the
training forward (statistics, then normalisation: two passes over the input), the evaluation
forward and the backward (fused reductions plus the input gradient),
for contiguous NCHW and channels-last float32/float64 tensors, optionally fused with a ReLU or
leaky ReLU. It works on raw buffers, releases the GIL and runs on ``torch.get_num_threads()``
OpenMP threads. Which implementation runs for an input is decided in one place, the
backend registry :mod:`bnlab.kernels.backends`: these kernels (eagerly, or as the
``bnlab::train_forward`` custom op of :mod:`bnlab.kernels.library` inside ``torch.compile`` and
``torch.export``), torch's own kernels, or plain tensor ops under ``torch.func`` transforms.
:func:`supports` answers for the eager native case.

Which backend runs:

* :func:`backend` returns ``"native"`` or ``"torch"``;
* the environment variable ``BNLAB_KERNELS=torch`` forces PyTorch (``native`` requires the
  extension, ``auto`` or unset picks native when it was built);
* :func:`set_backend` and the context manager :func:`use_backend` override both, e.g. in tests.

If the extension is missing (no compiler at install time) bnlab works on PyTorch alone and
warns once, saying why.

Outputs of 1 MiB and more (``y`` forward, ``dx`` backward) are written into memory mapped
by the extension with transparent huge pages, and freed outputs are kept for reuse, so a
training step does not page-fault its outputs afresh every time (the general-purpose
allocator returns such blocks to the kernel on free; each new one then faults every 4 KiB,
which costs more than the BN arithmetic). The cache holds at most
``BNLAB_BUFFER_CACHE_BYTES`` bytes (default 512 MiB, ``0`` disables it);
:func:`buffer_stats` reports it and :func:`empty_cache` releases it. Tensors backed by such a
buffer cannot be resized in place (``resize_``); everything else is an ordinary tensor.

Example::

    >>> import torch, bnlab
    >>> bnlab.kernels.backend() in ("native", "torch")
    True
    >>> with bnlab.kernels.use_backend("torch"):
    ...     y = bnlab.BatchNorm2d(3)(torch.randn(4, 3, 5, 5))
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Literal, get_args

import torch
from torch import Tensor


def _missing_reason(exc: ImportError, here: str = os.path.dirname(__file__)) -> str:
    """Why the extension did not import. When there is no file of it at all, it was not built:
    then the compiler's error, which setup.py leaves next to where it would be."""
    if any(n.startswith("_native.") and n.endswith((".so", ".pyd")) for n in os.listdir(here)):
        return f"{type(exc).__name__}: {exc}"  # built, but for another interpreter, or broken
    note = os.path.join(here, "_native_build_error.txt")
    if os.path.exists(note):
        with open(note, encoding="utf-8") as f:
            return f"not built when bnlab was installed: {f.read().strip()}"
    return "bnlab.kernels._native was not built when bnlab was installed"


# torch is imported above, before the extension: the extension links libgomp.so.1 without
# shipping one (see `make wheel`) and so shares the OpenMP runtime torch has already loaded.
try:
    from . import _native
except ImportError as exc:  # not built, or built for another interpreter
    _native = None
    _NATIVE_ERROR: str | None = _missing_reason(exc)
else:
    _NATIVE_ERROR = None

Backend = Literal["native", "torch"]
_ENV = "BNLAB_KERNELS"
_ENV_CHOICES = ("auto", "native", "torch")
_forced: Backend | None = None
_warned = False

__all__ = [
    "backend",
    "native_available",
    "native_error",
    "set_backend",
    "use_backend",
    "supports",
    "batch_norm_train",
    "normalize",
    "batch_norm_act_train",
    "normalize_act",
    "supports_eval",
    "empty_cache",
    "buffer_stats",
]


def native_available() -> bool:
    """Whether the compiled extension was built and imports."""
    return _native is not None


def empty_cache() -> None:
    """Release the freed output buffers the native kernels keep for reuse."""
    if _native is not None and hasattr(_native, "empty_cache"):
        _native.empty_cache()


def buffer_stats() -> dict[str, int]:
    """The output-buffer cache: ``cached_buffers``, ``cached_bytes``, ``limit_bytes``, ``hits``
    (outputs served from it) and ``misses`` (fresh mappings). Empty without the extension."""
    if _native is None or not hasattr(_native, "buffer_stats"):
        return {}
    return dict(_native.buffer_stats())


def native_error() -> str | None:
    """Why the compiled extension is unavailable (``None`` when it is available)."""
    return _NATIVE_ERROR


def _check_backend(name: object, owner: str) -> Backend:
    if name not in get_args(Backend):
        raise ValueError(
            f"{owner}: backend must be one of {sorted(get_args(Backend))}, got {name!r}"
        )
    if name == "native" and _native is None:
        raise RuntimeError(
            f"{owner}: the native kernels are not available ({_NATIVE_ERROR}); rebuild with "
            "`pip install --no-build-isolation -e .` (needs a C compiler) or use 'torch'"
        )
    return name  # type: ignore[return-value]


def backend() -> Backend:
    """The backend layers use now: ``"native"`` (compiled kernels) or ``"torch"``."""
    global _warned
    if _forced is not None:
        return _forced
    raw = os.environ.get(_ENV)
    if raw is None:
        env = "auto"
    else:
        env = raw.strip().lower() or "auto"
    if env not in _ENV_CHOICES:
        raise ValueError(
            f"environment variable {_ENV} must be one of {list(_ENV_CHOICES)}, got {env!r}; "
            f"unset it or use {_ENV}=torch to force PyTorch"
        )
    if env == "torch":
        return "torch"
    if env == "native":
        return _check_backend("native", _ENV)
    if _native is None:
        if not _warned:
            _warned = True
            warnings.warn(
                f"bnlab: native BN kernels unavailable ({_NATIVE_ERROR}); using the slower "
                "PyTorch kernels. To get them, install bnlab's prebuilt wheel, or install a C "
                "compiler (e.g. gcc) and reinstall bnlab with `pip install --force-reinstall "
                f"--no-cache-dir`; set {_ENV}=torch to silence this",
                RuntimeWarning,
                stacklevel=2,
            )
        return "torch"
    return "native"


def set_backend(name: Backend | None) -> None:
    """Force ``"native"`` or ``"torch"`` for the whole process; ``None`` restores the default."""
    global _forced
    _forced = None if name is None else _check_backend(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: Backend) -> Iterator[None]:
    """Run the ``with`` block on one backend, restoring the previous choice afterwards."""
    global _forced
    previous = _forced
    _forced = _check_backend(name, "use_backend")
    try:
        yield
    finally:
        _forced = previous


_PLAIN = (Tensor, torch.nn.Parameter)


def _plain_cpu(t: Tensor, dtype: torch.dtype) -> bool:
    return (
        type(t) in _PLAIN
        and t.is_cpu
        and t.dtype == dtype
        and t.layout == torch.strided
    )


def supports(x: Tensor, *per_channel: Tensor | None) -> bool:
    """Whether the native kernels run for input ``x`` and the ``(C,)`` tensors given.

    True for CPU float32/float64 inputs with at least one value, contiguous in NCHW order or
    in channels-last order, per-channel tensors of the same dtype with ``C`` values, outside
    forward-mode AD, functorch transforms, tracing and compilation, and when
    :func:`backend` is ``"native"``.
    """
    if _native is None or torch.compiler.is_compiling() or backend() != "native":
        return False
    if not isinstance(x, Tensor) or x.dtype not in (torch.float32, torch.float64):
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return False  # before any stride query: vmap refuses channels-last ones
    if not _plain_cpu(x, x.dtype) or x.dim() < 2 or x.numel() == 0 or _layout(x) is None:
        return False
    c, dt = x.shape[1], x.dtype
    for t in per_channel:
        # (C,) tensors: plain CPU tensors of x's dtype (attribute reads kept to a minimum:
        # small layers are call-bound)
        if t is not None and not (
            type(t) in _PLAIN and t.dtype is dt and t.is_cpu and t.dim() == 1
            and t.shape[0] == c and t.layout is torch.strided
        ):  # fmt: skip
            return False
    if torch.autograd.forward_ad._current_level >= 0:
        return False
    return not (torch.jit.is_tracing() or torch.jit.is_scripting())


from ._ops import _layout  # noqa: E402  (_ops imports nothing from this module)
from .api import (  # noqa: E402
    batch_norm_act_train,
    batch_norm_train,
    normalize,
    normalize_act,
    supports_eval,
)

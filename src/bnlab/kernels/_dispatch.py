"""The one choice of BN implementation: :func:`choose` decides, from the tensors and the mode
(eager, graph capture, ``torch.func`` transform, FX trace), which backend runs a call.

Backends, by the names ``BNLAB_KERNELS``, :func:`use_backend` and the registry all use:

* ``"native"`` - bnlab's C++ operators (``torch.ops.bnlab``) on CPU float32/float64,
  contiguous or channels-last, and bfloat16 activations beside float32 layers (autocast) for
  a layer's eager step and evaluation;
* ``"torch"`` - torch's own batch-norm kernels (every device and dtype, autocast, FX traces,
  and graphs by default: inductor fuses torch's decomposed BN with the ReLU and pooling around
  it, which an opaque operator cannot join);
* ``"composite"`` - plain differentiable tensor ops (``torch.func`` transforms, forward-mode
  AD, statistics that need a gradient, activations no kernel has);
* backends registered with :func:`bnlab.kernels.backends.register` (a GPU backend), tried
  before ``native``.

``auto`` (the default) picks ``native`` in eager code on the inputs it takes, except where
torch's kernel is equivalent for the caller and faster: a layer's training step or evaluation
on inputs of fewer than :data:`NATIVE_MIN_VALUES` values (:data:`NATIVE_MIN_ROW_VALUES` for
``(N, C)`` inputs), where a call's cost is mostly fixed overhead, which torch's C++ autograd
has less of. Graphs get ``torch``. Forcing
``native`` (``BNLAB_KERNELS=native`` or ``use_backend("native")``) runs the operators for
every input they take, in graphs too; forcing ``torch`` never runs them.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor

from . import _ops

__all__ = [
    "NAMES", "NATIVE_MIN_VALUES", "NATIVE_MIN_ROW_VALUES", "backend", "choose",
    "native_available", "native_error",
    "native_supports", "set_backend", "use_backend",
]

#: the built-in backends' names
NAMES = ("native", "torch", "composite")
#: ``auto`` runs a layer's step on the native operators for eager inputs of at least this many
#: values (NCHW maps; (N, C) rows: :data:`NATIVE_MIN_ROW_VALUES`), measured on 2 threads:
#: below, the operators' fixed cost per call (~20 us more than torch's C++ autograd node)
#: outweighs their faster arithmetic
NATIVE_MIN_VALUES = 32768
#: the same for (N, C) inputs (BatchNorm1d on features), where torch's kernel is quick
NATIVE_MIN_ROW_VALUES = 1 << 19
_ENV = "BNLAB_KERNELS"
_forced: str | None = None
_warned = False
#: backends registered by :func:`bnlab.kernels.backends.register`, tried first
registered: list[ModuleType] = []


def native_available() -> bool:
    """Whether the compiled extension (the operators) was built and loads."""
    return _ops._native is not None


def native_error() -> str | None:
    """Why the compiled extension is unavailable (``None`` when it is available)."""
    return _ops.NATIVE_ERROR


def _names() -> list[str]:
    return sorted([*NAMES, *(b.NAME for b in registered)])


def _check(name: object, owner: str) -> str:
    if name not in _names():
        raise ValueError(f"{owner}: backend must be one of {_names()}, got {name!r}")
    if name == "native" and not native_available():
        raise RuntimeError(
            f"{owner}: the native kernels are not available ({native_error()}); rebuild with "
            "`pip install --no-build-isolation -e .` (needs a C/C++ compiler) or use 'torch'"
        )
    return name  # type: ignore[return-value]


_env_cache: tuple[object, str | None] = ("\0", None)  # (raw value, parsed)

# os.environ.get encodes the key and decodes the value on every call (0.5 us, a third of a
# small layer's dispatch); CPython's os.environ keeps the encoded pairs in a dict, read here
# directly where it exists. Writes through os.environ (monkeypatch.setenv included) update it.
_environ_data = getattr(os.environ, "_data", None)
try:
    _env_key: object = os.environ.encodekey(_ENV)  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - not CPython's os.environ
    _environ_data = None
    _env_key = _ENV


def _env_raw() -> object:
    # (dynamo traces os.environ.get with a guard on this one variable; traced, the dict read
    # would guard on every variable's name and recompile whenever any of them changed)
    if not _is_compiling() and _environ_data is not None:
        return _environ_data.get(_env_key)
    return os.environ.get(_ENV)


def _env() -> str | None:
    global _env_cache
    raw = _env_raw()
    if raw == _env_cache[0]:
        return _env_cache[1]
    raw_text = os.environ.get(_ENV)
    env = (raw_text or "").strip().lower() or "auto"
    if env == "auto":
        parsed = None
    elif env not in _names():
        raise ValueError(
            f"environment variable {_ENV} must be one of {['auto', *_names()]}, got {env!r}; "
            f"unset it or use {_ENV}=torch to force PyTorch"
        )
    else:
        parsed = _check(env, _ENV)
    if not _is_compiling():
        # (traced, the assignment would replay after the graph and fail the guard dynamo put
        # on the old value: every compiled model would compile twice)
        _env_cache = (raw, parsed)
    return parsed


def _warn_missing() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"bnlab: native BN kernels unavailable ({native_error()}); using the slower "
            "PyTorch kernels. To get them, install bnlab's prebuilt wheel, or install a C/C++ "
            "compiler (e.g. gcc) and reinstall bnlab with `pip install --force-reinstall "
            f"--no-cache-dir --no-build-isolation`; set {_ENV}=torch to silence this",
            RuntimeWarning,
            stacklevel=3,
        )


def forced() -> str | None:
    """The backend forced by :func:`use_backend` / :func:`set_backend` or ``BNLAB_KERNELS``
    (``None``: ``auto``)."""
    if _forced is not None:
        return _forced
    env = _env()
    if env is None and not native_available():
        _warn_missing()
    return env


def backend() -> str:
    """The backend eager layers prefer now: ``"native"`` (``auto`` with the extension, or
    forced), ``"torch"``, ``"composite"`` or a registered one's name. Which one runs a call is
    :func:`choose`'s answer for its tensors."""
    f = forced()
    if f is not None:
        return f
    return "native" if native_available() else "torch"


def set_backend(name: str | None) -> None:
    """Force a backend for the whole process; ``None`` restores ``auto``."""
    global _forced
    _forced = None if name is None else _check(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ``with`` block on one backend, restoring the previous choice afterwards."""
    global _forced
    previous = _forced
    _forced = _check(name, "use_backend")
    try:
        yield
    finally:
        _forced = previous


def native_supports(x: Tensor, per_channel: tuple, capturing: bool = False,
                    bfloat16: bool = False) -> bool:  # fmt: skip
    """Whether the operators take ``x`` and its ``(C,)`` tensors: CPU float32/float64 with at
    least one value, contiguous or channels-last, per-channel tensors of ``x``'s dtype with
    ``C`` values. In graphs (fake tensors) the layout is not required: the operator makes an
    odd one contiguous. With ``bfloat16`` also a bfloat16 ``x`` beside float32 per-channel
    tensors (autocast's case), which the operators take for a layer's eager step and
    evaluation (no activation in training, no gradient through the statistics)."""
    if _ops._native is None:
        return False
    dt = x.dtype
    if bfloat16 and dt is torch.bfloat16:
        dt = torch.float32  # the per-channel tensors' dtype
    elif dt is not torch.float32 and dt is not torch.float64:
        return False
    if x.device.type != "cpu":
        return False
    if x.dim() < 2 or x.layout is not torch.strided:
        return False
    if not capturing and (x.numel() == 0 or _ops._layout(x) is None):
        return False
    c = x.shape[1]
    for t in per_channel:
        if t is not None and not (t.dtype is dt and t.device.type == "cpu" and t.dim() == 1
                                  and t.shape[0] == c):  # fmt: skip
            return False
    return True


def torch_supports(x: Tensor, per_channel: tuple) -> bool:
    """torch's kernels take per-channel tensors of ``x``'s dtype, or float32 ones beside a
    half/bfloat16 input (mixed precision)."""
    if not x.is_floating_point() or x.dim() < 2:
        return False
    dt = x.dtype
    low = dt in _ops.LOW_PRECISION
    for t in per_channel:
        if t is not None and t.dtype is not dt and not (low and t.dtype is torch.float32):
            return False
    return True


_is_compiling = torch.compiler.is_compiling
_is_exporting = torch.compiler.is_exporting
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_fwd_ad = torch.autograd.forward_ad
_Proxy = torch.fx.Proxy


def capturing() -> bool:
    """Inside ``torch.compile`` or ``torch.export`` tracing."""
    return _is_compiling() or _is_exporting()


def _worth_it(x: Tensor) -> bool:
    """Whether the operators beat torch's kernel on ``x`` for a layer's step (measured)."""
    n = x.numel()
    if x.dim() == 2 or n == x.shape[0] * x.shape[1]:
        return n >= NATIVE_MIN_ROW_VALUES
    return n >= NATIVE_MIN_VALUES


def choose(x: Tensor, per_channel: tuple = (), train: bool = True, *, detached: bool = False
           ) -> str:  # fmt: skip
    """The backend that runs ``x`` with its ``(C,)`` tensors (``train``: batch statistics, else
    given ones): the one place bnlab chooses an implementation. ``detached``: the caller needs
    no gradient through returned statistics (a layer's step, evaluation), so ``auto`` may run
    torch's kernel on small inputs (their statistics carry none)."""
    graph = _is_compiling() or _is_exporting()
    if not graph:
        if isinstance(x, _Proxy):
            return "torch"  # symbolic_trace records one call torch's FX passes understand
        if _is_wrapped(x) or _fwd_ad._current_level >= 0:
            return "composite"
    f = _forced if _forced is not None else forced()
    if f == "composite":
        return f
    for b in registered:
        if (f is None or f == b.NAME) and b.supports(x, per_channel, train):
            return b.NAME
    if f is None:
        # auto: the operators for large enough eager inputs, torch's kernels elsewhere
        if not graph and (not detached or _worth_it(x)) and native_supports(
            x, per_channel, bfloat16=detached
        ):
            return "native"
    elif f == "native" and (train or not graph) and native_supports(
        x, per_channel, graph, bfloat16=detached and not graph
    ):
        return "native"
    if torch_supports(x, per_channel):
        return "torch"
    return "composite"


# Read BNLAB_KERNELS once now, so that a graph traced before any eager call finds the cache
# filled and guards on its final value (a bad value is reported by the first call that needs
# it, with its message, not by the import).
try:
    _env()
except (ValueError, RuntimeError):
    pass

"""The BN primitives, twice: as calls of bnlab's C++ operators (``native_*``, thin: the
operators check their tensors) and in plain PyTorch (``torch_*``), plus torch's own kernels
(``torch_kernels_*``) as :mod:`bnlab.kernels.autograd` uses them.

The native and the PyTorch versions have the same signatures:

* ``train_forward(x, w, b, eps, act, slope) -> (y, mean, var, invstd, delta, thr)``: batch
  statistics (biased variance), ``y = act((x - mean) * invstd * w + b)``, ``delta`` (the
  rounding of ``mean`` to the tensor's dtype, or ``None`` when it is not tracked) and, for a
  non-identity activation, the per-channel threshold ``thr`` where the pre-activation changes
  sign (``None`` for the identity; its encoding is private to each backend: the native one
  stores it relative to the per-channel pivot, so that it keeps its precision under a large
  common offset);
* ``backward_train(dy, x, mean, invstd, delta, thr, w, b, gmean, gvar, eps, act, slope,
  need_dx) -> (dx, dw, db)`` takes those ``(C,)`` statistics (saved by the autograd function
  beside ``x``), or recomputes them from ``x`` when ``mean`` and ``invstd`` are ``None`` (the
  fused BN + activation saves only ``x`` and ``thr``), and recomputes the activation mask from
  ``thr``. The gradient includes the terms through the batch statistics and
  ``gmean``/``gvar`` arriving at the returned mean and variance;
* ``eval_forward(x, mean, invstd, w, b, act, slope) -> y`` and
  ``backward_eval(dy, x, mean, invstd, w, b, act, slope, need_dx) -> (dx, dw, db)`` with
  fixed statistics.

The PyTorch versions are differentiable (double backward uses the PyTorch composition) and
accept any floating dtype, computing in at least float32.
"""

from __future__ import annotations

import math
import os

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
# shipping one (see `make wheel`) and so shares the OpenMP runtime torch has already loaded,
# and its operators register with torch's dispatcher when it loads.
try:
    from . import _native
except (ImportError, OSError) as exc:  # not built, built for another interpreter or torch
    _native = None
    NATIVE_ERROR: str | None = _missing_reason(exc) if isinstance(exc, ImportError) else (
        f"{type(exc).__name__}: {exc}")
else:
    NATIVE_ERROR = None

ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2}
#: dtypes torch's kernels take with float32 statistics beside them (mixed precision)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _layout(x: Tensor) -> tuple[int, int, int, int] | None:
    """``(nhwc, N, C, S)`` for the kernels, or ``None`` when the strides are not supported.

    NCHW-contiguous tensors with more than one value per sample and channel run as NCHW;
    channels-last ones (and NCHW ones with a single spatial value, which are the same bytes)
    run as NHWC with ``N * H * W`` rows of ``C`` values.
    """
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c)
    if x.is_contiguous():
        return (0, n, c, s) if s > 1 else (1, n, c, 1)
    if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) or (
        x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return (1, n * s, c, 1)
    return None


# The operators of csrc/bnlab_ops.cpp (torch.ops.bnlab.*), resolved once: each checks its
# tensors in C++ (dtype, device, shape, strides) and allocates its outputs there.
# Outputs of at least this many bytes live in the extension's huge-page buffers (see
# csrc/bn_buffers.h); smaller ones come from torch's allocator, where they are cheap.
BUFFER_MIN_BYTES = 1 << 20

if _native is not None:
    _EMPTY = torch.ops.bnlab.empty_like.default
    _RUNNING = torch.ops.bnlab.running_update_.default
    _TRAIN = torch.ops.bnlab.train_forward_update.default
    _EVAL = torch.ops.bnlab.eval_forward.default
    _BACKWARD = torch.ops.bnlab.backward.default


def empty_like(x: Tensor) -> Tensor:
    """An uninitialised tensor like ``x`` as the operators allocate their outputs: large ones
    in a huge-page buffer taken from the cache of freed outputs (page faults every 4 KiB on a
    fresh block would cost more than the BN arithmetic), small ones from torch's allocator."""
    return _EMPTY(x)


class RunningUpdate:
    """A request to move running statistics towards this batch's, inside the training forward.

    ``running_mean += factor * (mean - running_mean)`` and ``running_var += factor * (var *
    unbias - running_var)`` (``unbias = n / (n - 1)``), both skipped when a batch statistic is
    NaN/Inf; ``finite`` tells afterwards which happened. The buffers must be contiguous (the
    kernel writes them in place) and of the input's dtype, with ``C`` values.
    """

    __slots__ = ("running_mean", "running_var", "factor", "unbias", "finite")

    def __init__(self, running_mean: Tensor, running_var: Tensor, factor: float, unbias: float):
        self.running_mean, self.running_var = running_mean, running_var
        self.factor, self.unbias = float(factor), float(unbias)
        self.finite: bool | None = None


def native_train_forward(
    x: Tensor, w: Tensor | None, b: Tensor | None, eps: float, act: str, slope: float,
    update: RunningUpdate | None = None, out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """``bnlab::train_forward_update``. With ``out`` given (``x`` itself for in-place activated
    BN, see :mod:`bnlab.kernels.inplace`) ``y`` is written there: the statistics pass reads all of
    ``x`` before the normalising pass writes each value over the one it was computed from."""
    if update is None:
        y, mean, var, invstd, delta, thr, _ = _TRAIN(x, w, b, None, None, 0.0, 1.0, eps,
                                                     ACT_CODES[act], slope, out)  # fmt: skip
    else:
        rm, rv = update.running_mean, update.running_var
        y, mean, var, invstd, delta, thr, finite = _TRAIN(
            x, w, b, rm, rv, update.factor, update.unbias, eps, ACT_CODES[act], slope, out
        )
        update.finite = finite
        if finite:  # written in place by the kernel: tell autograd the buffers changed
            torch.autograd.graph.increment_version(rm)  # one tensor per call: torch 2.4
            torch.autograd.graph.increment_version(rv)
    return y, mean, var, invstd, delta, None if act == "identity" else thr


def native_eval_forward(
    x: Tensor, mean: Tensor, invstd: Tensor, w: Tensor | None, b: Tensor | None, act: str,
    slope: float, eps: float | None = None,
) -> Tensor:
    """``bnlab::eval_forward``; with ``eps`` given, ``invstd`` is the variance (the kernel takes
    ``1 / sqrt(var + eps)`` in double: no tensor ops around it, for inference)."""
    if eps is not None and not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"native_eval_forward: eps must be a positive finite float, got {eps!r}")
    return _EVAL(x, mean, invstd, w, b, ACT_CODES[act], slope, -1.0 if eps is None else eps)


def _native_backward(dy, x, mean, invstd, delta, thr, w, b, gmean, gvar, eps, act, slope,
                     train, need_dx, code=None):  # fmt: skip
    dx, dw, db = _BACKWARD(dy, x, mean, invstd, delta, thr, w, b, gmean, gvar, eps,
                           ACT_CODES[act] if code is None else code, slope, train,
                           need_dx)  # fmt: skip
    return dx if need_dx else None, dw, db


def native_backward_train(
    dy: Tensor, x: Tensor, mean: Tensor | None, invstd: Tensor | None, delta: Tensor | None,
    thr: Tensor | None, w: Tensor | None, b: Tensor | None, gmean: Tensor | None,
    gvar: Tensor | None, eps: float, act: str, slope: float, need_dx: bool,
) -> tuple[Tensor | None, Tensor, Tensor]:
    return _native_backward(
        dy, x, mean, invstd, delta, thr, w, b, gmean, gvar, eps, act, slope, True, need_dx
    )


def native_backward_from_output(
    dy: Tensor, y: Tensor, invstd: Tensor, w: Tensor | None, b: Tensor | None, act: str,
    slope: float, need_dx: bool,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Training backward of ``y = act(BN(x))`` from the output ``y`` alone (in-place activated
    BN): ``act`` is ``identity`` or ``leaky_relu`` (``slope > 0``), and every ``|w|`` must be
    far enough from zero to divide by (the caller's rule, see :mod:`bnlab.kernels.inplace`).

    The kernel's backward, fed ``z = act^-1(y)`` centred on ``b`` and scaled by ``1 / w``,
    sees ``xhat = (z - b) / w`` (the normalised input, recovered) and returns ``sum(dz xhat)``
    and ``sum(dz)`` as the parameter gradients; the weight it is handed, ``w^2 invstd``, makes
    its input-gradient scale ``w invstd``. The kernel inverts the activation itself
    (``ACT_INV_LEAKY``), so no tensor of ``y``'s size is made besides ``dx``.
    """
    c = y.shape[1]
    cdt = y.dtype
    one = torch.ones(c, dtype=cdt)
    wv = one if w is None else w.detach()
    centre = torch.zeros(c, dtype=cdt) if b is None else b.detach().contiguous()
    code = {"identity": 0, "leaky_relu": 3}[act]
    dx, dw, db = _native_backward(
        dy, y, centre, (1.0 / wv).contiguous(), None, None, (wv * wv * invstd).contiguous(), None,
        None, None, 0.0, "identity", slope, True, need_dx, code=code,
    )
    return dx, dw, db


def native_backward_eval(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, w: Tensor | None, b: Tensor | None,
    act: str, slope: float, need_dx: bool,
) -> tuple[Tensor | None, Tensor, Tensor]:
    return _native_backward(
        dy, x, mean, invstd, None, None, w, b, None, None, 0.0, act, slope, False, need_dx
    )


# ---------------------------------------------------------------------------- torch
def _act(y: Tensor, act: str, slope: float) -> Tensor:
    if act == "relu":
        return torch.relu(y)
    if act == "leaky_relu":
        return torch.nn.functional.leaky_relu(y, slope)
    if act == "elu":  # alpha = slope
        return torch.nn.functional.elu(y, slope)
    return y


def _act_grad(y: Tensor, act: str, slope: float) -> Tensor | None:
    if act == "relu":
        return (y > 0).to(y.dtype)
    if act == "leaky_relu":
        return (y > 0).to(y.dtype) * (1.0 - slope) + slope  # slope kept in y's precision
    return None


def _shape(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


def _dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _cdt(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    var, mean = torch.var_mean(x.to(_cdt(x)), dim=_dims(x), correction=0)
    var = var.clamp_min(0)
    return mean, var, torch.rsqrt(var + eps)


def _threshold(mean: Tensor, invstd: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
    """Where ``(x - mean) * invstd * w + b`` changes sign (+-inf when ``w == 0``)."""
    scale = invstd if w is None else invstd * w.to(invstd.dtype)
    shift = torch.zeros_like(mean) if b is None else b.to(mean.dtype)
    inf = torch.full_like(mean, float("inf"))
    flat = torch.where(shift > 0, -inf, inf)
    return torch.where(scale != 0, mean - shift / torch.where(scale != 0, scale, 1), flat)


def torch_train_forward(
    x: Tensor, w: Tensor | None, b: Tensor | None, eps: float, act: str, slope: float,
    update: RunningUpdate | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, None, Tensor | None]:
    if update is not None:  # layers ask for it on the native path only (_NormBase)
        raise ValueError("torch_train_forward: the in-forward running update is native-only; "
                         f"got update={update!r}")
    mean, var, invstd = _stats(x, eps)
    y = torch_eval_forward(x, mean, invstd, w, b, act, slope)
    thr = None if act == "identity" else _threshold(mean, invstd, w, b)
    return y, mean, var, invstd, None, thr


def torch_eval_forward(
    x: Tensor, mean: Tensor, invstd: Tensor, w: Tensor | None, b: Tensor | None, act: str,
    slope: float,
) -> Tensor:
    cdt = _cdt(x)
    scale = invstd.to(cdt) if w is None else invstd.to(cdt) * w.to(cdt)
    y = (x.to(cdt) - _shape(mean.to(cdt), x)) * _shape(scale, x)
    if b is not None:
        y = y + _shape(b.to(cdt), x)
    return _act(y, act, slope).to(x.dtype)


def _torch_backward(dy, x, mean, invstd, pre, w, gmean, gvar, act, slope, train, need_dx):
    """Shared tail: ``pre`` is any tensor with the sign of the pre-activation."""
    cdt = _cdt(x)
    dims = _dims(x)
    n = x.numel() // x.shape[1]
    r = _shape(invstd.to(cdt), x)
    scale = r if w is None else r * _shape(w.to(cdt), x)
    xm = x.to(cdt) - _shape(mean.to(cdt), x)
    g = dy.to(cdt)
    mask = _act_grad(pre, act, slope)
    if mask is not None:
        g = g * mask
    sg = g.sum(dims)
    sgx = (g * xm).sum(dims)
    dx = None
    if need_dx:
        if train:
            dx = scale * (g - _shape(sg / n, x) - xm * r * r * _shape(sgx / n, x))
            if gmean is not None:
                dx = dx + _shape(gmean.to(cdt) / n, x)
            if gvar is not None:
                dx = dx + xm * _shape(2 * gvar.to(cdt) / n, x)
        else:
            dx = scale * g
        dx = dx.to(x.dtype)
    return dx, sgx * invstd.to(cdt), sg


def torch_backward_train(
    dy: Tensor, x: Tensor, mean: Tensor | None, invstd: Tensor | None, delta: Tensor | None,
    thr: Tensor | None, w: Tensor | None, b: Tensor | None, gmean: Tensor | None,
    gvar: Tensor | None, eps: float, act: str, slope: float, need_dx: bool,
) -> tuple[Tensor | None, Tensor, Tensor]:
    if mean is None or invstd is None:
        mean, _, invstd = _stats(x, eps)
    elif delta is not None:  # a mean rounded to x's dtype: centre on the exact one
        mean = mean.to(_cdt(x)) + delta.to(_cdt(x))
    pre = None
    if thr is not None:
        sign = torch.ones_like(thr) if w is None else torch.where(w < 0, -1.0, 1.0).to(thr.dtype)
        pre = (x.to(thr.dtype) - _shape(thr, x)) * _shape(sign, x)
    return _torch_backward(dy, x, mean, invstd, pre, w, gmean, gvar, act, slope, True, need_dx)


def torch_backward_eval(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, w: Tensor | None, b: Tensor | None,
    act: str, slope: float, need_dx: bool,
) -> tuple[Tensor | None, Tensor, Tensor]:
    cdt = _cdt(x)
    pre = None
    if act != "identity":
        scale = invstd.to(cdt) if w is None else invstd.to(cdt) * w.to(cdt)
        pre = (x.to(cdt) - _shape(mean.to(cdt), x)) * _shape(scale, x)
        if b is not None:
            pre = pre + _shape(b.to(cdt), x)
    return _torch_backward(dy, x, mean, invstd, pre, w, None, None, act, slope, False, need_dx)


# ---------------------------------------------------------------------------- torch's kernels
def _act_(y: Tensor, act: str, slope: float) -> Tensor:
    """The activation in place when nothing records ``y`` for backward (batch_norm's backward
    does not need it); else out of place, so a user's in-place op on the output stays legal."""
    if act == "identity" or not isinstance(y, Tensor):  # (an FX proxy records the module)
        return y if act == "identity" else _act(y, act, slope)
    inplace = not (torch.is_grad_enabled() and y.requires_grad)
    if act == "relu":
        # clamp_min's backward reads its input, not its output: in-place ops on the output
        # (another ReLU(inplace=True), a residual +=) stay legal
        return torch.relu_(y) if inplace else y.clamp_min(0)
    if act == "leaky_relu":
        return torch.nn.functional.leaky_relu(y, slope, inplace=inplace)
    return y


def torch_kernels_forward(
    x: Tensor, w: Tensor | None, b: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """torch's training kernel without its running update: ``(y, mean, biased_var, save_mean,
    save_invstd)``. Temporary ``(C,)`` buffers and momentum 1 hand back the batch mean and
    unbiased variance; they take the parameters' dtype (a bfloat16 model keeps bfloat16 ones),
    and float32 without parameters beside a half input."""
    c = x.shape[1]
    ref = w if w is not None else b
    dtype = ref.dtype if ref is not None else (torch.float32 if x.dtype in LOW_PRECISION
                                               else x.dtype)  # fmt: skip
    with torch.no_grad():
        mean = torch.zeros(c, dtype=dtype, device=x.device)
        uvar = torch.ones(c, dtype=dtype, device=x.device)
    y, save_mean, save_invstd = torch.native_batch_norm(x, w, b, mean, uvar, True, 1.0, eps)
    n = x.numel() // c
    var = uvar * ((n - 1) / n) if n > 1 else uvar
    return y, mean, var, save_mean, save_invstd


def torch_kernels_backward(
    dy: Tensor, x: Tensor, mean: Tensor | None, invstd: Tensor | None, thr: Tensor | None,
    w: Tensor | None, eps: float, act: str, slope: float, needed: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Backward of ``act(BN(x))`` on torch's kernels: the activation's mask from ``x`` and the
    threshold ``thr`` (:func:`_threshold`), the statistics recomputed from ``x`` when ``mean``
    is ``None`` (torch's one-pass kernel: the numbers its forward saved), then
    ``native_batch_norm_backward``."""
    if mean is None:
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        invstd = torch.rsqrt(var + eps)
    g = dy
    if thr is not None:
        # where the pre-activation (x - thr) * sign(w) is positive, compared in place of being
        # computed: no float32 copy of a half x, no (x - thr) tensor
        t = _shape(thr, x)
        mask = x > t
        if w is not None and bool((w < 0).any()):
            mask = torch.where(_shape(w < 0, x), x < t, mask)
        if act == "leaky_relu":
            g = dy * mask.to(dy.dtype).mul_(1.0 - slope).add_(slope)
        else:
            g = dy * mask  # (a bool factor: 2x faster than masked_fill on bfloat16)
    return torch.ops.aten.native_batch_norm_backward(
        g, x, w, None, None, mean, invstd, True, eps,
        [needed[0], w is not None and needed[1], needed[2]],
    )  # fmt: skip


# ---------------------------------------------------------------------------- from the output
def act_inverse(y: Tensor, act: str, slope: float) -> tuple[Tensor, Tensor | None]:
    """``(z, factor)``: the pre-activation ``z = act^-1(y)`` and the activation's derivative at
    it (``None`` for the identity), in ``y``'s dtype. ``act`` is ``identity``, ``leaky_relu``
    (``slope > 0``) or ``elu`` (``alpha = slope``): the invertible activations."""
    if act == "identity":
        return y, None
    pos = y > 0
    one = y.new_ones(())  # (python scalars in torch.where would round slope to float32)
    if act == "leaky_relu":
        return torch.where(pos, y, y / slope), torch.where(pos, one, y.new_full((), slope))
    if act == "elu":  # y = slope (exp(z) - 1) for z <= 0
        neg = torch.log1p(torch.clamp_min(y, -slope) / slope)
        return torch.where(pos, y, neg), torch.where(pos, one, y + slope)
    raise ValueError(f"act_inverse: act must be identity, leaky_relu or elu, got {act!r}")


def torch_backward_from_output(
    dy: Tensor, y: Tensor, invstd: Tensor, w: Tensor | None, b: Tensor | None, act: str,
    slope: float, need_dx: bool, reduce=None,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """:func:`native_backward_from_output` in tensor ops (any device and dtype, and ``elu``).

    ``reduce``, when given, maps this process's ``(sum(dz), sum(dz xhat))`` (one float64
    tensor of ``2C`` values) and the local count to the global ones ``(sums, count)``, for
    synchronised statistics: the input gradient uses the global sums, the parameter gradients
    stay this process's share (as torch's SyncBatchNorm).
    """
    cdt = _cdt(y)
    z, factor = act_inverse(y.to(cdt), act, slope)
    dz = dy.to(cdt) if factor is None else dy.to(cdt) * factor
    wv = None if w is None else _shape(w.to(cdt), y)
    xhat = z if b is None else z - _shape(b.to(cdt), y)
    if wv is not None:
        xhat = xhat / wv
    dims = _dims(y)
    sg, sgx = dz.sum(dims), (dz * xhat).sum(dims)
    n = y.numel() // y.shape[1]
    dx = None
    if need_dx:
        gsg, gsgx = sg, sgx
        if reduce is not None:
            packed, n = reduce(torch.cat([sg, sgx]).double(), n)
            gsg, gsgx = packed.to(cdt).chunk(2)
        scale = _shape(invstd.to(cdt), y) if wv is None else _shape(invstd.to(cdt), y) * wv
        dx = (scale * (dz - _shape(gsg / n, y) - xhat * _shape(gsgx / n, y))).to(y.dtype)
    return dx, sgx, sg

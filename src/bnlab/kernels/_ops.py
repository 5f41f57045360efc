"""The BN primitives, twice: on the compiled kernels and in plain PyTorch.

Both implementations have the same signatures, so the autograd functions in
:mod:`bnlab.kernels.api` pick one without caring which:

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

import torch
from torch import Tensor

try:
    from . import _native
except ImportError:
    _native = None

ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2}
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1}


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


# Outputs of at least this many bytes live in the extension's huge-page buffers (see
# csrc/bn_buffers.h); smaller ones come from torch's allocator, where they are cheap.
BUFFER_MIN_BYTES = 1 << 20
_HAVE_BUFFERS = _native is not None and hasattr(_native, "buffer")


def empty_like(x: Tensor) -> Tensor:
    """An uninitialised tensor with the shape, dtype and (dense) strides of ``x``.

    Large ones are backed by a huge-page buffer of the extension, taken from its cache of freed
    outputs when one fits: the kernels then write into memory that is already faulted in,
    instead of paying a page fault every 4 KiB on each step.
    """
    nbytes = x.numel() * x.element_size()
    if not _HAVE_BUFFERS or nbytes < BUFFER_MIN_BYTES:
        return torch.empty_like(x)
    flat = torch.frombuffer(_native.buffer(nbytes), dtype=x.dtype, count=x.numel())
    # set_ (not as_strided) gives a tensor that owns the storage rather than a view of it:
    # autograd allows in-place ops on it (ReLU(inplace=True), `out += identity`).
    return torch.empty(0, dtype=x.dtype).set_(flat.untyped_storage(), 0, x.shape, x.stride())


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _vec(t: Tensor | None) -> Tensor | None:
    """``t`` as a dense buffer for the kernels (they only read its data pointer)."""
    if t is None or t.is_contiguous():
        return t
    return t.contiguous()


def _like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` with exactly the strides of ``like`` (copied only when they differ)."""
    if t.stride() == like.stride() and t.dtype == like.dtype:
        return t
    out = empty_like(like)
    out.copy_(t)
    return out


# ---------------------------------------------------------------------------- native
def check_native(
    where: str, x: Tensor, eps: float | None = None, **per_channel: Tensor | None
) -> tuple[int, int, int, int]:
    """Refuse, with an exception, what the raw-pointer C entry points cannot check themselves.

    The kernels read ``x`` and every per-channel tensor through data pointers: a wrong dtype,
    device, channel count or stride would read out of bounds instead of failing. Each native
    wrapper below calls this first and gets the kernels' layout of ``x`` back. The checks are
    one pass of attribute reads (a few microseconds); the message is built only on failure.
    """
    layout = None
    ok = isinstance(x, Tensor) and x.dtype in _DTYPE_CODES and x.is_cpu and x.dim() >= 2
    if ok and x.numel() != 0:
        layout = _layout(x)
    if layout is not None:
        dt, c = x.dtype, x.shape[1]
        for t in per_channel.values():
            if t is not None and (t.dtype is not dt or t.numel() != c or not t.is_cpu):
                layout = None
                break
    if layout is None or (eps is not None and not (eps > 0 and math.isfinite(eps))):
        _explain(where, x, eps, per_channel)
    return layout


def _explain(where: str, x, eps, per_channel: dict) -> None:
    """Raise the error :func:`check_native` found, naming the argument and the value."""
    if not isinstance(x, Tensor) or x.dtype not in _DTYPE_CODES or not x.is_cpu:
        got = type(x).__name__ if not isinstance(x, Tensor) else f"{x.dtype} on {x.device}"
        raise TypeError(f"{where}: x must be a CPU float32/float64 tensor, got {got}")
    if x.dim() < 2 or x.numel() == 0 or _layout(x) is None:
        raise ValueError(f"{where}: x must be a non-empty (N, C, *) tensor, contiguous or "
                         f"channels-last, got shape {tuple(x.shape)} strides {x.stride()}")
    c = x.shape[1]
    for name, t in per_channel.items():
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dtype != x.dtype or not t.is_cpu:
            raise TypeError(f"{where}: {name} must be a CPU {x.dtype} tensor like x, got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
        if t.numel() != c:
            raise ValueError(f"{where}: {name} must have C={c} values, got shape "
                             f"{tuple(t.shape)}")
    raise ValueError(f"{where}: eps must be a positive finite float, got {eps!r}")


class RunningUpdate:
    """A request to move running statistics towards this batch's, inside the training forward.

    ``running_mean += factor * (mean - running_mean)`` and ``running_var += factor * (var *
    unbias - running_var)`` (``unbias = n / (n - 1)``), both skipped when a batch statistic is
    NaN/Inf; ``finite`` tells afterwards which happened. The buffers must be contiguous (the
    kernel writes them through raw pointers) and of the input's dtype, with ``C`` values.
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
    """With ``out`` given (``x`` itself for in-place activated BN, see
    :mod:`bnlab.kernels.inplace`) ``y`` is written there: the statistics pass reads all of
    ``x`` before the normalising pass writes each value over the one it was computed from."""
    nhwc, n, c, s = check_native("native_train_forward", x, eps, weight=w, bias=b,
                 running_mean=None if update is None else update.running_mean,
                 running_var=None if update is None else update.running_var)
    if out is not None and (out.shape != x.shape or out.stride() != x.stride()
                            or out.dtype != x.dtype):  # fmt: skip
        raise ValueError("native_train_forward: out must have x's shape, strides and dtype, "
                         f"got {tuple(out.shape)} {out.stride()} {out.dtype}")
    y = empty_like(x) if out is None else out
    mean, var = x.new_empty(c), x.new_empty(c)  # returned: separate tensors
    invstd, delta = x.new_empty(c), x.new_empty(c)  # saved for backward; no aliasing outputs
    thr = None if act == "identity" else x.new_empty(c)
    w, b = _vec(w), _vec(b)
    rm = rv = None
    if update is not None:
        rm, rv = update.running_mean, update.running_var
    finite = _native.train_fwd(
        _DTYPE_CODES[x.dtype], nhwc, x.data_ptr(), y.data_ptr(), n, c, s, _ptr(w), _ptr(b),
        mean.data_ptr(), var.data_ptr(), invstd.data_ptr(), delta.data_ptr(), _ptr(thr),
        float(eps), ACT_CODES[act], float(slope), _ptr(rm), _ptr(rv),
        update.factor if update else 0.0, update.unbias if update else 1.0,
        torch.get_num_threads(),
    )  # fmt: skip
    if update is not None:
        update.finite = finite
        if finite:  # written through raw pointers: tell autograd the buffers changed
            torch.autograd.graph.increment_version(rm)  # one tensor per call: torch 2.4
            torch.autograd.graph.increment_version(rv)
    return y, mean, var, invstd, delta, thr


def native_eval_forward(
    x: Tensor, mean: Tensor, invstd: Tensor, w: Tensor | None, b: Tensor | None, act: str,
    slope: float, eps: float | None = None,
) -> Tensor:
    """Evaluation BN on the kernels; with ``eps`` given, ``invstd`` is the variance (the kernel
    takes ``1 / sqrt(var + eps)`` in double: no tensor ops around it, for inference)."""
    nhwc, n, c, s = check_native("native_eval_forward", x, eps, mean=mean, invstd=invstd,
                                 weight=w, bias=b)
    y = empty_like(x)
    mean, invstd, w, b = _vec(mean), _vec(invstd), _vec(w), _vec(b)
    _native.eval_fwd(
        _DTYPE_CODES[x.dtype], nhwc, x.data_ptr(), y.data_ptr(), n, c, s, mean.data_ptr(),
        invstd.data_ptr(), _ptr(w), _ptr(b), ACT_CODES[act], float(slope),
        torch.get_num_threads(), -1.0 if eps is None else float(eps),
    )  # fmt: skip
    return y


def _native_backward(dy, x, mean, invstd, delta, thr, w, b, gmean, gvar, eps, act, slope,
                     train, need_dx, code=None):  # fmt: skip
    nhwc, n, c, s = check_native(
        "native_backward", x, eps if train and mean is None else None, mean=mean, invstd=invstd,
        delta=delta, thr=thr, weight=w, bias=b, grad_mean=gmean, grad_var=gvar,
    )
    if not isinstance(dy, Tensor) or dy.shape != x.shape:
        raise ValueError(f"native_backward: dy must have x's shape {tuple(x.shape)}, got "
                         f"{tuple(dy.shape) if isinstance(dy, Tensor) else type(dy).__name__}")
    dy = _like(dy, x)
    dx = empty_like(x) if need_dx else None
    dw, db = x.new_empty(c), x.new_empty(c)
    vecs = [_vec(t) for t in (mean, invstd, delta, thr, w, b, gmean, gvar)]
    _native.backward(
        _DTYPE_CODES[x.dtype], nhwc, dy.data_ptr(), x.data_ptr(), _ptr(dx), n, c, s,
        *[_ptr(t) for t in vecs], dw.data_ptr(), db.data_ptr(), float(eps),
        ACT_CODES[act] if code is None else code, float(slope), int(bool(train)),
        torch.get_num_threads(),
    )  # fmt: skip
    return dx, dw, db


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

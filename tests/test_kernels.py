"""Native and PyTorch BN kernels against a float64 reference, on both backends."""

from __future__ import annotations

import contextlib
import gc
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnlab
from bnlab import functional as F
from bnlab import kernels
from bnlab.kernels import _ops

# the operators and their PyTorch composition (tensor ops), held to one float64 reference
BACKENDS = ["native", "composite"]


def reference(x, w, b, eps=1e-5, act="identity", slope=0.01):
    """Naive float64 training BN (+ activation): ``(y, mean, biased_var)``."""
    xd = x.double()
    dims = [0, *range(2, x.dim())]
    mean = xd.mean(dims)
    shape = (1, -1, *([1] * (x.dim() - 2)))
    var = ((xd - mean.reshape(shape)) ** 2).mean(dims)
    y = (xd - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps)
    if w is not None:
        y = y * w.double().reshape(shape) + b.double().reshape(shape)
    if act == "relu":
        y = torch.relu(y)
    elif act == "leaky_relu":
        y = torch.nn.functional.leaky_relu(y, slope)
    return y, mean, var


def reference_grads(x, w, b, dy, act="identity", eps=1e-5):
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_()
    y = reference(xd, wd, bd, eps, act)[0]
    return torch.autograd.grad(y, (xd, wd, bd), dy.double())


def rel(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def make(shape, dtype=torch.float32, channels_last=False, offset=0.0, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * std + offset
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, dy


@pytest.fixture(params=BACKENDS)
def backend(request):
    with kernels.use_backend(request.param):
        yield request.param


PATHS = ["views", "runs", "plain", "channels"]


@contextlib.contextmanager
def native_path(path: str):
    """The native paths: "views" runs NCHW planes shorter than a cache line as rows of C * S
    columns and channels-last rows of C channels (C not a whole number of vectors) VL rows at
    a time (by default up to 32768 and 4096 columns); "runs" sums the other short NCHW planes
    in per-channel vectors (by default below 256 values); "plain" goes plane by plane and row by
    row; "channels" runs NCHW tensors channel by channel (planes of at least 1 KiB and at least
    4 channels a thread: by default for channels of up to 4 MiB); the other three never do."""
    native = _ops._native
    knobs = (native.set_wide_columns(1 << 30 if path == "views" else 0),
             native.set_tile_columns(1 << 30 if path == "views" else 0),
             native.set_plane_runs(path != "plain"),
             native.set_channel_major(1 << 60 if path == "channels" else 0))  # fmt: skip
    try:
        yield path
    finally:
        native.set_wide_columns(knobs[0])
        native.set_tile_columns(knobs[1])
        native.set_plane_runs(knobs[2])
        native.set_channel_major(knobs[3])


@pytest.fixture(params=PATHS)
def plane_path(request):
    with native_path(request.param):
        yield request.param


def test_native_extension_was_built(monkeypatch):
    # `make test` builds the extension; a silent build failure must fail here (also when the
    # suite runs under BNLAB_KERNELS=torch: the default backend is still the native one).
    assert kernels.native_available(), kernels.native_error()
    monkeypatch.delenv("BNLAB_KERNELS", raising=False)
    assert kernels.backend() == "native"


# (70, 45, 2, 1): channels-last rows of 45 channels (whole vectors, then 5 single channels)
# in row blocks that do not divide 140 rows; (3, 1030, 2, 3): more channels than one NHWC
# accumulation window (1024); (2, 3, 10, 103): NCHW planes longer than one accumulation block;
# (3, 8, 16, 17): NCHW planes of 272 values and 8 channels, channel by channel ("channels").
@pytest.mark.parametrize(
    "shape",
    [(8, 3, 5, 5), (4, 6, 7, 9), (16, 32, 3, 3), (5, 3, 1, 1), (70, 45, 2, 1), (3, 1030, 2, 3),
     (2, 3, 10, 103), (3, 8, 16, 17)],
)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu"])
def test_train_forward_backward_match_reference(backend, plane_path, shape, channels_last, dtype,
                                                act):  # fmt: skip
    x, w, b, dy = make(shape, dtype, channels_last)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    assert kernels.supports(x, w, b) == (backend == "native")
    y, mean, var = kernels.batch_norm_act_train(x, w, b, 1e-5, act)
    yr, mr, vr = reference(x.detach(), w, b, 1e-5, act)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    rx, rw, rb = reference_grads(x, w, b, dy, act)
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    std = vr.sqrt().max()
    assert (mean.double() - mr).abs().max() <= tol * (mr.abs().max() + std)
    for got, want in [(y, yr), (var, vr), (gx, rx), (gw, rw), (gb, rb)]:
        assert got.dtype == dtype
        assert rel(got, want) <= tol
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last or shape[2] == 1


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "shape,offset,std", [((2, 3, 224, 224), 0.0, 1.0), ((2, 3, 224, 224), 1e4, 1e-2)]
)
@pytest.mark.parametrize("act", ["identity", "relu"])  # saved / recomputed statistics
def test_float32_accuracy_long_channels_and_offset(backend, channels_last, shape, offset, std,
                                                   act):  # fmt: skip
    # 50176 values per sample and channel, and a common offset 1e6 times the std: a plain
    # float sum or E[x^2] - E[x]^2 loses every digit here.
    x, w, b, dy = make(shape, torch.float32, channels_last, offset, std)
    x.requires_grad_()
    y, mean, var = kernels.batch_norm_act_train(x, None, None, 1e-5, act)
    yr, mr, vr = reference(x.detach(), None, None, act=act)
    (gx,) = torch.autograd.grad(y, x, dy)
    xd = x.detach().double().requires_grad_()
    (rx,) = torch.autograd.grad(reference(xd, None, None, act=act)[0], xd, dy.double())
    if backend == "native":  # the claim is about bnlab's own kernels
        assert rel(mean, mr) <= 1e-5 or (mean.double() - mr).abs().max() <= 1e-5 * vr.sqrt().max()
        assert rel(var, vr) <= 1e-5
        assert rel(y, yr) <= 1e-5
        assert rel(gx, rx) <= 1e-5
    else:  # torch's own var_mean is stable too; its output suffers from the offset
        assert rel(var, vr) <= 1e-4


# (96, 2048): BatchNorm1d input with C a multiple of 1024, whose pivots are summed row by row
# in float32 (a column walk thrashed one L1 set); (64, 4, 3, 3): NCHW read as rows of 36
# columns; (64, 4, 7, 7): NCHW sums over runs of short planes in float32 vectors.
@pytest.mark.parametrize("shape", [(96, 2048), (64, 4, 3, 3), (64, 4, 7, 7)])
@pytest.mark.parametrize("act", ["identity", "relu"])  # saved / recomputed statistics
def test_float32_accuracy_short_rows_and_planes_with_offset(shape, act):
    # A common offset of 1e6 standard deviations must leave every digit of the normalised
    # values on the paths for short planes and wide rows too.
    x, _, _, dy = make(shape, torch.float32, offset=1e4, std=1e-2)
    x.requires_grad_()
    with kernels.use_backend("native"):
        y, mean, var = kernels.batch_norm_act_train(x, None, None, 1e-5, act)
        (gx,) = torch.autograd.grad(y, x, dy)
    yr, mr, vr = reference(x.detach(), None, None, act=act)
    xd = x.detach().double().requires_grad_()
    (rx,) = torch.autograd.grad(reference(xd, None, None, act=act)[0], xd, dy.double())
    assert rel(var, vr) <= 1e-5
    assert rel(y, yr) <= 1e-5
    assert rel(gx, rx) <= 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu"])
@pytest.mark.parametrize("shape", [(6, 5, 4, 3), (3, 8, 16, 17)])  # the second: by channel
def test_eval_forward_and_backward_match_reference(backend, plane_path, channels_last, act,
                                                   shape):  # fmt: skip
    x, w, b, dy = make(shape, torch.float32, channels_last)
    c = shape[1]
    mean, var = torch.randn(c) * 0.1, torch.rand(c) + 0.5
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    y = kernels.normalize_act(x, mean, var, w, b, 1e-5, act)
    shape = (1, -1, 1, 1)

    def ref(xd, wd, bd):
        z = (xd - mean.double().reshape(shape)) / torch.sqrt(var.double().reshape(shape) + 1e-5)
        z = z * wd.reshape(shape) + bd.reshape(shape)
        return {"relu": torch.relu, "leaky_relu": torch.nn.functional.leaky_relu}.get(
            act, lambda t: t
        )(z)

    args = [t.detach().double().requires_grad_() for t in (x, w, b)]
    yr = ref(*args)
    assert rel(y, yr) <= 2e-6
    got = torch.autograd.grad(y, (x, w, b), dy)
    want = torch.autograd.grad(yr, args, dy.double())
    for g, r in zip(got, want, strict=True):
        assert rel(g, r) <= 2e-5
    # inference (no autograd node): the native kernel takes the variance and eps itself
    with torch.no_grad():
        y_inf = kernels.normalize_act(x, mean, var, w, b, 1e-5, act)
    assert y_inf.grad_fn is None
    assert rel(y_inf, yr.detach()) <= 2e-6


def test_gradients_flow_through_mean_and_var_outputs(backend):
    x, w, b, _ = make((4, 3, 5, 5), torch.float64)
    x.requires_grad_()
    _, mean, var = kernels.batch_norm_train(x, w, b, 1e-5)
    gm, gv = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    (got,) = torch.autograd.grad((mean, var), x, (gm, gv))
    xd = x.detach().requires_grad_()
    _, mr, vr = reference(xd, w, b)
    (want,) = torch.autograd.grad((mr, vr), xd, (gm, gv))
    assert rel(got, want) <= 1e-10


@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_float64(backend, act, channels_last):
    x, w, b, _ = make((3, 2, 3, 3), torch.float64, channels_last)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()

    def fn(x, w, b):
        y, mean, var = kernels.batch_norm_act_train(x, w, b, 1e-3, act)
        return y, mean, var

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5)


def test_double_backward_uses_the_composition(backend):
    x, w, b, _ = make((3, 2, 3, 3), torch.float64)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()

    def fn(x, w, b):
        return kernels.batch_norm_act_train(x, w, b, 1e-3, "leaky_relu", 0.2)[0]

    assert torch.autograd.gradgradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5)


def test_functional_dispatch_follows_the_backend():
    x, w, b, _ = make((4, 3, 5, 5))
    with kernels.use_backend("native"):
        y_native = F.batch_norm_train(x.requires_grad_(), w, b, 1e-5)[0]
        assert type(y_native.grad_fn).__name__ == "TrainBNBackward"
        # unsupported inputs fall back to PyTorch, correctly
        y_half = F.batch_norm_train(x.detach().bfloat16(), w, b, 1e-5)[0]
        y_strided = F.batch_norm_train(x.detach().transpose(2, 3), w, b, 1e-5)[0]
    with kernels.use_backend("torch"):
        y_torch = F.batch_norm_train(x, w, b, 1e-5)[0]
        assert type(y_torch.grad_fn).__name__ != "TrainBNBackward"
    assert rel(y_native, y_torch.double()) <= 1e-5
    assert rel(y_half.float(), y_torch.double()) <= 1e-2
    assert rel(y_strided, y_torch.transpose(2, 3).double()) <= 1e-5


def test_unsupported_inputs_are_reported():
    x = torch.randn(4, 3, 5, 5)
    with kernels.use_backend("native"):
        assert kernels.supports(x)
        assert not kernels.supports(x.half())
        assert not kernels.supports(x[:, :, ::2])  # odd strides
        assert not kernels.supports(x, torch.ones(3, dtype=torch.float64))  # mixed dtypes
        assert not kernels.supports(x, torch.ones(4))  # wrong channel count
        assert not kernels.supports(x[:0])  # empty batch
        with torch.autograd.forward_ad.dual_level():
            assert not kernels.supports(x)
    with kernels.use_backend("torch"):
        assert not kernels.supports(x)


def test_backend_selection_env_and_errors(monkeypatch):
    monkeypatch.setenv("BNLAB_KERNELS", "torch")
    assert kernels.backend() == "torch"
    with kernels.use_backend("native"):  # an explicit choice beats the environment
        assert kernels.backend() == "native"
    assert kernels.backend() == "torch"
    monkeypatch.setenv("BNLAB_KERNELS", "fast")
    with pytest.raises(ValueError, match="BNLAB_KERNELS must be one of"):
        kernels.backend()
    monkeypatch.delenv("BNLAB_KERNELS")
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.set_backend("cuda")
    with pytest.raises(ValueError, match="act must be one of"):
        kernels.batch_norm_act_train(torch.randn(2, 3, 2), None, None, 1e-5, "gelu")


def test_missing_extension_falls_back_and_warns_once(monkeypatch):
    from bnlab.kernels import _dispatch, _ops

    monkeypatch.delenv("BNLAB_KERNELS", raising=False)
    monkeypatch.setattr(_ops, "_native", None)
    monkeypatch.setattr(_ops, "NATIVE_ERROR", "ImportError: simulated")
    monkeypatch.setattr(_dispatch, "_warned", False)
    with pytest.warns(RuntimeWarning, match="simulated"):
        assert kernels.backend() == "torch"
    assert kernels.backend() == "torch"  # no second warning (pytest would not fail on it)
    assert _dispatch._warned
    assert not kernels.supports(torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError, match="not available"):
        kernels.set_backend("native")
    bn = bnlab.BatchNorm2d(3)
    assert bn(torch.randn(4, 3, 2, 2)).shape == (4, 3, 2, 2)


def test_layer_results_equal_on_both_backends():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 6, 6) * 3 + 1
    dy = torch.randn_like(x)
    out = {}
    for name in ("native", "torch", "composite"):  # every backend a layer can run on
        with kernels.use_backend(name):
            bn = bnlab.BatchNorm2d(4)
            xx = x.clone().requires_grad_()
            bn(xx).backward(dy)
            bn.eval()
            out[name] = (xx.grad, bn.weight.grad, bn.running_mean, bn.running_var, bn(x))
    for other in ("torch", "composite"):
        for a, b in zip(out["native"], out[other], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_non_matching_upstream_gradient_layout_is_handled():
    x, w, b, dy = make((4, 3, 5, 5), torch.float64, channels_last=True)
    _, mean, _, invstd, delta, _ = _ops.native_train_forward(x, w, b, 1e-5, "identity", 0.0)
    with kernels.use_backend("native"):
        out = _ops.native_backward_train(dy.contiguous(), x, mean, invstd, delta, None, w, None,
                                         None, None, 1e-5, "identity", 0.0, True)  # fmt: skip
    ref = _ops.torch_backward_train(dy, x, mean, invstd, delta, None, w, None, None, None, 1e-5,
                                    "identity", 0.0, True)  # fmt: skip
    for a, r in zip(out, ref, strict=True):
        assert rel(a, r) <= 1e-10


@pytest.fixture
def streaming_always():
    """Force the non-temporal-store paths (normally only for outputs >= 24 MB) for one test."""
    previous = _ops._native.set_stream_bytes(0)
    try:
        yield
    finally:
        _ops._native.set_stream_bytes(previous)


# (4, 8, 5, 7): NCHW planes of 35 values start unaligned; C=8 rows stream in NHWC, C=6 do not;
# (2, 1040, 2, 2): channels-last rows of more than one window of channels, and NCHW as rows of
# 4160 columns; (3, 6, 2, 3): NCHW as rows of 36 columns, not a whole number of vectors;
# (3, 8, 16, 17): channel by channel, planes of whole cache lines.
@pytest.mark.parametrize("shape", [(4, 8, 5, 7), (3, 6, 4, 4), (2, 1040, 2, 2), (3, 6, 2, 3),
                                   (3, 8, 16, 17)])  # fmt: skip
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu"])
def test_streaming_stores_give_the_reference_results(streaming_always, plane_path, shape,
                                                     channels_last, dtype, act):  # fmt: skip
    x, w, b, dy = make(shape, dtype, channels_last)
    with kernels.use_backend("native"):
        y, mean, var, invs, delta, thr = _ops.native_train_forward(x, w, b, 1e-5, act, 0.01)
        dx, dw, db = _ops.native_backward_train(dy, x, mean, invs, delta, thr, w, b, None, None,
                                                1e-5, act, 0.01, True)  # fmt: skip
        # the fused layer's path: statistics recomputed from x
        dx2, dw2, db2 = _ops.native_backward_train(dy, x, None, None, None, thr, w, b, None,
                                                   None, 1e-5, act, 0.01, True)  # fmt: skip
        invstd = torch.rsqrt(var + 1e-5)
        ye = _ops.native_eval_forward(x, x.new_zeros(shape[1]), invstd, w, b, act, 0.01)
    yr = reference(x, w, b, 1e-5, act)[0]
    rx, rw, rb = reference_grads(x, w, b, dy, act)
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    for got, want in [(y, yr), (dx, rx), (dw, rw), (db, rb), (dx2, rx), (dw2, rw), (db2, rb)]:
        assert rel(got, want) <= tol
    ye_ref = _ops.torch_eval_forward(x, x.new_zeros(shape[1]), invstd, w, b, act, 0.01)
    assert rel(ye, ye_ref.double()) <= tol


# ---------------------------------------------------------------------------- output buffers
needs_buffers = pytest.mark.skipif(
    _ops._native is None or not hasattr(_ops._native, "set_cache_limit"),
    reason="the native extension was not built with output buffers (no mmap on this platform)",
)


@needs_buffers
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_outputs_live_in_reused_buffers(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(16, 32, 24, 24).contiguous(memory_format=fmt)  # 1.2 MB: buffer-backed
    assert x.numel() * 4 >= _ops.BUFFER_MIN_BYTES
    w, b = torch.rand(32) + 0.5, torch.randn(32)
    ref = _ops.torch_train_forward(x, w, b, 1e-5, "identity", 0.0)[0]
    bnlab.kernels.empty_cache()  # earlier tests' buffers would be candidates too
    before = bnlab.kernels.buffer_stats()
    y = _ops.native_train_forward(x, w, b, 1e-5, "identity", 0.0)[0]
    assert y.stride() == x.stride() and y.shape == x.shape
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    ptr = y.data_ptr()
    del y  # the buffer goes back to the cache ...
    y2 = _ops.native_train_forward(x, w, b, 1e-5, "identity", 0.0)[0]
    after = bnlab.kernels.buffer_stats()
    assert y2.data_ptr() == ptr  # ... and the next output of that size reuses it
    assert after["hits"] >= before["hits"] + 1
    torch.testing.assert_close(y2, ref, rtol=1e-5, atol=1e-5)


@needs_buffers
def test_buffer_outlives_every_python_reference_but_the_tensor():
    x = torch.randn(8, 64, 32, 32)
    y = _ops.empty_like(x)
    y.fill_(3.0)
    other = _ops.empty_like(x)  # y is alive: it must not be handed out again
    assert other.data_ptr() != y.data_ptr()
    other.fill_(-1.0)
    gc.collect()
    assert torch.all(y == 3.0)
    with pytest.raises(RuntimeError):
        y.resize_(2 * y.numel())  # documented: buffer-backed tensors are not resizable


@needs_buffers
def test_buffer_cache_limit_and_empty_cache():
    x = torch.randn(8, 64, 32, 32)
    previous = _ops._native.set_cache_limit(0)
    try:
        bnlab.kernels.empty_cache()
        y = _ops.empty_like(x)
        del y
        assert bnlab.kernels.buffer_stats()["cached_bytes"] == 0  # limit 0: nothing kept
        _ops._native.set_cache_limit(1 << 30)
        y = _ops.empty_like(x)
        del y
        stats = bnlab.kernels.buffer_stats()
        assert stats["cached_buffers"] == 1 and stats["cached_bytes"] >= x.numel() * 4
        bnlab.kernels.empty_cache()
        assert bnlab.kernels.buffer_stats()["cached_bytes"] == 0
    finally:
        _ops._native.set_cache_limit(previous)


def test_small_outputs_use_torch_allocator():
    x = torch.randn(2, 3, 4, 4)
    y = _ops.empty_like(x)
    assert y.untyped_storage().resizable()  # an ordinary torch allocation


def test_simd_build_in_use_is_reported():
    info = _ops._native.build_info()
    assert info["simd"] in ("avx2", "baseline")
    if os.environ.get("BNLAB_SIMD") == "baseline":
        assert info["simd"] == "baseline"


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_through_returned_statistics_with_a_zero_weight(backend, channels_last):
    # mean and var are differentiable outputs; with w == 0 only their gradients reach x.
    x, w, b, dy = make((6, 4, 3, 5), torch.float64, channels_last)
    w = w.clone()
    w[1] = 0.0
    gm, gv = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    x.requires_grad_()
    y, mean, var = kernels.batch_norm_train(x, w, b, 1e-5)
    got = torch.autograd.grad((y * dy).sum() + (mean * gm).sum() + (var * gv).sum(), x)[0]
    xd = x.detach().clone().requires_grad_()
    yr, mr, vr = reference(xd, w, b)
    want = torch.autograd.grad((yr * dy).sum() + (mr * gm).sum() + (vr * gv).sum(), xd)[0]
    assert rel(got, want) <= 1e-10


@pytest.mark.parametrize("running", ["strided", "expanded"])
def test_non_contiguous_running_buffers_take_the_generic_update(running):
    # The one-call native step writes the running buffers in place from C++: buffers that are
    # views with other strides must take the generic path and come out the same.
    if not kernels.native_available():
        pytest.skip("native kernels not built")
    with kernels.use_backend("native"):
        x = torch.randn(8, 4, 3, 3)
        ref = bnlab.BatchNorm2d(4)
        ref(x)
        bn = bnlab.BatchNorm2d(4)
        if running == "strided":
            bn.running_mean = torch.zeros(4, 2)[:, 0]
            bn(x)
            torch.testing.assert_close(bn.running_mean, ref.running_mean)
            torch.testing.assert_close(bn.running_var, ref.running_var)
        else:
            bn.running_var = torch.ones(1).expand(4)  # one value seen four times: not writable
            with pytest.raises(RuntimeError):
                bn(x)


@needs_buffers
def test_buffer_cache_hands_out_the_most_recently_freed_buffer_first():
    # The most recently freed buffer is the likeliest to still be in the CPU cache.
    x = torch.randn(8, 64, 32, 32)
    bnlab.kernels.empty_cache()
    a, b = _ops.empty_like(x), _ops.empty_like(x)
    pa, pb = a.data_ptr(), b.data_ptr()
    del a
    del b  # freed last
    c = _ops.empty_like(x)
    d = _ops.empty_like(x)
    assert (c.data_ptr(), d.data_ptr()) == (pb, pa)


@st.composite
def _kernel_cases(draw):
    """Shapes across the kernels' paths: (N, C) rows, short and longer NCHW planes, channels
    not a whole number of vectors, rows past a multiple of the vector width."""
    rank = draw(st.sampled_from([2, 3, 4]))
    n = draw(st.integers(1, 40))
    c = draw(st.integers(1, 40))
    rest = [draw(st.integers(1, 20)) for _ in range(rank - 2)]
    if n * max(1, torch.Size(rest).numel()) == 1:
        n = 2
    shape = (n, c, *rest)
    channels_last = rank == 4 and draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    act = draw(st.sampled_from(["identity", "relu", "leaky_relu"]))
    path = draw(st.sampled_from(PATHS))  # as the plane_path fixture
    return shape, channels_last, dtype, act, path, draw(st.integers(0, 2**16))


@settings(max_examples=120, deadline=None)
@given(case=_kernel_cases())
def test_native_kernels_match_reference_on_any_shape(case):
    shape, channels_last, dtype, act, path, seed = case
    x, w, b, dy = make(shape, dtype, channels_last, offset=3.0, seed=seed)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    with native_path(path), kernels.use_backend("native"):
        assert kernels.supports(x, w, b)
        y, mean, var = kernels.batch_norm_act_train(x, w, b, 1e-5, act)
        got = torch.autograd.grad(y, (x, w, b), dy)
        with torch.no_grad():
            ye = kernels.normalize_act(x, mean, var, w, b, 1e-5, act)
    yr, mr, vr = reference(x.detach(), w, b, 1e-5, act)
    want = reference_grads(x, w, b, dy, act)
    tol = 5e-5 if dtype == torch.float32 else 1e-9
    assert rel(y, yr) <= tol
    assert rel(var, vr) <= tol
    assert (mean.double() - mr).abs().max() <= tol * (mr.abs().max() + vr.sqrt().max())
    # dx nearly cancels with few values per channel (two values: its terms are ~1 and it is
    # ~1e-6), so its error is measured against the size of those terms
    shape_c = (1, -1, *([1] * (len(shape) - 2)))
    terms = (dy.abs().double() * (w.detach().double() / (vr + 1e-5).sqrt()).abs().reshape(shape_c))
    assert (got[0].double() - want[0]).abs().max() <= tol * max(want[0].abs().max(), terms.max())
    # dweight = sum(dy xhat) and dbias = sum(dy) can cancel too (a float32 sum of 40 values
    # came to 1e-3 of its terms): their error is measured against the sum of the terms' sizes
    dims = [0, *range(2, len(shape))]
    xhat = (x.detach().double() - mr.reshape(shape_c)) / (vr + 1e-5).sqrt().reshape(shape_c)
    sizes = ((dy.double() * xhat).abs().sum(dims), dy.double().abs().sum(dims))
    for g, r, size in zip(got[1:], want[1:], sizes, strict=True):
        assert (g.double() - r).abs().max() <= tol * max(r.abs().max(), size.max())
    # evaluation with the batch's own statistics gives the training output
    assert rel(ye, yr) <= tol

"""bnlab's bfloat16 operators (csrc/bn_bf16.h): bfloat16 activations beside float32
parameters and statistics, the autocast case. Each result is compared with a float64
reference computed from the same bfloat16 values; the outputs must be that reference rounded
to bfloat16 (within one unit in the last place, for the float arithmetic before the
rounding). Runs on every instruction set the kernels were built for (``BNLAB_SIMD=baseline``
in `make test` repeats this file on the baseline build)."""

from __future__ import annotations

import pytest
import torch

import bnlab
from bnlab import kernels

pytestmark = pytest.mark.skipif(not kernels.native_available(), reason="native kernels not built")
ops = torch.ops.bnlab

# (shape, channels-last): NCHW planes, rows of channels (channels-last, (N, C)), channel
# counts that leave vector tails (3, 37) and rows that leave row-block tails
SHAPES = [((16, 8, 5, 5), False), ((16, 8, 5, 5), True), ((64, 32), False), ((4, 3, 7), False),
          ((70, 37, 3, 3), True), ((9, 37, 11, 13), False), ((300, 64, 3, 3), True),
          ((5, 130, 2, 2), True)]


def _data(shape, cl, offset=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + offset).bfloat16()
    dy = torch.randn(shape, generator=g).bfloat16()
    if cl:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    c = shape[1]
    w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
    return x, dy, w, b


def _dims(x):
    return [0, *range(2, x.dim())]


def _sh(t, x):
    return t.double().view(1, -1, *([1] * (x.dim() - 2)))


def _assert_rounded(y, ref):
    """y is ref rounded to bfloat16, give or take one unit in the last place."""
    assert y.dtype == torch.bfloat16
    ulp = ref.abs().clamp_min(1e-30) * 2.0**-7
    assert ((y.double() - ref).abs() <= ulp + 1e-6).all(), (y.double() - ref).abs().max()


@pytest.mark.parametrize("shape,cl", SHAPES)
def test_training_forward_equals_the_float64_reference(shape, cl):
    x, _, w, b = _data(shape, cl)
    rm, rv = torch.randn(shape[1]), torch.rand(shape[1]) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y, mean, var, invstd, delta, thr, finite = ops.train_forward_update(
        x, w, b, rm, rv, 0.1, 1.5, 1e-5, 0, 0.0, None)
    xd = x.double()
    m, v = xd.mean(_dims(x)), xd.var(_dims(x), unbiased=False)
    ref = (xd - _sh(m, x)) / (_sh(v, x) + 1e-5).sqrt() * _sh(w, x) + _sh(b, x)
    _assert_rounded(y, ref)
    assert y.stride() == x.stride()
    assert mean.dtype == var.dtype == invstd.dtype == torch.float32
    torch.testing.assert_close(mean.double() + delta.double(), m, rtol=0, atol=1e-6)
    torch.testing.assert_close(var.double(), v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(invstd.double(), (v + 1e-5).rsqrt(), rtol=4e-6, atol=0)
    assert finite is True and thr.numel() == 0
    torch.testing.assert_close(rm.double(), rm0.double() + 0.1 * (m - rm0.double()), rtol=1e-6,
                               atol=1e-6)
    torch.testing.assert_close(rv.double(), rv0.double() + 0.1 * (v * 1.5 - rv0.double()),
                               rtol=1e-5, atol=1e-6)


def test_a_large_common_offset_keeps_the_variance():
    # sums are taken about a pivot: an offset of 1000 over a spread of 3 keeps the variance
    x, _, w, b = _data((64, 16, 6, 6), True, offset=1000.0)
    _, mean, var, *_ = ops.train_forward(x, w, b, 1e-5, 0, 0.0)
    xd = x.double()
    torch.testing.assert_close(var.double(), xd.var(_dims(x), unbiased=False), rtol=1e-4,
                               atol=0)


def test_a_nonfinite_batch_leaves_the_running_statistics():
    x, _, w, b = _data((8, 4, 3, 3), True)
    x[2, 1, 0, 0] = float("inf")
    rm, rv = torch.zeros(4), torch.ones(4)
    *_, finite = ops.train_forward_update(x, w, b, rm, rv, 0.1, 1.0, 1e-5, 0, 0.0, None)
    assert finite is False
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))


@pytest.mark.parametrize("shape,cl", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_training_backward_equals_autograd_in_float64(shape, cl, affine):
    x, dy, w, b = _data(shape, cl)
    w, b = (w, b) if affine else (None, None)
    y, mean, var, invstd, delta, _ = ops.train_forward(x, w, b, 1e-5, 0, 0.0)
    dx, dw, db = ops.backward(dy, x, mean, invstd, delta, None, w, b, None, None, 1e-5, 0, 0.0,
                              True, True)  # fmt: skip
    xr = x.double().requires_grad_()
    wr = None if w is None else w.double().requires_grad_()
    br = None if b is None else b.double().requires_grad_()
    torch.nn.functional.batch_norm(xr, None, None, wr, br, True, 0.0, 1e-5).backward(dy.double())
    assert dx.dtype == torch.bfloat16 and dx.stride() == x.stride()
    # dx is a difference of terms of its own size: one ulp of the largest term, rounded
    scale = xr.grad.abs().max()
    assert (dx.double() - xr.grad).abs().max() <= scale * 2.0**-7
    if affine:
        torch.testing.assert_close(dw.double(), wr.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(db.double(), br.grad, rtol=1e-5, atol=1e-4)
    # without dx: the parameter gradients only, the same numbers
    none, dw2, db2 = ops.backward(dy, x, mean, invstd, delta, None, w, b, None, None, 1e-5, 0,
                                  0.0, True, False)  # fmt: skip
    assert none.numel() == 0 and torch.equal(dw2, dw) and torch.equal(db2, db)


@pytest.mark.parametrize("shape,cl", SHAPES[:4])
@pytest.mark.parametrize("act,code", [("identity", 0), ("relu", 1), ("leaky_relu", 2)])
def test_evaluation_forward_and_its_backward(shape, cl, act, code):
    x, dy, w, b = _data(shape, cl)
    rm, rv = torch.randn(shape[1]), torch.rand(shape[1]) + 0.5
    y = ops.eval_forward(x, rm, rv, w, b, code, 0.1, 1e-5)
    ref = (x.double() - _sh(rm, x)) / (_sh(rv, x) + 1e-5).sqrt() * _sh(w, x) + _sh(b, x)
    ref = {"identity": ref, "relu": ref.relu(),
           "leaky_relu": torch.nn.functional.leaky_relu(ref, 0.1)}[act]
    _assert_rounded(y, ref)
    if act == "identity":
        invstd = (rv + 1e-5).rsqrt()
        dx, dw, db = ops.backward(dy, x, rm, invstd, None, None, w, b, None, None, 0.0, 0, 0.0,
                                  False, True)  # fmt: skip
        want = dy.double() * _sh(invstd * w, x)
        assert (dx.double() - want).abs().max() <= want.abs().max() * 2.0**-7
        xhat = (x.double() - _sh(rm, x)) * _sh(invstd, x)
        torch.testing.assert_close(dw.double(), (dy.double() * xhat).sum(_dims(x)), rtol=1e-4,
                                   atol=1e-4)


def test_the_store_rounds_to_nearest_even_and_keeps_nan_and_inf():
    # y = x + b exactly in float, then rounded: torch's float -> bfloat16 conversion is the
    # reference (round to nearest, ties to even); 2**-8 + 2**-16 style values sit at ties
    vals = [1.0, 1.00390625, 1.01171875, -3.5, 65504.0, 3.0e38, 1e-3, 0.0, -0.0]
    x = torch.tensor(vals * 2).bfloat16().reshape(2, 1, 9)
    for bias in (0.0, 2.0**-9, 3 * 2.0**-9, 2.0**-8 + 2.0**-16, -7.3e-3):
        b = torch.tensor([bias])
        y = ops.eval_forward(x, torch.zeros(1), torch.ones(1), None, b, 0, 0.0, -1.0)
        assert torch.equal(y, (x.float() + bias).bfloat16()), bias
    odd = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0]).bfloat16().reshape(1, 1, 4)
    y = ops.eval_forward(odd, torch.zeros(1), torch.ones(1), None, None, 0, 0.0, -1.0)
    assert y[0, 0, 0].isnan() and y[0, 0, 1] == float("inf") and y[0, 0, 2] == -float("inf")


def test_an_autocast_layer_takes_the_bf16_operators_and_matches_torch():
    # a float32 bnlab layer on bf16 channels-last activations large enough for the native
    # kernels: same numbers as torch's BatchNorm2d within bf16 rounding, float32 statistics
    torch.manual_seed(0)
    ours, ref = bnlab.BatchNorm2d(16), torch.nn.BatchNorm2d(16)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
    ref.load_state_dict(ours.state_dict())
    x = (torch.randn(64, 16, 12, 12) * 2 + 1).bfloat16().contiguous(
        memory_format=torch.channels_last)
    assert kernels.choose(x, (ours.weight, ours.bias, ours.running_mean, ours.running_var),
                          True, detached=True) == "native"
    for _ in range(3):
        xs, xr = x.detach().requires_grad_(), x.detach().requires_grad_()
        y, want = ours(xs), ref(xr)
        assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y.float(), want.float(), rtol=2**-7, atol=2**-7)
        g = torch.randn_like(y)
        y.backward(g)
        want.backward(g)
        torch.testing.assert_close(xs.grad.float(), xr.grad.float(), rtol=2**-6, atol=2**-7)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-3, atol=1e-3)
        ours.weight.grad = ours.bias.grad = ref.weight.grad = ref.bias.grad = None
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-5)
    assert int(ours.num_batches_tracked) == 3
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x).float(), ref(x).float(), rtol=2**-7, atol=2**-7)
    # the fused layer's activation is not in the bf16 operators: torch's kernels train it
    fused = bnlab.BatchNormAct2d(16, act="relu")
    yf = fused(x.detach().requires_grad_())
    assert yf.dtype == torch.bfloat16 and (yf >= 0).all()
    yf.float().sum().backward()

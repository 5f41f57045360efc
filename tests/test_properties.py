"""Property tests over shapes (hypothesis): bnlab agrees with torch wherever torch works."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnlab
from tests.reference import ref_bn, ref_bn_backward, ref_stats

LAYERS = {
    2: (bnlab.BatchNorm1d, torch.nn.BatchNorm1d),
    3: (bnlab.BatchNorm1d, torch.nn.BatchNorm1d),
    4: (bnlab.BatchNorm2d, torch.nn.BatchNorm2d),
    5: (bnlab.BatchNorm3d, torch.nn.BatchNorm3d),
}


@st.composite
def shapes(draw):
    rank = draw(st.sampled_from([2, 3, 4, 5]))
    n = draw(st.integers(1, 6))
    c = draw(st.integers(1, 5))
    rest = [draw(st.integers(1, 4)) for _ in range(rank - 2)]
    shape = (n, c, *rest)
    if n * max(1, torch.Size(rest).numel()) == 1:
        shape = (2, c, *rest)
    return shape


@settings(max_examples=60, deadline=None)
@given(shape=shapes(), seed=st.integers(0, 2**16), scale=st.floats(0.01, 100.0),
       offset=st.floats(-50, 50), momentum=st.sampled_from([0.1, None, 0.9]))
def test_agrees_with_torch_on_any_shape(shape, seed, scale, offset, momentum) -> None:
    g = torch.Generator().manual_seed(seed)
    ours_cls, torch_cls = LAYERS[len(shape)]
    ours, theirs = ours_cls(shape[1], momentum=momentum), torch_cls(shape[1], momentum=momentum)
    x = torch.randn(shape, generator=g) * scale + offset
    dy = torch.randn(shape, generator=g)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yt = ours(xo), theirs(xt)
    yo.backward(dy)
    yt.backward(dy)
    # Against a float64 reference, bnlab is at least as accurate as torch (with slack for
    # rounding): exact agreement between two float32 implementations is not a property.
    mean, var = ref_stats(x)
    y_ref = ref_bn(x, mean, var)
    dx_ref, _, _ = ref_bn_backward(x, dy, None)
    # Floor: float32 rounding of inputs of magnitude max|x| against a spread sigma makes any
    # float32 BN's output uncertain by a few eps * max|x| / sigma (the conditioning).
    cond = x.abs().max().item() / max(var.sqrt().min().item(), 1e-12)
    for got, want, ref in ((yo, yt, y_ref), (xo.grad, xt.grad, dx_ref)):
        err_ours = (got.double() - ref).abs().max().item()
        err_torch = (want.double() - ref).abs().max().item()
        floor = 8 * torch.finfo(torch.float32).eps * (cond + 1) * (ref.abs().max().item() + 1)
        assert err_ours <= max(2 * err_torch, floor), (err_ours, err_torch, floor)
    count = x.numel() // x.shape[1]
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-5)
    factor = 1.0 if momentum is None else momentum  # None: cumulative, first batch weighs 1
    want_var = (1 - factor) + factor * var * count / (count - 1)
    torch.testing.assert_close(ours.running_var.double(), want_var, rtol=1e-4, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(shape=shapes(), k=st.integers(1, 4), steps=st.integers(1, 6))
def test_window_statistics_are_finite_and_bounded(shape, k, steps) -> None:
    cls, _ = LAYERS[len(shape)]
    bn = cls(shape[1], running="window", window_size=k)
    means = []
    for _ in range(steps):
        x = torch.randn(shape)
        bn(x)
        means.append(x.transpose(0, 1).reshape(shape[1], -1).mean(1))
    assert torch.isfinite(bn.running_mean).all() and (bn.running_var >= 0).all()
    want = torch.stack(means[-k:]).mean(0)
    torch.testing.assert_close(bn.running_mean, want, rtol=1e-5, atol=1e-5)

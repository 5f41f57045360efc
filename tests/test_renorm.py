"""Batch Renorm against a float64 reference of Ioffe (2017)'s formulas."""

from __future__ import annotations

import pytest
import torch

import bnlab
from bnlab import functional_variants as FV


def paper_reference(x, mu, sigma2, w, b, eps, r_max, d_max):
    """Algorithm 1 of the paper, written out naively in float64 (sigma includes eps)."""
    x = x.double()
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mu_b = x.mean(dims)
    sigma_b = torch.sqrt(((x - mu_b.reshape(shape)) ** 2).mean(dims) + eps)
    sigma = torch.sqrt(sigma2.double() + eps)
    r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max).detach()
    d = torch.clamp((mu_b - mu.double()) / sigma, -d_max, d_max).detach()
    xhat = (x - mu_b.reshape(shape)) / sigma_b.reshape(shape) * r.reshape(shape) + d.reshape(shape)
    return w.double().reshape(shape) * xhat + b.double().reshape(shape)


def test_limits_schedule_is_linear_after_warmup():
    lim = lambda t: FV.renorm_limits(t, 3.0, 5.0, 100, (200, 50))  # noqa: E731
    assert lim(0) == (1.0, 0.0) and lim(100) == (1.0, 0.0)
    assert lim(125) == pytest.approx((1.25, 2.5))
    assert lim(150) == pytest.approx((1.5, 5.0))
    assert lim(300) == lim(10_000) == (3.0, 5.0)
    assert FV.renorm_limits(1, 3.0, 5.0, 0, 0) == (3.0, 5.0)


@pytest.mark.parametrize("shape", [(16, 4), (8, 4, 5), (6, 4, 3, 3)])
def test_matches_paper_reference_outputs_and_gradients(shape):
    torch.manual_seed(0)
    cls = {2: bnlab.BatchRenorm1d, 3: bnlab.BatchRenorm1d, 4: bnlab.BatchRenorm2d}[len(shape)]
    bn = cls(4, warmup_steps=0, relax_steps=0, r_max=1.5, d_max=0.5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.copy_(torch.tensor([0.0, 2.0, -1.0, 0.3]))
        bn.running_var.copy_(torch.tensor([1.0, 0.1, 9.0, 1.2]))
        bn.num_batches_tracked.fill_(10)
    mu, s2 = bn.running_mean.clone(), bn.running_var.clone()
    x = (torch.randn(shape) * 1.3 + 0.4).requires_grad_(True)
    gy = torch.randn(shape)
    y = bn(x)
    (y * gy).sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    w64 = bn.weight.detach().double().requires_grad_(True)
    b64 = bn.bias.detach().double().requires_grad_(True)
    ref = paper_reference(x64, mu, s2, w64, b64, bn.eps, 1.5, 0.5)
    (ref * gy.double()).sum().backward()
    torch.testing.assert_close(y.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bn.weight.grad.double(), w64.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(bn.bias.grad.double(), b64.grad, atol=1e-4, rtol=1e-5)
    # The limits bit: channel 1 and 2 are clipped, so this is not plain BN.
    _, _, _, r, d = FV.batch_renorm_train(x.detach(), mu, s2, None, None, bn.eps, 1.5, 0.5)
    assert (r == 1.5).any() or (r == 1 / 1.5).any()
    assert (d.abs() == 0.5).any()


def test_gradcheck_double():
    # r and d carry no gradient by design; finite differences see them change unless both are
    # clipped, so pick running statistics that saturate the clips (r = r_max, d = -d_max).
    torch.manual_seed(1)
    x = torch.randn(6, 3, 2, dtype=torch.double, requires_grad=True)
    w = torch.rand(3, dtype=torch.double, requires_grad=True)
    b = torch.randn(3, dtype=torch.double, requires_grad=True)
    rm, rv = torch.full((3,), 10.0, dtype=torch.double), torch.full((3,), 0.01, dtype=torch.double)

    def f(x, w, b):
        return FV.batch_renorm_train(x, rm, rv, w, b, 1e-5, 2.0, 1.0)[0]

    r, d = FV.batch_renorm_train(x.detach(), rm, rv, None, None, 1e-5, 2.0, 1.0)[3:]
    assert (r == 2.0).all() and (d == -1.0).all()
    assert torch.autograd.gradcheck(f, (x, w, b))


def test_equals_batchnorm_during_warmup():
    torch.manual_seed(2)
    rn = bnlab.BatchRenorm2d(3, warmup_steps=4)
    bn = bnlab.BatchNorm2d(3)
    for _ in range(5):  # batches 0..4 are warm-up (t <= warmup_steps)
        assert rn.current_limits() == (1.0, 0.0)
        x = torch.randn(4, 3, 2, 2) * 2 + 1
        gy = torch.randn_like(x)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = rn(xa), bn(xb)
        (ya * gy).sum().backward()
        (yb * gy).sum().backward()
        torch.testing.assert_close(ya, yb)
        torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(rn.running_var, bn.running_var)
    torch.testing.assert_close(rn.weight.grad, bn.weight.grad)
    assert rn.current_limits() == (1.0 + 2.0 / 35_000, 5.0 / 20_000)
    x = torch.randn(4, 3, 2, 2) + 5  # far from the running mean: d clips at its small limit
    assert not torch.allclose(rn(x), bn(x))


def test_eval_uses_running_statistics():
    rn = bnlab.BatchRenorm1d(2).eval()
    with torch.no_grad():
        rn.running_mean.fill_(1.0)
        rn.running_var.fill_(4.0)
    x = torch.randn(5, 2)
    torch.testing.assert_close(rn(x), (x - 1) / torch.sqrt(torch.tensor(4.0 + 1e-5)))
    assert int(rn.num_batches_tracked) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"track_running_stats": False}, "needs track_running_stats=True"),
        ({"r_max": 0.5}, "r_max must be a finite float >= 1, got 0.5"),
        ({"d_max": -1.0}, "d_max must be a finite float >= 0"),
        ({"warmup_steps": -1}, "warmup_steps must be an int >= 0"),
        ({"relax_steps": (1, 2, 3)}, "relax_steps must be an int >= 0 or a pair"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bnlab.BatchRenorm2d(3, **kwargs)


def test_registered_and_state_dict_compatible_with_torch():
    m = bnlab.make_norm("renorm", 4, 2, warmup_steps=0)
    assert isinstance(m, bnlab.BatchRenorm2d) and m.warmup_steps == 0
    t = torch.nn.BatchNorm2d(4)
    m.load_state_dict(t.state_dict())
    assert set(m.state_dict()) == set(t.state_dict())

"""The one choice of backend (``bnlab.kernels.choose``) and what a registered backend gets."""

from __future__ import annotations

import types

import pytest
import torch

import bnlab
from bnlab.kernels import _dispatch, backends
from bnlab.kernels.backends import composite


@pytest.fixture
def probe():
    """A registered backend that takes float64 inputs and counts its calls (the arithmetic is
    the composite backend's)."""
    calls = {"train": 0, "evaluate": 0}

    def train(*args):
        calls["train"] += 1
        return composite.train(*args)

    def evaluate(*args):
        calls["evaluate"] += 1
        return composite.evaluate(*args)

    mod = types.ModuleType("probe_backend")
    mod.NAME = "probe"
    mod.supports = lambda x, per_channel, train: x.dtype == torch.float64
    mod.train, mod.evaluate, mod.calls = train, evaluate, calls
    backends.register(mod)
    try:
        yield mod
    finally:
        _dispatch.registered.remove(mod)


def test_a_registered_backend_is_chosen_first_and_gets_every_path(probe):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    assert bnlab.kernels.choose(x) == "probe"
    assert bnlab.kernels.choose(x.float()) != "probe"
    assert backends.backends()[0] == "probe"
    ours = bnlab.BatchNorm2d(3, dtype=torch.float64)
    ref = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    ours(xr).sum().backward()
    assert probe.calls["train"] == 1  # training (no step of its own: train + running update)
    ref(x)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x), ref(x))
    assert probe.calls["evaluate"] == 1
    # in-place activated BN runs on the generic Function over tensor ops
    inplace = bnlab.BatchNormAct2d(3, act="leaky_relu", inplace=True, dtype=torch.float64)
    fused = bnlab.BatchNormAct2d(3, act="leaky_relu", dtype=torch.float64)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = inplace(a * 1.0), fused(b * 1.0)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(a.grad, b.grad)
    with bnlab.kernels.use_backend("probe"):  # its name works wherever a backend is named
        assert bnlab.kernels.backend() == "probe"


def test_register_refuses_incomplete_or_duplicate_backends(probe):
    with pytest.raises(TypeError, match="lacks 'evaluate'"):
        backends.register(types.SimpleNamespace(NAME="x", supports=None, train=None,
                                                __name__="x"))  # fmt: skip
    with pytest.raises(ValueError, match="a backend named 'probe' exists already"):
        backends.register(probe)
    with pytest.raises(ValueError, match="backend must be one of"):
        bnlab.kernels.set_backend("cuda")


def test_auto_sends_small_layer_steps_to_torch_and_large_ones_to_the_operators():
    if not bnlab.kernels.native_available():
        pytest.skip("native kernels not built")
    small, conv, rows = torch.randn(2, 4, 2, 2), torch.randn(8, 64, 8, 8), torch.randn(60, 100)
    assert bnlab.kernels.choose(small, detached=True) == "torch"
    assert bnlab.kernels.choose(small) == "native"  # statistics with a gradient: the operators
    assert bnlab.kernels.choose(conv, detached=True) == "native"
    assert bnlab.kernels.choose(rows, detached=True) == "torch"
    with bnlab.kernels.use_backend("native"):
        assert bnlab.kernels.choose(small, detached=True) == "native"
    with bnlab.kernels.use_backend("torch"):
        assert bnlab.kernels.choose(conv) == "torch"
    with torch.autograd.forward_ad.dual_level():
        assert bnlab.kernels.choose(conv) == "composite"


def test_a_layer_s_native_step_calls_only_its_operators_and_the_count():
    """The eager step on the operators: the fused forward, the backward and the count's
    increment, with no copy of the statistics (its caller drops them unread)."""
    if not bnlab.kernels.native_available():
        pytest.skip("native kernels not built")
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    layer = bnlab.BatchNorm1d(32)
    x = torch.randn(128, 32, 40, requires_grad=True)
    assert bnlab.kernels.choose(x, detached=True) == "native"
    layer(x).backward(torch.ones_like(x))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x.grad = None
    layer.zero_grad(set_to_none=True)
    with Record():
        y = layer(x)
    gy = torch.randn_like(y)
    with Record():
        y.backward(gy)
    heavy = [f for f in seen if f not in ("aten.detach.default",)]
    assert heavy == ["bnlab.train_forward_update.default", "aten.add_.Tensor",
                     "bnlab.backward.default"], seen
    # the saved statistics are still right: the gradient equals torch's
    ref = torch.nn.BatchNorm1d(32)
    ref.load_state_dict(before)
    xr = x.detach().clone().requires_grad_()
    ref(xr).backward(gy)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)

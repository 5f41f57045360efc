"""BatchNormAct2d: same numbers as BN followed by the activation, half the saved memory."""

from __future__ import annotations

import pytest
import torch

import bnlab
from bnlab import kernels

ACTS = {
    "relu": torch.relu,
    "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, 0.2),
    "identity": lambda t: t,
}


@pytest.fixture(params=["native", "torch"])
def backend(request):
    with kernels.use_backend(request.param):
        yield request.param


def saved_bytes(fn, module=None):
    """Bytes of the distinct storages saved for backward while running ``fn``.

    Returns ``(all, activations)``: ``activations`` leaves out the module's own parameters
    and buffers, which exist whether or not anything is saved.
    """
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    own = set()
    if module is not None:
        own = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    return sum(seen.values()), sum(v for k, v in seen.items() if k not in own)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_equals_unfused_composition(backend, act, channels_last):
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    fused = bnlab.BatchNormAct2d(4, act=act, negative_slope=0.2)
    plain = bnlab.BatchNorm2d(4)
    with torch.no_grad():
        for m in (fused, plain):
            m.weight.copy_(torch.tensor([1.5, -0.7, 0.3, 1.0]))
            m.bias.copy_(torch.tensor([0.1, 0.2, -0.3, 0.0]))
    grads = []
    outs = []
    for m, f in ((fused, lambda t: t), (plain, ACTS[act])):
        xx = x.clone().requires_grad_()
        y = f(m(xx))
        y.backward(dy)
        outs.append(y)
        grads.append((xx.grad, m.weight.grad, m.bias.grad))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.running_mean, plain.running_mean)
    torch.testing.assert_close(fused.running_var, plain.running_var)
    fused.eval()
    plain.eval()
    torch.testing.assert_close(fused(x), ACTS[act](plain(x)), rtol=1e-5, atol=1e-6)


def test_gradients_equal_torch_batchnorm_then_relu(backend):
    torch.manual_seed(1)
    x = torch.randn(8, 3, 7, 7)
    dy = torch.randn_like(x)
    fused, ref = bnlab.BatchNormAct2d(3), torch.nn.BatchNorm2d(3)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused(x1).backward(dy)
    torch.relu(ref(x2)).backward(dy)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_saved_bytes_at_most_half_of_eager(backend, channels_last):
    x = torch.randn(16, 32, 20, 20)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    eager_bn, fused = torch.nn.BatchNorm2d(32), bnlab.BatchNormAct2d(32)
    eager_all, eager_act = saved_bytes(lambda: torch.relu(eager_bn(x)), eager_bn)
    fused_all, fused_act = saved_bytes(lambda: fused(x), fused)
    assert eager_act >= 2 * x.numel() * 4  # eager keeps the input and the ReLU output
    assert fused_all <= eager_all / 2
    assert fused_act <= eager_act / 2


def test_gradcheck_module_without_statistics(backend):
    m = bnlab.BatchNormAct2d(2, act="leaky_relu", negative_slope=0.1,
                             track_running_stats=False, dtype=torch.float64)  # fmt: skip
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-5)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="act must be one of"):
        bnlab.BatchNormAct2d(4, act="gelu")
    with pytest.raises(TypeError, match="negative_slope must be a float"):
        bnlab.BatchNormAct2d(4, negative_slope="0.1")
    with pytest.raises(ValueError, match="expected 4D input"):
        bnlab.BatchNormAct2d(4)(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bnlab.BatchNormAct2d(4)(torch.randn(1, 4, 1, 1))
    m = bnlab.BatchNormAct2d(4, act="leaky_relu", negative_slope=0.2)
    assert "act='leaky_relu'" in repr(m) and "negative_slope=0.2" in repr(m)


def test_state_dict_matches_batchnorm2d():
    fused, plain = bnlab.BatchNormAct2d(5), torch.nn.BatchNorm2d(5)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    fused.load_state_dict(plain.state_dict())

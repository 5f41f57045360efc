"""bnlab.tools.adapt: AdaBN statistics and TENT's entropy minimisation on BN affine only."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnlab
from bnlab.tools import Tent, adapt
from bnlab.tools.adapt import entropy


def _source(bn_cls=nn.BatchNorm2d):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), bn_cls(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)
    )
    for _ in range(5):  # source statistics: standard normal inputs
        net(torch.randn(16, 1, 8, 8))
    return net.eval()


def _target(n_batches=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 1, 8, 8, generator=g) * 3 + 2 for _ in range(n_batches)]


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm2d, bnlab.BatchNorm2d])
def test_adabn_uses_target_statistics_and_keeps_source(bn_cls):
    src = _source(bn_cls)
    before = copy.deepcopy(src.state_dict())
    batches = _target()
    out = adapt(src, batches, "adabn")
    feats = torch.cat([src[0](x) for x in batches]).detach()
    torch.testing.assert_close(out[1].running_mean, feats.mean(dim=(0, 2, 3)))
    assert not torch.allclose(src[1].running_mean, out[1].running_mean, atol=0.1)
    for k, v in src.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not out.training


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm2d, bnlab.BatchNorm2d])
def test_tent_changes_only_bn_affine_and_lowers_entropy(bn_cls):
    src = _source(bn_cls)
    x = _target(1)[0]
    tent = Tent(copy.deepcopy(src), lambda p: torch.optim.SGD(p, lr=0.5))
    h = [float(entropy(tent(x)).mean()) for _ in range(15)]
    assert h[-1] < h[0] - 1e-3
    adapted = dict(tent.model.named_parameters())
    for name, p in src.named_parameters():
        changed = not torch.equal(p, adapted[name])
        assert changed == name.startswith("1."), name
        assert p.requires_grad  # the source is untouched
    # normalisation uses test-batch statistics: the mean of each channel after BN is beta
    with torch.no_grad():
        y = tent.model[1](tent.model[0](x))
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), tent.model[1].bias, atol=1e-5, rtol=0)


def test_tent_episodic_resets_before_every_batch():
    src, x = _source(), _target(1)[0]
    episodic = Tent(copy.deepcopy(src), episodic=True)
    torch.testing.assert_close(episodic(x), episodic(x))
    online = Tent(copy.deepcopy(src), lambda p: torch.optim.SGD(p, lr=1.0))
    assert not torch.allclose(online(x), online(x))


def test_adapt_tent_returns_wrapper_and_validates():
    src = _source()
    tent = adapt(src, [(x, None) for x in _target(3)], "tent", lr=1e-2)
    assert isinstance(tent, Tent) and tent(_target(1)[0]).shape == (16, 3)
    with pytest.raises(ValueError, match=r"method must be one of \['adabn', 'tent'\]"):
        adapt(src, _target(), "bn")
    with pytest.raises(ValueError, match="no BN layer with affine"):
        Tent(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="steps must be a positive int"):
        Tent(copy.deepcopy(src), steps=0)

"""bnlab.tools.recalibrate: exact population statistics (Precise BN), in place."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnlab
from bnlab.tools import recalibrate
from bnlab.tools.recalibrate import batch_moments, combine_moments


def _batches(sizes, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64) * 2 + shift for n in sizes]


def _net(bn_cls, **kw):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), bn_cls(4, **kw), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 5, 1),
        bn_cls(5, **kw),
    ).double()


def test_combine_moments_is_exact():
    x = torch.randn(37, 4, 3, dtype=torch.float64)
    acc = None
    for part in x.split([5, 20, 12]):
        acc = combine_moments(acc, batch_moments(part))
    n, mean, m2 = acc
    assert n == 37 * 3
    torch.testing.assert_close(mean, x.mean(dim=(0, 2)))
    torch.testing.assert_close(m2 / (n - 1), x.transpose(0, 1).reshape(4, -1).var(dim=1))


@pytest.mark.parametrize(
    "bn_cls,kw",
    [(nn.BatchNorm2d, {}), (bnlab.BatchNorm2d, {}),
     (bnlab.BatchNorm2d, {"running": "window", "window_size": 3})],
    ids=["torch", "bnlab", "bnlab-window"],
)
def test_exact_statistics_weighted_by_count(bn_cls, kw):
    net = _net(bn_cls, **kw).eval()
    batches = _batches([5, 17, 3])
    # reference: BN inputs of every batch, collected naively in train mode on a copy
    ref = _net(bn_cls, **kw)
    ref.load_state_dict(net.state_dict())
    ref[3].eval()  # Dropout stays off, as in the evaluation-mode model
    seen = {1: [], 5: []}
    for i in seen:
        ref[i].register_forward_pre_hook(lambda m, a, _i=i: seen[_i].append(a[0]))
    for x in batches:
        ref(x)
    recalibrate(net, batches)
    for i, xs in seen.items():
        flat = torch.cat(xs).transpose(0, 1).reshape(xs[0].shape[1], -1)
        torch.testing.assert_close(net[i].running_mean, flat.mean(dim=1))
        torch.testing.assert_close(net[i].running_var, flat.var(dim=1))  # unbiased
        assert int(net[i].num_batches_tracked) == 3
    assert not any(m.training for m in net.modules())  # modes restored
    assert all(not m._forward_pre_hooks for m in net.modules())  # hooks removed
    if kw:
        torch.testing.assert_close(net[1].window_mean[2], net[1].running_mean)


def test_num_batches_limits_and_too_few_batches_raise_without_change():
    net = _net(nn.BatchNorm2d).eval()
    recalibrate(net, _batches([4, 4, 4]), num_batches=2)
    assert int(net[1].num_batches_tracked) == 2
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="num_batches=5 but batches yielded only 3"):
        recalibrate(net, _batches([4, 4, 4], shift=3.0), num_batches=5)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="num_batches must be a positive int"):
        recalibrate(net, _batches([4]), num_batches=0)


def test_reused_layer_raises_and_restores():
    bn = nn.BatchNorm2d(3)
    net = nn.Sequential(bn, nn.Conv2d(3, 3, 1), bn).double().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="'0' was called 2 times in one forward"):
        recalibrate(net, _batches([4, 4]))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert net.training and bn.training and not bn._forward_pre_hooks


def test_tuple_batches_and_no_bn():
    net = _net(bnlab.BatchNorm2d).eval()
    recalibrate(net, [(x, torch.zeros(len(x))) for x in _batches([6, 6])])
    assert int(net[5].num_batches_tracked) == 2
    with pytest.raises(ValueError, match="no BN layer"):
        recalibrate(nn.Linear(2, 2), [torch.randn(2, 2)])
    with pytest.raises(TypeError, match="got str"):
        recalibrate(net, ["not a tensor"])


def test_nonfinite_batches_are_skipped_and_never_stored():
    import warnings as _w

    torch.manual_seed(3)
    good = [torch.randn(16, 3, 6, 6) for _ in range(4)]
    bad = good[1].clone()
    bad[0, 0, 0, 0] = float("nan")
    net = nn.Sequential(nn.Conv2d(3, 4, 3), bnlab.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))  # fmt: skip
    clean = bnlab.tools.recalibrate(copy.deepcopy(net), good)
    with pytest.warns(RuntimeWarning, match=r"skipped 1 of 5 batches with NaN/Inf"):
        dirty = bnlab.tools.recalibrate(copy.deepcopy(net), [*good[:2], bad, *good[2:]])
    for a, b in ((clean[1], dirty[1]), (clean[4], dirty[4])):
        assert torch.isfinite(b.running_mean).all() and torch.isfinite(b.running_var).all()
        torch.testing.assert_close(b.running_mean, a.running_mean)
        torch.testing.assert_close(b.running_var, a.running_var)
        assert int(b.num_batches_tracked) == 4
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="every batch that reached BN layer '1'"):
        bnlab.tools.recalibrate(net, [bad, bad])
    for k, v in net.state_dict().items():  # nothing changed
        torch.testing.assert_close(v, before[k], equal_nan=False)
    with _w.catch_warnings():
        _w.simplefilter("error", RuntimeWarning)
        bnlab.tools.recalibrate(copy.deepcopy(net), good)  # no warning without NaN


def test_adapt_skips_nonfinite_batches():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), bnlab.BatchNorm2d(4), nn.Flatten(),
                        nn.LazyLinear(5))  # fmt: skip
    net(torch.randn(8, 3, 6, 6))
    net.eval()
    batches = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    bad = batches[0].clone()
    bad[1, 2, 3, 3] = float("inf")
    with pytest.warns(RuntimeWarning, match="skipped 1 of 4"):
        adabn = bnlab.tools.adapt(net, [bad, *batches], "adabn")
    assert torch.isfinite(adabn[1].running_var).all()
    with pytest.warns(RuntimeWarning, match="Tent: skipped the update"):
        tent = bnlab.tools.adapt(net, [batches[0], bad, batches[1]], "tent")
    assert tent.skipped == 1
    assert all(torch.isfinite(p).all() for p in tent.model.parameters())

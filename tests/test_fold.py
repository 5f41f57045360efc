"""bnlab.tools.fold: every pattern against the unfolded model, in float64."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlab
from bnlab.tools import fold, fold_conv_bn, fold_conv_bn_weights


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, bnlab._base._NormBase)):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) + 0.3)
                if m.affine:
                    m.weight.copy_(torch.randn(c, generator=g))
                    m.bias.copy_(torch.randn(c, generator=g))
    return model.double().eval()


def _check(model, x, n_folded, atol=1e-10):
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fold(model, x)
    rep = out.fold_report
    assert len(rep.folded) == n_folded, rep.summary()
    assert rep.max_abs_error is not None and rep.max_abs_error < atol, rep.summary()
    torch.testing.assert_close(out(x), model(x), atol=atol, rtol=0)
    # the input model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(m.training for m in out.modules())
    return out


BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
BNLAB = {1: bnlab.BatchNorm1d, 2: bnlab.BatchNorm2d, 3: bnlab.BatchNorm3d}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
SPATIAL = {1: (11,), 2: (9, 10), 3: (5, 6, 7)}


@pytest.mark.parametrize("lib", [BN, BNLAB], ids=["torch", "bnlab"])
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize(
    "kw",
    [
        dict(in_channels=4, out_channels=6, kernel_size=3),
        dict(in_channels=4, out_channels=6, kernel_size=3, bias=False, stride=2),
        dict(in_channels=4, out_channels=8, kernel_size=3, groups=2, dilation=2, padding=2),
        dict(in_channels=4, out_channels=4, kernel_size=3, groups=4, padding=1),  # depthwise
    ],
    ids=["plain", "nobias-stride", "groups-dilation", "depthwise"],
)
def test_conv_then_bn(lib, dim, kw):
    model = _randomise(nn.Sequential(CONV[dim](**kw), lib[dim](kw["out_channels"]), nn.ReLU()))
    out = _check(model, torch.randn(3, 4, *SPATIAL[dim], dtype=torch.float64), 1)
    assert isinstance(out[1], nn.Identity)
    assert out[0].bias is not None


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("groups,bias", [(1, True), (2, False)])
def test_conv_transpose_then_bn(dim, groups, bias):
    conv = CONVT[dim](4, 6, 3, stride=2, padding=1, output_padding=1, groups=groups, bias=bias)
    model = _randomise(nn.Sequential(conv, BN[dim](6)))
    _check(model, torch.randn(2, 4, *SPATIAL[dim], dtype=torch.float64), 1)


def test_linear_then_bn_needs_2d_evidence():
    model = _randomise(nn.Sequential(nn.Linear(5, 7), bnlab.BatchNorm1d(7), nn.Tanh()))
    _check(model, torch.randn(4, 5, dtype=torch.float64), 1)
    with pytest.warns(UserWarning, match="pass example_input"):
        out = fold(model)
    assert out.fold_report.folded == []


def test_linear_then_bn1d_on_3d_input_is_not_folded():
    # Linear acts on the last dim, BN1d on dim 1: folding would be wrong, so it must not happen.
    model = _randomise(nn.Sequential(nn.Linear(5, 7), BN[1](3)))
    _check(model, torch.randn(4, 3, 5, dtype=torch.float64), 0)


def test_bn_then_linear_and_1x1_conv():
    model = _randomise(nn.Sequential(nn.Flatten(), nn.BatchNorm1d(12), nn.Linear(12, 3)))
    out = _check(model, torch.randn(4, 3, 2, 2, dtype=torch.float64), 1)
    assert out.fold_report.folded == [("1", "2", "into next")]
    model = _randomise(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1)))
    _check(model, torch.randn(2, 4, 5, 5, dtype=torch.float64), 1)


def test_bn_then_grouped_unpadded_conv_folds_but_padded_does_not():
    model = _randomise(nn.Sequential(nn.ReLU(), BNLAB[2](4), nn.Conv2d(4, 6, 3, groups=2)))
    _check(model, torch.randn(2, 4, 6, 6, dtype=torch.float64), 1)
    padded = _randomise(nn.Sequential(nn.ReLU(), BN[2](4), nn.Conv2d(4, 6, 3, padding=1)))
    out = _check(padded, torch.randn(2, 4, 6, 6, dtype=torch.float64), 0)
    assert "padded convolution" in out.fold_report.not_folded[0][1]


class _Residual(nn.Module):
    """Branches and functional calls: only fx can see that bn2 follows conv2."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.bn2 = bnlab.BatchNorm2d(3)
        self.shared = nn.Conv2d(3, 3, 1)
        self.bn3 = nn.BatchNorm2d(3)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y)) + x
        z = self.shared(y)
        return self.bn3(z) + z  # z used elsewhere: bn3 cannot go into `shared`


def test_branches_and_functional_calls_via_fx():
    out = _check(_randomise(_Residual()), torch.randn(2, 3, 6, 6, dtype=torch.float64), 2)
    rep = out.fold_report
    assert rep.method == "fx"
    assert {r[0] for r in rep.folded} == {"bn1", "bn2"}
    assert rep.not_folded[0][0] == "bn3"


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.conv = nn.Conv2d(4, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.body(x)
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            y = y * 2
        return self.bn(self.conv(y))


def test_untraceable_falls_back_to_sequential_order_and_reports():
    with pytest.warns(UserWarning, match="bn: "):
        out = fold(_randomise(_Untraceable()), torch.randn(2, 2, 8, 8, dtype=torch.float64))
    rep = out.fold_report
    assert rep.method == "module-order" and "could not trace" in rep.reason
    assert rep.folded == [("body.1", "body.0", "into previous")]
    assert [n for n, _ in rep.not_folded] == ["bn"]
    assert rep.max_abs_error < 1e-10


def test_shared_bn_is_not_folded():
    bn = nn.BatchNorm2d(3)
    model = _randomise(nn.Sequential(nn.Conv2d(3, 3, 1), bn, nn.Conv2d(3, 3, 1), bn))
    out = _check(model, torch.randn(2, 3, 4, 4, dtype=torch.float64), 0)
    assert "called 2 times" in out.fold_report.not_folded[0][1]


def test_training_mode_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="evaluation mode.*model.eval"):
        fold(model)
    model.eval()
    model[1].train()
    with pytest.raises(ValueError, match="first: '1'"):
        fold(model)


def test_float32_tolerance_and_no_running_stats():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.BatchNorm2d(8, affine=False,
                          track_running_stats=False))
    model = _randomise(model[:2]).float()
    x = torch.randn(4, 3, 16, 16)
    out = fold(model, x)
    assert out.fold_report.max_abs_error < 1e-4
    nostats = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False))
    with pytest.warns(UserWarning, match="no running statistics"):
        fold(nostats.eval(), x)


def test_module_and_tensor_level_functions():
    conv, bn = nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)
    _randomise(nn.Sequential(conv, bn))
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(fold_conv_bn(conv, bn)(x), bn(conv(x)))
    w, b = fold_conv_bn_weights(conv.weight, None, bn.running_mean, bn.running_var, bn.eps,
                                None, None)
    ref = (F.conv2d(x, conv.weight) - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        bn.running_var.view(1, -1, 1, 1) + bn.eps)
    torch.testing.assert_close(F.conv2d(x, w, b), ref)
    with pytest.raises(ValueError, match="num_features=4"):
        fold_conv_bn(nn.Conv2d(2, 5, 1), bn)
    with pytest.raises(ValueError, match="training mode"):
        fold_conv_bn(conv, nn.BatchNorm2d(4))


def test_output_check_catches_a_wrong_fold(monkeypatch):
    import importlib

    fold_module = importlib.import_module("bnlab.tools.fold")  # the attribute is the function

    real = fold_module.fold_conv_bn_weights

    def wrong(*args, **kwargs):
        w, b = real(*args, **kwargs)
        return w, b + 0.01

    monkeypatch.setattr(fold_module, "fold_conv_bn_weights", wrong)
    model = _randomise(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)))
    with pytest.raises(RuntimeError, match="differ from the original's by 0.01"):
        fold(model, torch.randn(2, 2, 5, 5, dtype=torch.float64))
    assert fold(model).fold_report.max_abs_error is None  # no input, no check

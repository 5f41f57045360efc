"""bnlab.tools.lint: one model per mistake, each must be found; a clean model finds nothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import bnlab
from bnlab.tools import Finding, lint


def _codes(findings):
    return [(f.code, f.severity, f.module) for f in findings]


def _clean(bn=nn.BatchNorm2d):
    return nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), bn(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 36, 10))


def test_clean_model_has_no_findings():
    for bn in (nn.BatchNorm2d, bnlab.BatchNorm2d):
        model = _clean(bn)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        assert lint(model, torch.randn(16, 1, 8, 8), opt) == []


def _seed_bug():
    bn = nn.BatchNorm2d(32)  # the seed passes one layer after the 32- and the 64-channel conv
    return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), bn, nn.MaxPool2d(2),
                         nn.Conv2d(32, 32, 3), nn.ReLU(), bn, nn.MaxPool2d(2))


def test_bn001_shared_layer_found_by_hooks_and_by_fx():
    model = _seed_bug()
    hooks = lint(model, torch.randn(16, 1, 28, 28))
    assert ("BN001", "error", "2") in _codes(hooks)
    assert "called 2 times per forward (found with forward hooks)" in hooks[0].message
    static = lint(model)
    assert _codes(static) == [("BN001", "error", "2")]
    assert "fx" in static[0].message
    # the seed's real bug: channel counts differ, so the forward itself fails -> BN000
    bn = nn.BatchNorm2d(32)
    real = nn.Sequential(nn.Conv2d(1, 32, 3), bn, nn.Conv2d(32, 64, 3), bn)
    found = lint(real, torch.randn(4, 1, 12, 12))
    assert [f.code for f in found][:1] == ["BN001"]
    assert any(f.code == "BN000" and "RuntimeError" in f.message for f in found)


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = bnlab.BatchNorm1d(6)
        self.bn2 = nn.BatchNorm1d(6)

    def forward(self, x):
        y = self.bn(self.fc(x))
        return self.bn2(F.dropout(y, 0.5, self.training))


def test_bn002_bias_and_bn003_dropout_via_sequential_and_fx():
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.2), nn.BatchNorm2d(4))
    assert _codes(lint(seq)) == [("BN002", "warning", "1"), ("BN003", "warning", "3")]
    func = lint(_Functional())
    assert _codes(func) == [("BN002", "warning", "bn"), ("BN003", "warning", "bn2")]
    assert "function dropout" in func[1].message


def test_bn004_small_and_single_value_batches():
    small = lint(_clean(), torch.randn(2, 1, 8, 8))
    assert _codes(small) == [("BN004", "warning", "1")]
    one = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4))
    assert _codes(lint(one, torch.randn(1, 3))) == [("BN004", "error", "1")]
    assert lint(one.eval(), torch.randn(1, 3)) == []  # evaluation batches can be any size


def test_bn005_keras_momentum_and_bn009_half_eps():
    m = nn.Sequential(nn.BatchNorm1d(3, momentum=0.99), bnlab.BatchNorm1d(3, momentum=0.1))
    assert _codes(lint(m)) == [("BN005", "warning", "0")]
    cumulative = bnlab.BatchNorm1d(3, momentum=0.99, running="cumulative")
    assert lint(nn.Sequential(cumulative)) == []
    half = nn.Sequential(nn.BatchNorm1d(3, eps=1e-5).half(), nn.BatchNorm1d(3, eps=1e-3).half())
    assert _codes(lint(half)) == [("BN009", "warning", "0")]


def test_bn006_nonfinite_statistics():
    model = _clean(bnlab.BatchNorm2d)
    model[1].running_var[2] = float("nan")
    found = lint(model)
    assert _codes(found) == [("BN006", "error", "1")]
    assert found[0].why and found[0].fix and isinstance(found[0], Finding)


def test_bn007_weight_decay_on_bn_parameters():
    model = _clean()
    decay_all = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    assert _codes(lint(model, optimizer=decay_all)) == [("BN007", "warning", "1")]
    bn_params = list(model[1].parameters())
    others = [p for n, p in model.named_parameters() if not n.startswith("1.")]
    split = torch.optim.SGD([{"params": others, "weight_decay": 5e-4},
                             {"params": bn_params, "weight_decay": 0.0}], lr=0.1)
    assert lint(model, optimizer=split) == []


def test_bn008_mixed_modes_and_bn010_frozen_but_updating():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3), nn.BatchNorm1d(3))
    model[1].eval()
    assert _codes(lint(model)) == [("BN008", "warning", "1")]
    frozen = nn.Sequential(nn.BatchNorm1d(3))
    frozen.requires_grad_(False)
    assert _codes(lint(frozen)) == [("BN010", "warning", "0")]
    assert lint(frozen.eval()) == []


def test_lint_leaves_model_untouched():
    model = _clean()
    model[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lint(model, torch.randn(3, 1, 8, 8))
    assert model.training and not model[1].training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(not m._forward_pre_hooks for m in model.modules())

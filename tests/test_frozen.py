"""Frozen BN, freeze() and unfreeze()."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import bnlab


class BNReLU2d(bnlab.BatchNorm2d):
    def forward(self, x):
        return torch.relu(super().forward(x))


def trained(model: nn.Module, steps: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        model(torch.randn(8, 2, 5, 5) * 3 + 1)
    return model


def test_frozen_layer_ignores_train_mode_and_has_no_parameters():
    bn = bnlab.FrozenBatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -1.0, 0.0]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
        bn.weight.copy_(torch.tensor([2.0, 1.0, 1.0]))
    bn.train()
    bn.training = True
    assert bn.training is False
    x = torch.randn(4, 3, 2, 2)
    sd = {k: v.clone() for k, v in bn.state_dict().items()}
    y = bn(x)
    scale = torch.tensor([2.0, 1.0, 1.0]) / torch.sqrt(torch.tensor([4.0, 1.0, 0.25]) + 1e-5)
    ref = (x - torch.tensor([1.0, -1.0, 0.0])[:, None, None]) * scale[:, None, None]
    torch.testing.assert_close(y, ref)
    assert all(torch.equal(sd[k], v) for k, v in bn.state_dict().items())
    assert list(bn.parameters()) == []
    bn.requires_grad_(True)
    assert list(bn.parameters()) == []
    assert set(sd) == set(nn.BatchNorm2d(3).state_dict())


def test_freeze_torch_model_keeps_eval_outputs_and_input_untouched():
    model = trained(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    model.eval()
    x = torch.randn(3, 2, 5, 5)
    expected = model(x)
    frozen = bnlab.freeze(model)
    assert type(model[1]) is nn.BatchNorm2d  # input untouched
    assert type(frozen[1]) is bnlab.FrozenBatchNorm2d
    frozen.train()
    torch.testing.assert_close(frozen(x), expected)
    torch.testing.assert_close(frozen[1].running_mean, model[1].running_mean)
    names = [n for n, _ in frozen.named_parameters()]
    assert names == ["0.weight", "0.bias"]


def test_unfreeze_restores_trainable_layers_with_same_statistics():
    model = trained(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), bnlab.GhostBatchNorm2d(4)))
    frozen = bnlab.freeze(model).train()
    back = bnlab.unfreeze(frozen)
    assert type(back[1]) is nn.BatchNorm2d and type(back[2]) is bnlab.GhostBatchNorm2d
    assert back[1].training and back[2].training
    for a, b in zip(model.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert back[1].weight.requires_grad and back[2].bias.requires_grad
    before = back[1].running_mean.clone()
    back(torch.randn(4, 2, 5, 5))
    assert not torch.equal(before, back[1].running_mean)  # it trains again
    assert type(bnlab.unfreeze(bnlab.FrozenBatchNorm1d(3))) is bnlab.BatchNorm1d


class ReLUVariant(bnlab.BatchNorm2d):
    """A user's variant that declares its activation (the documented way)."""

    def _activation(self):
        return ("relu", 0.0)


@pytest.mark.parametrize("make", [lambda: ReLUVariant(2),
                                  lambda: bnlab.BatchNormAct2d(2, act="leaky_relu")])
def test_freeze_keeps_the_declared_activation_and_pickles(make):
    model = trained(nn.Sequential(nn.Conv2d(2, 2, 1), make()))
    frozen = bnlab.freeze(model).train()
    layer = frozen[1]
    assert type(layer) is bnlab.FrozenBatchNormAct2d and layer.training is False
    assert layer.act == model[1]._activation()[0]
    x = torch.randn(4, 2, 3, 3)
    torch.testing.assert_close(frozen(x), model.eval()(x))
    buf = io.BytesIO()
    torch.save(frozen, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded[1]) is type(layer) and loaded[1].training is False
    torch.testing.assert_close(loaded(x), frozen(x))
    assert type(bnlab.unfreeze(frozen)[1]) is type(model[1])
    assert type(bnlab.unfreeze(loaded)[1]) is type(model[1])


def test_freeze_refuses_a_subclass_that_overrides_forward():
    with pytest.raises(ValueError, match="BNReLU2d, which overrides forward"):
        bnlab.freeze(nn.Sequential(nn.Identity(), BNReLU2d(2)))


def test_unfreeze_returns_the_original_layer_and_sharing_survives():
    shared = bnlab.BatchNorm2d(2, running="window", window_size=3)
    model = trained(nn.Sequential(nn.Conv2d(2, 2, 1), shared, shared))
    frozen = bnlab.freeze(model)
    assert frozen[1] is frozen[2]  # one layer in two places stays one layer
    assert type(frozen[1]) is bnlab.FrozenBatchNorm2d
    back = bnlab.unfreeze(frozen)
    assert back[1] is back[2] and back[1].running == "window"
    assert torch.equal(back[1].window_mean, model[1].window_mean)
    converted = bnlab.convert(nn.Sequential(*(2 * [nn.BatchNorm2d(2)])))
    assert converted[0] is converted[1]
    synced = bnlab.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(*(2 * [nn.BatchNorm2d(2)])))
    assert synced[0] is synced[1]


def test_freeze_refuses_layers_without_statistics_and_unknown_torch_subclasses():
    with pytest.raises(ValueError, match=r"layer 1 \(BatchNorm2d\) has track_running_stats=False"):
        bnlab.freeze(nn.Sequential(nn.Identity(), nn.BatchNorm2d(3, track_running_stats=False)))

    class MyBN(nn.BatchNorm2d):
        pass

    with pytest.raises(ValueError, match="layer <root> is a MyBN, a torch BN subclass"):
        bnlab.freeze(MyBN(3))
    with pytest.raises(ValueError, match="needs track_running_stats=True"):
        bnlab.FrozenBatchNorm2d(3, track_running_stats=False)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got int"):
        bnlab.freeze(3)

"""SyncBatchNorm in one process (no process group) and its converter."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import bnlab


class BNReLU2d(bnlab.BatchNorm2d):
    """A locally defined fused BN + activation subclass of the base."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def test_without_process_group_it_is_plain_bn():
    torch.manual_seed(0)
    s, t = bnlab.SyncBatchNorm(3), nn.BatchNorm2d(3)
    for _ in range(2):
        x = torch.randn(6, 3, 4, 4)
        gy = torch.randn_like(x)
        xs, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        (s(xs) * gy).sum().backward()
        (t(xt) * gy).sum().backward()
        torch.testing.assert_close(xs.grad, xt.grad)
    torch.testing.assert_close(s.running_var, t.running_var)
    torch.testing.assert_close(s.weight.grad, t.weight.grad)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        s(torch.randn(1, 3))


def test_convert_torch_layers_keeps_state_and_flags():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.BatchNorm1d(2))
    model[1](torch.randn(4, 3, 2, 2))
    model[1].weight.requires_grad_(False)
    model.eval()
    out = bnlab.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(model[1]) is nn.BatchNorm2d  # input untouched
    assert type(out[1]) is bnlab.SyncBatchNorm and type(out[2]) is bnlab.SyncBatchNorm
    assert not out[1].training and not out[1].weight.requires_grad
    for k, v in model[1].state_dict().items():
        assert torch.equal(out[1].state_dict()[k], v)


def test_convert_keeps_subclass_behaviour():
    model = nn.Sequential(BNReLU2d(3), bnlab.BatchNorm1d(4))
    out = bnlab.SyncBatchNorm.convert_sync_batchnorm(model, process_group=None)
    layer = out[0]
    # composition, not new classes: the layer keeps its class and synchronises
    assert type(layer) is BNReLU2d and layer.sync and layer.process_group is None
    assert type(out[1]) is bnlab.BatchNorm1d and out[1].sync
    assert not model[0].sync  # the input model is untouched
    x = torch.randn(4, 3, 2, 2)
    assert (layer(x) >= 0).all() and (layer(x) == 0).any()
    torch.testing.assert_close(layer(x), model[0](x))
    with pytest.raises(ValueError, match="expected 4D input"):
        layer(torch.randn(4, 3))  # the subclass' rank check is kept too
    # torch's converter drops the activation: the reason bnlab has its own
    tm = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))
    assert type(tm[0]) is nn.SyncBatchNorm


def test_every_layer_takes_a_process_group_or_refuses_clearly():
    assert not bnlab.BatchNorm2d(3).sync  # None: local
    fused = bnlab.BatchNormAct2d(3, process_group=dist.ProcessGroup(0, 1))
    assert fused.sync
    with pytest.raises(ValueError, match="GhostBatchNorm2d: cannot synchronise its statistics"):
        bnlab.GhostBatchNorm2d(3, process_group=dist.ProcessGroup(0, 1))
    with pytest.raises(ValueError, match="BatchRenorm2d: cannot synchronise"):
        bnlab.BatchRenorm2d(3, process_group=dist.ProcessGroup(0, 1))
    with pytest.raises(ValueError, match="normalize_with='running' cannot be synchronised"):
        bnlab.BatchNorm2d(3, normalize_with="running", process_group=dist.ProcessGroup(0, 1))


def test_models_holding_a_process_group_can_be_copied_and_converted():
    pg = dist.ProcessGroup(0, 1)  # torch cannot deepcopy or pickle one
    model = nn.Sequential(nn.Conv2d(1, 3, 3), bnlab.BatchNormAct2d(3, process_group=pg))
    for out in (bnlab.convert(model), bnlab.freeze(model), bnlab.unfreeze(model),
                bnlab.SyncBatchNorm.convert_sync_batchnorm(model, pg),
                bnlab.tools.fold(model.eval(), warn=False)):
        assert out is not model
    assert bnlab.convert(model)[1].process_group is pg  # every copy syncs over the same ranks


def test_convert_policies():
    ghost = bnlab.GhostBatchNorm2d(3)
    assert bnlab.SyncBatchNorm.convert_sync_batchnorm(ghost).__class__ is bnlab.GhostBatchNorm2d
    frozen = bnlab.FrozenBatchNorm2d(3)
    assert type(bnlab.SyncBatchNorm.convert_sync_batchnorm(frozen)) is bnlab.FrozenBatchNorm2d
    with pytest.raises(ValueError, match=r"layer 0 \(BatchRenorm2d\) cannot be synchronised"):
        bnlab.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(bnlab.BatchRenorm2d(3)))

    class MyBN(nn.BatchNorm2d):
        pass

    with pytest.raises(ValueError, match="is a MyBN, a torch BN subclass"):
        bnlab.SyncBatchNorm.convert_sync_batchnorm(MyBN(3))

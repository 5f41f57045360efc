"""Third-party tools that find BN layers with isinstance see bnlab's layers (issue 13, part 1)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnlab

EVERY_LAYER = [
    bnlab.BatchNorm1d(4), bnlab.BatchNorm2d(4), bnlab.BatchNorm3d(4),
    bnlab.BatchNorm2d(4, running="window", window_size=3), bnlab.BatchNormAct2d(4),
    bnlab.BatchRenorm1d(4), bnlab.BatchRenorm2d(4), bnlab.BatchRenorm3d(4),
    bnlab.GhostBatchNorm1d(4), bnlab.GhostBatchNorm2d(4), bnlab.GhostBatchNorm3d(4),
    bnlab.FrozenBatchNorm1d(4), bnlab.FrozenBatchNorm2d(4), bnlab.FrozenBatchNorm3d(4),
    bnlab.SyncBatchNorm(4),
]  # fmt: skip


@pytest.mark.parametrize("layer", EVERY_LAYER, ids=lambda m: type(m).__name__)
def test_every_bnlab_layer_is_a_torch_batchnorm(layer):
    assert isinstance(layer, _BatchNorm)
    name = type(layer).__name__
    for rank in ("1d", "2d", "3d"):
        if name.endswith(rank):  # and the matching concrete torch class
            assert isinstance(layer, getattr(nn, f"BatchNorm{rank}"))
    assert set(layer.state_dict()) >= {"running_mean", "running_var", "num_batches_tracked"}


def _loader(n=6):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 8, 8, generator=g) * 2 + 1 for _ in range(n)]


def _net(norm):
    return nn.Sequential(nn.Conv2d(3, 6, 3), norm(6), nn.ReLU(), nn.Conv2d(6, 6, 3), norm(6))


def test_swa_update_bn_recomputes_bnlab_statistics_like_torchs():
    ours, theirs = _net(bnlab.BatchNorm2d), _net(nn.BatchNorm2d)
    theirs.load_state_dict(ours.state_dict())
    for m in (ours, theirs):
        torch.optim.swa_utils.update_bn(_loader(), m)
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(),
                              strict=True):  # fmt: skip
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5, msg=k)
    assert ours[1].momentum == 0.1  # update_bn restores the momentum it changed


def test_replace_all_batch_norm_modules_reaches_bnlab_layers():
    from torch.func import replace_all_batch_norm_modules_

    net = _net(bnlab.BatchNorm2d)
    replace_all_batch_norm_modules_(net)
    for bn in (net[1], net[4]):
        assert bn.running_mean is None and not bn.track_running_stats
    x = torch.randn(3, 4, 3, 8, 8)
    out = torch.vmap(net)(x)  # batch statistics per member, nothing to mutate
    torch.testing.assert_close(out[1], net(x[1]))


def test_tent_parameter_selection_finds_bnlab_affine_parameters():
    # TENT (Wang et al. 2021) adapts the affine parameters of the nn.BatchNorm2d layers
    net = _net(bnlab.BatchNorm2d)
    chosen = [p for m in net.modules() if isinstance(m, nn.BatchNorm2d)
              for p in (m.weight, m.bias)]  # fmt: skip
    assert len(chosen) == 4
    assert {id(p) for p in chosen} == {id(p) for m in (net[1], net[4]) for p in m.parameters()}


def test_fold_folds_an_eval_mode_sync_batchnorm():
    net = _net(bnlab.SyncBatchNorm)
    for x in _loader(3):
        net.train()(x)
    net.eval()
    folded = bnlab.tools.fold(net, warn=False)
    assert not any(isinstance(m, _BatchNorm) for m in folded.modules())
    x = _loader(1)[0]
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)


def test_torch_sync_converter_takes_bnlab_layers_and_keeps_their_state():
    # torch's converter sees a bnlab layer as a _BatchNorm: a plain torch SyncBatchNorm with
    # the same state comes back (bnlab-only behaviour such as the window is dropped: use
    # bnlab.SyncBatchNorm.convert_sync_batchnorm to keep it)
    net = _net(lambda c: bnlab.BatchNorm2d(c, running="window", window_size=2))
    net(_loader(1)[0])
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net))
    assert type(converted[1]) is nn.SyncBatchNorm
    torch.testing.assert_close(converted[1].running_var, net[1].running_var)
    kept = bnlab.SyncBatchNorm.convert_sync_batchnorm(net)
    assert kept[1].running == "window" and kept[1].sync  # bnlab's keeps it, and syncs


def test_fvcore_precise_bn_recomputes_bnlab_statistics_like_torchs():
    fvcore_bn = pytest.importorskip("fvcore.nn.precise_bn")
    ours, theirs = _net(bnlab.BatchNorm2d), _net(nn.BatchNorm2d)
    theirs.load_state_dict(ours.state_dict())
    assert len(fvcore_bn.get_bn_modules(ours)) == 2  # fvcore's BN_MODULE_TYPES finds them
    for m in (ours, theirs):
        fvcore_bn.update_bn_stats(m, _loader(), num_iters=6)
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(),
                              strict=True):  # fmt: skip
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5, msg=k)


def test_quantization_fuse_modules_fails_loudly_on_bnlab_layers():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), bnlab.BatchNorm2d(4), nn.ReLU()).eval()
    with pytest.raises(AssertionError, match="did not find fuser method"):
        torch.ao.quantization.fuse_modules(net, [["0", "1", "2"]])

"""Every layer shows the arguments it accepts and forwards the common ones to one base."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import bnlab

COMMON = ["num_features", "eps", "momentum", "affine", "track_running_stats"]
LAYERS = [
    (bnlab.BatchNorm2d, {}),
    (bnlab.BatchNormAct2d, {"act"}),
    (bnlab.SyncBatchNorm, set()),
    (bnlab.GhostBatchNorm2d, {"virtual_batch_size", "strict"}),
    (bnlab.BatchRenorm2d, {"r_max", "d_max", "warmup_steps", "relax_steps"}),
    (bnlab.FrozenBatchNorm2d, set()),
    (bnlab.FrozenBatchNormAct2d, {"act"}),
]


@pytest.mark.parametrize(("cls", "own"), LAYERS, ids=lambda v: getattr(v, "__name__", ""))
def test_signature_lists_common_and_own_arguments(cls, own):
    params = inspect.signature(cls).parameters
    assert list(params)[:5] == COMMON
    assert set(own) <= set(params)
    for name in ("bias", "running", "window_size", "nonfinite", "device", "dtype"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values())


@pytest.mark.parametrize(
    "cls", [bnlab.GhostBatchNorm2d, bnlab.BatchRenorm2d], ids=lambda c: c.__name__
)
def test_variant_with_own_training_batch_refuses_normalize_with_running(cls):
    with pytest.raises(ValueError, match="normalize_with='running' does not apply"):
        cls(3, normalize_with="running")


def test_sync_batchnorm_refuses_normalize_with_running():
    with pytest.raises(ValueError, match="normalize_with='running' cannot be synchronised"):
        bnlab.SyncBatchNorm(3, normalize_with="running")


def test_ghost_takes_the_common_keywords():
    bn = bnlab.GhostBatchNorm2d(3, 1e-3, 0.2, virtual_batch_size=4, bias=False,
                                running="window", window_size=2)  # fmt: skip
    assert bn.eps == 1e-3 and bn.momentum == 0.2 and bn.bias is None
    bn(torch.randn(8, 3, 2, 2))
    assert int(bn.num_batches_tracked) == 1 and bn.window_mean.shape == (2, 3)


def test_input_ranks_come_from_the_torch_class():
    assert bnlab.GhostBatchNorm1d._input_dims == (2, 3)
    assert bnlab.BatchRenorm3d._input_dims == (5,)
    assert bnlab.BatchNormAct2d._input_dims == (4,)
    assert bnlab.SyncBatchNorm._input_dims == (2, 3, 4, 5)


def test_a_users_variant_on_the_public_base_class():
    """bnlab.NormBase is the documented base: a user's variant overriding one hook trains,
    updates its running statistics, is a torch BN and freezes/folds like the others."""

    class ShiftedBN2d(bnlab.NormBase, nn.BatchNorm2d):
        _input_dims = (4,)
        _input_layout = "(N, C, H, W)"

        def _activation(self):
            return ("leaky_relu", 0.2)

    layer = ShiftedBN2d(3)
    x = torch.randn(4, 3, 5, 5)
    y = layer(x)
    ref = nn.functional.leaky_relu(nn.functional.batch_norm(x, None, None, training=True), 0.2)
    assert torch.allclose(y, ref, atol=1e-5)
    assert int(layer.num_batches_tracked) == 1
    assert isinstance(layer, nn.modules.batchnorm._BatchNorm)
    assert type(bnlab.freeze(nn.Sequential(layer))[0]).__name__ == "FrozenBatchNormAct2d"

"""bnlab.accumulation: k micro-batches, one running update equal to one step on their union."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnlab
from bnlab import accumulate

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _batch(dtype=torch.float32, n=64, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    # an offset and a scale per channel, so mean and variance both matter
    return (torch.randn(n, c, 5, 5, generator=g, dtype=dtype) * 2.5 + 3.0)


def _accumulate(model, x, k=4):
    with bnlab.accumulation(model):
        for xb in x.chunk(k):
            model(xb)


def _assert_stats(bn, ref, tol):
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=0, atol=tol)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=0, atol=tol)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layer", [nn.BatchNorm2d, bnlab.BatchNorm2d])
def test_four_micro_batches_equal_one_torch_step_on_the_batch_of_64(layer, dtype):
    x = _batch(dtype)
    ref = nn.BatchNorm2d(6, dtype=dtype)
    ref(x)
    bn = layer(6, dtype=dtype)
    _accumulate(bn, x)
    _assert_stats(bn, ref, TOL[dtype])
    assert int(bn.num_batches_tracked) == 1
    # without the block the statistics follow the last micro-batches: the test can fail
    plain = layer(6, dtype=dtype)
    for xb in x.chunk(4):
        plain(xb)
    assert int(plain.num_batches_tracked) == 4
    assert (plain.running_var - ref.running_var).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", [
    {"running": "window", "window_size": 3},
    {"running": "cumulative"},
    {"momentum": None},  # torch's cumulative average, through the ema policy
])
def test_running_policies_equal_their_own_step_on_the_concatenated_batch(kwargs, dtype):
    bn = bnlab.BatchNorm2d(6, dtype=dtype, **kwargs)
    for seed in (1, 2):  # earlier steps, so the policy's history takes part
        bn(_batch(dtype, n=16, seed=seed))
    ref = copy.deepcopy(bn)
    x = _batch(dtype)
    ref(x)
    _accumulate(bn, x)
    _assert_stats(bn, ref, TOL[dtype])
    assert int(bn.num_batches_tracked) == 3
    if "window_size" in kwargs:
        torch.testing.assert_close(bn.window_mean, ref.window_mean, rtol=0, atol=TOL[dtype])
        torch.testing.assert_close(bn.window_var, ref.window_var, rtol=0, atol=TOL[dtype])


def test_torch_momentum_none_layer_gets_torch_cumulative_update():
    bn = nn.BatchNorm2d(6, momentum=None, dtype=torch.float64)
    bn(_batch(torch.float64, n=16, seed=3))
    ref = copy.deepcopy(bn)
    x = _batch(torch.float64)
    ref(x)
    _accumulate(bn, x)
    _assert_stats(bn, ref, 1e-12)


_LAYERS = {
    "bnlab.BatchNorm1d (N, C, L)": (lambda: bnlab.BatchNorm1d(6), (64, 6, 5)),
    "bnlab.BatchNorm1d (N, C)": (lambda: bnlab.BatchNorm1d(6), (64, 6)),
    "bnlab.BatchNorm3d": (lambda: bnlab.BatchNorm3d(6), (64, 6, 2, 3, 3)),
    "bnlab.BatchNormAct2d": (lambda: bnlab.BatchNormAct2d(6), (64, 6, 4, 4)),
    "bnlab.BatchRenorm2d": (lambda: bnlab.BatchRenorm2d(6), (64, 6, 4, 4)),
    "bnlab.SyncBatchNorm (one process)": (lambda: bnlab.SyncBatchNorm(6), (64, 6, 4, 4)),
    "torch SyncBatchNorm (one process)": (lambda: nn.SyncBatchNorm(6), (64, 6, 4, 4)),
    "bnlab.convert(torch BatchNorm1d)": (lambda: bnlab.convert(nn.BatchNorm1d(6)), (64, 6)),
}


@pytest.mark.parametrize("name", list(_LAYERS))
def test_every_layer_kind_matches_its_own_step_on_the_concatenated_batch(name):
    make, shape = _LAYERS[name]
    bn = make().double()
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref = copy.deepcopy(bn)
    ref(x * 2 + 1)
    _accumulate(bn, x * 2 + 1)
    _assert_stats(bn, ref, 1e-12)
    assert int(bn.num_batches_tracked) == 1


def _model(bn):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), bn(6), nn.ReLU(), nn.Conv2d(6, 4, 1),
                         bn(4))


@pytest.mark.parametrize("bn", [nn.BatchNorm2d, bnlab.BatchNorm2d])
def test_outputs_and_gradients_equal_those_without_the_block(bn):
    model = _model(bn)
    other = copy.deepcopy(model)
    x = torch.randn(64, 3, 7, 7)
    grads = [torch.randn(16, 4, 5, 5) for _ in range(4)]  # random upstream gradient
    with bnlab.accumulation(model):
        outs = []
        for xb, g in zip(x.chunk(4), grads, strict=True):
            y = model(xb)
            y.backward(g)
            outs.append(y.detach())
    for xb, g, y in zip(x.chunk(4), grads, outs, strict=True):
        yo = other(xb)
        yo.backward(g)
        torch.testing.assert_close(y, yo.detach(), rtol=0, atol=0)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert p.grad.abs().sum() > 0
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    # ... while the statistics differ: one update here, four there
    assert [int(m.num_batches_tracked) for m in (model[1], other[1])] == [1, 4]


@pytest.mark.parametrize("bn", [nn.BatchNorm2d, bnlab.BatchNorm2d])
def test_every_layer_of_a_model_matches_one_step_on_what_reached_it(bn):
    model = _model(bn).double()
    first, second = copy.deepcopy(model[1]), copy.deepcopy(model[4])
    x = torch.randn(64, 3, 7, 7, dtype=torch.float64)
    seen = []  # the deeper layer's input: micro-batches normalised by the first layer
    h = model[4].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    _accumulate(model, x)
    h.remove()
    first(model[0](x))
    second(torch.cat(seen))
    _assert_stats(model[1], first, 1e-12)
    _assert_stats(model[4], second, 1e-12)


def test_buffers_stay_at_their_entry_values_inside_the_block():
    bn = bnlab.BatchNorm2d(6, normalize_with="running")
    bn(_batch(n=16, seed=5))
    entry = bn.running_mean.clone()
    x = _batch()
    with bnlab.accumulation(bn):
        for xb in x.chunk(4):
            bn(xb)
            torch.testing.assert_close(bn.running_mean, entry, rtol=0, atol=0)
            assert int(bn.num_batches_tracked) == 1
    assert int(bn.num_batches_tracked) == 2


def test_ghost_bn_gets_one_update_with_the_union_mean():
    bn = bnlab.GhostBatchNorm2d(6, virtual_batch_size=8, momentum=1.0, dtype=torch.float64)
    x = _batch(torch.float64)
    _accumulate(bn, x)
    torch.testing.assert_close(bn.running_mean, x.mean((0, 2, 3)), rtol=0, atol=1e-12)
    torch.testing.assert_close(bn.running_var, x.var((0, 2, 3)), rtol=0, atol=1e-12)
    assert int(bn.num_batches_tracked) == 1


def test_compiled_model_fullgraph():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), bnlab.BatchNorm2d(6), nn.ReLU())
    ref = copy.deepcopy(model)
    x = torch.randn(64, 3, 7, 7)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for step in range(2):
        xs = x + step
        ref(xs)
        with bnlab.accumulation(model):
            for xb in xs.chunk(4):
                compiled(xb).square().mean().backward()
        _assert_stats(model[1], ref[1], 1e-5)
    assert int(model[1].num_batches_tracked) == 2


def test_compiled_torch_model_momentum_restored():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU())
    ref = copy.deepcopy(model)
    x = torch.randn(64, 3, 7, 7)
    ref(x)
    compiled = torch.compile(model, backend="aot_eager")
    with bnlab.accumulation(model):
        for xb in x.chunk(4):
            compiled(xb).square().mean().backward()
    _assert_stats(model[1], ref[1], 1e-5)
    assert model[1].momentum == 0.1


# --- errors and no-ops ------------------------------------------------------------------


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="accumulation: model must be a torch.nn.Module, got list"):
        with bnlab.accumulation([nn.BatchNorm2d(3)]):
            pass


def test_nested_block_is_an_error_and_the_outer_block_still_works():
    model = _model(nn.BatchNorm2d)
    x = torch.randn(32, 3, 7, 7)
    with bnlab.accumulation(model):
        with pytest.raises(ValueError, match="nested blocks are not supported"):
            with bnlab.accumulation(model[1]):  # a layer of the outer model counts too
                pass
        for xb in x.chunk(2):
            model(xb)
    assert int(model[1].num_batches_tracked) == 1


def test_empty_block_is_an_error_and_changes_nothing():
    bn = bnlab.BatchNorm2d(6)
    with pytest.raises(ValueError, match="no BN layer of the model ran a forward.*empty block"):
        with bnlab.accumulation(bn):
            pass
    assert int(bn.num_batches_tracked) == 0 and not bn._forward_hooks


def test_eval_mode_is_a_documented_no_op():
    model = _model(bnlab.BatchNorm2d).eval()
    state = copy.deepcopy(model.state_dict())
    with bnlab.accumulation(model):  # no layer tracks: not an empty-block error either
        model(torch.randn(8, 3, 7, 7))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_exception_inside_the_block_restores_everything():
    bn = bnlab.BatchNorm2d(6, running="window", window_size=2)
    bn(_batch(n=16, seed=7))
    before = copy.deepcopy(bn.state_dict())
    with pytest.raises(RuntimeError, match="boom"):
        with bnlab.accumulation(bn):
            bn(_batch(n=16, seed=8))
            raise RuntimeError("boom")
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not bn._forward_hooks and not accumulate._ACTIVE
    _accumulate(bn, _batch())  # a new block works
    assert int(bn.num_batches_tracked) == 2


def test_synchronising_layer_is_refused(monkeypatch):
    monkeypatch.setattr(accumulate, "group_size", lambda group: 2)
    bn = bnlab.SyncBatchNorm(6)
    with pytest.raises(ValueError, match="SyncBatchNorm synchronises its statistics over 2 "
                                         "processes"):
        with bnlab.accumulation(nn.Sequential(bn)):
            pass
    assert not bn._forward_hooks and not accumulate._ACTIVE

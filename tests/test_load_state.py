"""What a bnlab layer accepts from a state dict: no NaN/Inf or negative variances unless asked
(``bnlab.allow_bad_running_stats``), and a window that starts from the loaded statistics when a
checkpoint has no window buffers (a torch BN's, or a non-window layer's)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab

NAN, INF = float("nan"), float("inf")


def _torch_state(c: int = 4, mean: float = 2.0, var: float = 3.0, seen: int = 7) -> dict:
    bn = nn.BatchNorm2d(c)
    bn.running_mean.fill_(mean)
    bn.running_var.fill_(var)
    bn.num_batches_tracked.fill_(seen)
    return bn.state_dict()


def _snapshot(m: nn.Module) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ bad statistics
@pytest.mark.parametrize(
    "key, value, words",
    [
        ("running_var", NAN, "1 NaN of 4 values"),
        ("running_var", -1.0, "1 negative of 4 values"),
        ("running_var", INF, "1 Inf of 4 values"),
        ("running_mean", NAN, "1 NaN of 4 values"),
        ("running_mean", -INF, "1 Inf of 4 values"),
    ],
)
def test_bad_statistics_are_refused_naming_layer_and_key(key, value, words):
    state = _torch_state()
    state[key][1] = value
    # the BN layer first: nothing of the model is loaded before it refuses (a module that
    # torch's load_state_dict visits earlier would already hold the new values)
    model = nn.Sequential(bnlab.BatchNorm2d(4), nn.Conv2d(4, 4, 3))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=rf"BatchNorm2d '0': state dict key '0\.{key}' holds "
                                         rf"{words}.*bnlab\.allow_bad_running_stats\(\)"):
        model.load_state_dict({**{f"0.{k}": v for k, v in state.items()},
                               **{f"1.{k}": torch.zeros_like(v)
                                  for k, v in model[1].state_dict().items()}})
    assert _equal(before, _snapshot(model))


def test_a_negative_mean_is_fine_and_valid_states_load_unchanged():
    state = _torch_state(mean=-5.0)
    bn = bnlab.BatchNorm2d(4)
    bn.load_state_dict(state)
    assert _equal(bn.state_dict(), state)


def test_allow_bad_running_stats_loads_anyway_for_inspection():
    state = _torch_state()
    state["running_var"][0] = NAN
    bn = bnlab.BatchNorm2d(4)
    with bnlab.allow_bad_running_stats():
        bn.load_state_dict(state)
    assert torch.isnan(bn.running_var[0])
    assert [f.code for f in bnlab.tools.lint(nn.Sequential(bn))] == ["BN006"]
    with pytest.raises(ValueError, match="holds 1 NaN"):  # only inside the context
        bnlab.BatchNorm2d(4).load_state_dict(state)


def test_window_buffers_are_checked_too():
    bn = bnlab.BatchNorm2d(4, running="window", window_size=3)
    state = bn.state_dict()
    state["window_var"][2, 0] = -2.0
    with pytest.raises(ValueError, match=r"key 'window_var' holds 1 negative of 12 values"):
        bn.load_state_dict(state)


def test_converters_carry_statistics_as_they_are():
    torch_bn = nn.BatchNorm2d(4)
    torch_bn.running_var[0] = NAN  # a model that already holds them: converting is not loading
    for out in (bnlab.convert(nn.Sequential(torch_bn))[0], bnlab.freeze(torch_bn),
                bnlab.SyncBatchNorm.convert_sync_batchnorm(torch_bn)):
        assert torch.isnan(out.running_var[0])
    back = bnlab.convert(bnlab.unfreeze(bnlab.freeze(torch_bn)), to="torch")
    assert torch.isnan(back.running_var[0])


# ------------------------------------------------------------------ window from a checkpoint
def _batch(mean: float, c: int = 4) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(16, c, 3, 3)
    return x - x.mean(dim=(0, 2, 3), keepdim=True) + mean


@pytest.mark.parametrize("k, seen", [(3, 7), (10, 7), (4, 4)])
def test_window_starts_from_loaded_statistics(k, seen):
    bn = bnlab.BatchNorm2d(4, running="window", window_size=k)
    result = bn.load_state_dict(_torch_state(mean=2.0, var=3.0, seen=seen), strict=False)
    # still reported (they were not in the checkpoint), but no longer wrong
    assert result.missing_keys == ["window_mean", "window_var"] and not result.unexpected_keys
    torch.testing.assert_close(bn.window_mean, torch.full((k, 4), 2.0))
    torch.testing.assert_close(bn.window_var, torch.full((k, 4), 3.0))
    # the case: one batch of mean 4.98 gave running_mean 1.66 (zero slots averaged in)
    x = _batch(4.98)
    bn.train()(x)
    old = min(seen, k - 1)  # loaded batches still in the window beside the new one
    want_mean = (old * 2.0 + 4.98) / (old + 1)
    want_var = (old * 3.0 + x.var(dim=(0, 2, 3))) / (old + 1)
    torch.testing.assert_close(bn.running_mean, torch.full((4,), want_mean))
    torch.testing.assert_close(bn.running_var, want_var)
    assert int(bn.num_batches_tracked) == seen + 1


def test_window_refuses_a_checkpoint_without_window_in_strict_mode():
    bn = bnlab.BatchNorm2d(4, running="window", window_size=3)
    before = _snapshot(bn)
    with pytest.raises(ValueError, match=r"BatchNorm2d: the state dict has no 'window_mean', "
                                         r"'window_var'.*strict=False.*running_mean/running_var"):
        bn.load_state_dict(_torch_state())
    assert _equal(before, _snapshot(bn))


def test_window_checkpoint_round_trip_is_unchanged():
    src = bnlab.BatchNorm2d(4, running="window", window_size=3)
    for m in (1.0, 2.0):
        src(_batch(m))
    dst = bnlab.BatchNorm2d(4, running="window", window_size=3)
    dst.load_state_dict(src.state_dict())
    assert _equal(src.state_dict(), dst.state_dict())


def test_cumulative_continues_the_loaded_average():
    bn = bnlab.BatchNorm2d(4, running="cumulative")
    bn.load_state_dict(_torch_state(mean=2.0, seen=7))
    bn(_batch(10.0))
    torch.testing.assert_close(bn.running_mean, torch.full((4,), (7 * 2.0 + 10.0) / 8))

"""Exact semantics of the running-statistics modes: ema, cumulative, window, normalize_with."""

from __future__ import annotations

import io

import pytest
import torch

import bnlab
from tests.reference import ref_stats


def _batches(n, shape=(16, 4, 3, 3)):
    return [torch.randn(shape) * (1 + i) + 3 * i for i in range(n)]


def _unbiased(x):
    mean, var = ref_stats(x)
    count = x.numel() // x.shape[1]
    return mean, var * count / (count - 1)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_window_is_mean_of_last_k_batches(k: int) -> None:
    bn = bnlab.BatchNorm2d(4, running="window", window_size=k)
    batches = _batches(8)
    history = []
    for i, x in enumerate(batches):
        bn(x)
        history.append(_unbiased(x))
        last = history[-k:]
        assert len(last) == min(i + 1, k)
        want_mean = torch.stack([m for m, _ in last]).mean(0)
        want_var = torch.stack([v for _, v in last]).mean(0)
        torch.testing.assert_close(bn.running_mean.double(), want_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), want_var, rtol=1e-5, atol=1e-5)


def test_window_buffer_survives_state_dict() -> None:
    a = bnlab.BatchNorm2d(4, running="window", window_size=3)
    for x in _batches(4):
        a(x)
    sd = a.state_dict()
    assert {"window_mean", "window_var"} <= set(sd)
    assert sd["window_mean"].shape == (3, 4)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    b = bnlab.BatchNorm2d(4, running="window", window_size=3)
    b.load_state_dict(torch.load(buf, weights_only=True))
    nxt = torch.randn(16, 4, 3, 3) * 7
    a(nxt)
    b(nxt)
    # the restored layer drops the same oldest batch as the original
    torch.testing.assert_close(a.running_mean, b.running_mean)
    torch.testing.assert_close(a.running_var, b.running_var)


def test_cumulative_is_plain_average_and_ignores_momentum() -> None:
    bn = bnlab.BatchNorm2d(4, momentum=0.3, running="cumulative")
    batches = _batches(5)
    for x in batches:
        bn(x)
    stats = [_unbiased(x) for x in batches]
    torch.testing.assert_close(
        bn.running_mean.double(), torch.stack([m for m, _ in stats]).mean(0), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        bn.running_var.double(), torch.stack([v for _, v in stats]).mean(0), rtol=1e-5, atol=1e-5
    )


def test_momentum_none_equals_cumulative_mode() -> None:
    a = bnlab.BatchNorm2d(4, momentum=None)
    b = bnlab.BatchNorm2d(4, running="cumulative")
    for x in _batches(4):
        a(x)
        b(x)
    torch.testing.assert_close(a.running_mean, b.running_mean)
    torch.testing.assert_close(a.running_var, b.running_var)


def test_ema_update_rule() -> None:
    bn = bnlab.BatchNorm2d(4, momentum=0.25)
    x = torch.randn(16, 4, 3, 3) + 2
    bn(x)
    mean, var = _unbiased(x)
    torch.testing.assert_close(bn.running_mean.double(), 0.25 * mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), 0.75 + 0.25 * var, rtol=1e-5, atol=1e-6)


def test_normalize_with_running_uses_statistics_from_before_the_batch() -> None:
    bn = bnlab.BatchNorm2d(4, normalize_with="running", momentum=0.5)
    first, second = _batches(2)
    y1 = bn(first)
    # the first batch has nothing accumulated before it: it is normalised with its own stats
    mean, var = ref_stats(first)
    torch.testing.assert_close(y1.double().mean(dim=(0, 2, 3)), torch.zeros(4, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    x = second.clone().requires_grad_()
    y2 = bn(x)
    want = (second - rm.view(1, -1, 1, 1)) / torch.sqrt(rv.view(1, -1, 1, 1) + bn.eps)
    torch.testing.assert_close(y2, want)
    # no gradient through the statistics: the input gradient is the per-channel scale only
    dy = torch.randn_like(y2)
    y2.backward(dy)
    torch.testing.assert_close(x.grad, dy / torch.sqrt(rv.view(1, -1, 1, 1) + bn.eps))
    # and the statistics still moved towards the second batch afterwards
    assert not torch.equal(bn.running_mean, rm)
    del mean, var


def test_normalize_with_running_requires_running_stats() -> None:
    with pytest.raises(ValueError, match="normalize_with='running' needs running statistics"):
        bnlab.BatchNorm2d(4, track_running_stats=False, normalize_with="running")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(running="window"), "running='window' needs window_size, a positive int, got "
                                 "window_size=None"),
        (dict(running="window", window_size=0), "window_size=0"),
        (dict(window_size=4), "window_size=4 is only used with running='window'"),
        (dict(running="sliding"),
         r"running must be one of \['cumulative', 'ema', 'window'\], got 'sliding'"),
        (dict(normalize_with="stats"), r"normalize_with must be one of \['batch', 'running'\]"),
        (dict(momentum=0.99 + 1), r"momentum must be a float in \[0, 1\] or None"),
        (dict(eps=0.0), "eps must be a positive finite float, got 0.0"),
        (dict(nonfinite="ignore"), r"nonfinite must be one of \['raise', 'skip'\]"),
    ],
)
def test_bad_arguments_are_named(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        bnlab.BatchNorm2d(4, **kwargs)


def test_bad_num_features() -> None:
    with pytest.raises(ValueError, match="num_features must be a positive int, got 0"):
        bnlab.BatchNorm2d(0)
    with pytest.raises(ValueError, match=r"num_features must be a positive int, got 3.0"):
        bnlab.BatchNorm2d(3.0)


def test_reset_running_stats_clears_window() -> None:
    bn = bnlab.BatchNorm2d(4, running="window", window_size=2)
    for x in _batches(3):
        bn(x)
    bn.reset_running_stats()
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.window_mean, torch.zeros(2, 4))
    assert torch.equal(bn.window_var, torch.ones(2, 4))
    assert torch.equal(bn.running_var, torch.ones(4))


def test_extra_repr_names_modes() -> None:
    r = repr(bnlab.BatchNorm2d(4, running="window", window_size=3, normalize_with="running"))
    assert "running='window'" in r and "window_size=3" in r and "normalize_with='running'" in r
    assert repr(bnlab.BatchNorm2d(4)) == repr(torch.nn.BatchNorm2d(4))

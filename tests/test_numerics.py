"""Numerics and bad input: offsets, constant channels, NaN/Inf, shapes, empty batches."""

from __future__ import annotations

import warnings

import pytest
import torch

import bnlab
from tests.reference import ref_bn, ref_stats


def test_large_common_offset_keeps_the_variance() -> None:
    x = torch.randn(64, 4, 16, 16, dtype=torch.float64) * 1e-2 + 1e4
    x32 = x.float()
    _, want = ref_stats(x32)  # the variance of the float32 values, computed in float64
    mean, var = bnlab.functional.batch_stats(x32)
    torch.testing.assert_close(var.double(), want, rtol=1e-3, atol=0)
    bn = bnlab.BatchNorm2d(4)
    y = bn(x32)
    assert torch.isfinite(y).all()
    ref_mean, _ = ref_stats(x32)
    # A float32 mean of 1e4 is off by up to half an ulp (4.9e-4), i.e. 0.049 in units of the
    # 1e-2 spread: that bounds any float32 BN's output error here (torch's included).
    err = (y.double() - ref_bn(x32, ref_mean, want)).abs().max().item()
    assert err < 0.049
    count = x32.numel() // 4
    torch.testing.assert_close(bn.running_var.double(), 0.9 + 0.1 * want * count / (count - 1),
                               rtol=1e-3, atol=0)


def test_constant_channel_gives_finite_output() -> None:
    x = torch.randn(8, 3, 4, 4)
    x[:, 1] = 5.0
    bn = bnlab.BatchNorm2d(3)
    y = bn(x)
    assert torch.isfinite(y).all()
    if bnlab.kernels.choose(x, detached=True) == "native":  # what a layer's step runs on
        # bnlab's kernels centre on an exact per-channel mean
        assert torch.equal(y[:, 1], torch.zeros_like(y[:, 1]))
    else:
        # the torch backend runs torch's own kernel: exactly torch's numbers (torch's mean of a
        # constant channel is not exact, so its output is not exactly zero)
        assert torch.equal(y, torch.nn.BatchNorm2d(3)(x))
    assert bn.running_var[1].item() == pytest.approx(0.9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_batch_never_enters_running_statistics(bad) -> None:
    bn = bnlab.BatchNorm2d(3)
    bn(torch.randn(8, 3, 4, 4))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(8, 3, 4, 4)
    x[2, 1, 0, 0] = bad
    with pytest.warns(RuntimeWarning, match="non-finite statistics"):
        y = bn(x)
    assert y.shape == x.shape  # the output for that batch is still returned
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    # warned once per layer: a second bad batch is skipped silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn(x)
    # and a good batch afterwards updates normally
    bn(torch.randn(8, 3, 4, 4))
    assert int(bn.num_batches_tracked) == 2


def test_nonfinite_raise_option() -> None:
    bn = bnlab.BatchNorm2d(3, running="window", window_size=2, nonfinite="raise")
    x = torch.randn(8, 3, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(bnlab.NonFiniteStatisticsError, match="non-finite statistics"):
        bn(x)
    assert torch.equal(bn.window_mean, torch.zeros(2, 3))


def test_wrong_rank_names_expected_and_received() -> None:
    with pytest.raises(ValueError, match=r"BatchNorm2d: expected 4D input \(N, C, H, W\), "
                                         r"got 3D input of shape \(3, 4, 5\)"):
        bnlab.BatchNorm2d(3)(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match=r"BatchNorm1d: expected 2D or 3D input"):
        bnlab.BatchNorm1d(3)(torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize("train", [True, False])
def test_wrong_channel_count_names_shapes(train) -> None:
    bn = bnlab.BatchNorm2d(3).train(train)
    with pytest.raises(ValueError, match=r"expected 3 channels in dim 1 \(num_features=3\), "
                                         r"got input of shape \(2, 4, 5, 5\)"):
        bn(torch.randn(2, 4, 5, 5))


def test_one_value_per_channel_in_training_raises_like_torch() -> None:
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, "
                                         r"got input size torch.Size\(\[1, 3\]\)"):
        bnlab.BatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bnlab.BatchNorm2d(3)(torch.randn(1, 3, 1, 1))
    # evaluation with running statistics is fine
    y = bnlab.BatchNorm2d(3).eval()(torch.randn(1, 3, 1, 1))
    assert y.shape == (1, 3, 1, 1)


def test_integer_input_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="expected a floating-point input, got dtype torch.int64"):
        bnlab.BatchNorm1d(3)(torch.ones(4, 3, dtype=torch.long))


def test_empty_batch_returns_empty_and_keeps_statistics() -> None:
    bn = bnlab.BatchNorm2d(3)
    y = bn(torch.randn(0, 3, 4, 4))
    assert y.shape == (0, 3, 4, 4)
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_mean, torch.zeros(3))


def test_c1_and_h_w_1() -> None:
    bn = bnlab.BatchNorm2d(1)
    t = torch.nn.BatchNorm2d(1)
    x = torch.randn(5, 1, 1, 1)
    torch.testing.assert_close(bn(x), t(x))
    torch.testing.assert_close(bn.running_var, t.running_var)

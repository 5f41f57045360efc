"""The pure functional core: no mutation, double-precision gradcheck."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from bnlab import functional as F


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 6), (3, 2, 3, 4), (2, 2, 2, 3, 2)])
def test_gradcheck_batch_norm_train(shape) -> None:
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x, w, b: F.batch_norm_train(x, w, b, 1e-5)[0], (x, w, b))


def test_gradcheck_normalize_with_fixed_statistics() -> None:
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    mean = torch.randn(3, dtype=torch.float64, requires_grad=True)
    var = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    assert gradcheck(lambda x, m, v: F.normalize(x, m, v, None, None, 1e-3), (x, mean, var))


def test_batch_norm_is_pure() -> None:
    x = torch.randn(8, 3, 4, 4)
    rm, rv = torch.zeros(3), torch.ones(3)
    y, nm, nv = F.batch_norm(x, rm, rv, training=True, momentum=0.1)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    ref_y = torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), training=True)
    torch.testing.assert_close(y, ref_y)
    t_rm, t_rv = rm.clone(), rv.clone()
    torch.nn.functional.batch_norm(x, t_rm, t_rv, training=True, momentum=0.1)
    torch.testing.assert_close(nm, t_rm)
    torch.testing.assert_close(nv, t_rv)
    y_eval, same_m, same_v = F.batch_norm(x, nm, nv, training=False)
    assert same_m is nm and same_v is nv
    torch.testing.assert_close(y_eval, torch.nn.functional.batch_norm(x, nm, nv))


def test_window_helpers() -> None:
    w = torch.zeros(3, 2)
    w2 = F.window_push(w, torch.tensor([1.0, 2.0]), 4)
    assert torch.equal(w, torch.zeros(3, 2))  # not mutated
    assert torch.equal(w2[1], torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(F.window_stats(w2, 1), torch.zeros(2))
    torch.testing.assert_close(F.window_stats(w2, 7), torch.tensor([1 / 3, 2 / 3]))
    with pytest.raises(ValueError, match="the window is empty"):
        F.window_stats(w2, 0)


def test_unbiased_and_factors() -> None:
    assert F.unbiased_var(torch.tensor(2.0), 5).item() == pytest.approx(2.5)
    assert F.cumulative_factor(4) == 0.25
    torch.testing.assert_close(F.ema_update(torch.tensor(1.0), torch.tensor(3.0), 0.25),
                               torch.tensor(1.5))


def test_moments_of_parts_merge_to_the_moments_of_the_whole():
    x = torch.randn(10, 3, 4, dtype=torch.float64) * 5 + 2
    parts = [F.moments(x[:1]), F.moments(x[1:7]), F.moments(x[7:])]
    counts = torch.tensor([[float(p[0])] for p in parts], dtype=torch.float64)
    mean, m2 = F.merge_moments(counts, torch.stack([p[1] for p in parts]),
                               torch.stack([p[2] for p in parts]))  # fmt: skip
    n, whole_mean, whole_m2 = F.moments(x)
    assert n == 40
    torch.testing.assert_close(mean, whole_mean)
    torch.testing.assert_close(m2, whole_m2)

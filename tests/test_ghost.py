"""Ghost BN: each virtual batch normalised alone; pooled running statistics."""

from __future__ import annotations

import pytest
import torch

import bnlab
from bnlab import functional_variants as FV


def reference(x, sizes, w, b, eps):
    """Plain torch BN applied to each chunk, float64."""
    outs = []
    for chunk in torch.split(x.double(), sizes):
        outs.append(
            torch.nn.functional.batch_norm(chunk, None, None, w.double(), b.double(), True, 0, eps)
        )
    return torch.cat(outs)


@pytest.mark.parametrize(
    "n, v, per_sample, sizes",
    [(8, 4, 1, [4, 4]), (10, 4, 1, [4, 4, 2]), (9, 4, 1, [4, 5]), (9, 4, 3, [4, 4, 1]),
     (3, 4, 1, [3]), (4, 4, 1, [4])],
)
def test_split_sizes(n, v, per_sample, sizes):
    assert FV.ghost_split_sizes(n, v, per_sample) == sizes


def test_strict_raises_with_the_documented_message():
    bn = bnlab.GhostBatchNorm2d(3, virtual_batch_size=32, strict=True)
    with pytest.raises(
        ValueError,
        match="GhostBatchNorm2d: batch size 48 is not divisible by virtual_batch_size=32; "
        "use a multiple of 32",
    ):
        bn(torch.randn(48, 3, 2, 2))
    assert int(bn.num_batches_tracked) == 0
    bn(torch.randn(64, 3, 1, 1))
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("n, v", [(12, 4), (10, 4), (9, 4)])
def test_outputs_gradients_and_running_stats_match_reference(n, v):
    torch.manual_seed(0)
    bn = bnlab.GhostBatchNorm1d(3, virtual_batch_size=v, momentum=0.5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
    x = (torch.randn(n, 3) * 2 + 3).requires_grad_(True)
    gy = torch.randn(n, 3)
    y = bn(x)
    (y * gy).sum().backward()
    sizes = FV.ghost_split_sizes(n, v)
    x64 = x.detach().double().requires_grad_(True)
    w64 = bn.weight.detach().double().requires_grad_(True)
    b64 = bn.bias.detach().double().requires_grad_(True)
    ref = reference(x64, sizes, w64, b64, bn.eps)
    (ref * gy.double()).sum().backward()
    torch.testing.assert_close(y.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bn.weight.grad.double(), w64.grad, atol=1e-5, rtol=1e-5)
    # Running statistics: one update with the count-weighted pooled mean / unbiased variance.
    chunks = torch.split(x.detach().double(), sizes)
    cnt = torch.tensor(sizes, dtype=torch.double)[:, None]
    mean = (torch.stack([c.mean(0) for c in chunks]) * cnt).sum(0) / n
    uvar = (torch.stack([c.var(0, unbiased=True) for c in chunks]) * cnt).sum(0) / n
    torch.testing.assert_close(bn.running_mean.double(), 0.5 * mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), 0.5 + 0.5 * uvar, atol=1e-6, rtol=1e-5)
    assert int(bn.num_batches_tracked) == 1


def test_equal_chunk_fast_path_equals_loop():
    torch.manual_seed(3)
    x = torch.randn(12, 4, 3, 3)
    w, b = torch.rand(4), torch.randn(4)
    y_fast, m_fast, v_fast, c_fast = FV.ghost_batch_norm_train(x, [4, 4, 4], w, b, 1e-5)
    parts = [FV.ghost_batch_norm_train(c, [4], w, b, 1e-5) for c in x.split(4)]
    torch.testing.assert_close(y_fast, torch.cat([p[0] for p in parts]))
    torch.testing.assert_close(m_fast, torch.cat([p[1] for p in parts]))
    torch.testing.assert_close(v_fast, torch.cat([p[2] for p in parts]))
    assert c_fast == [36, 36, 36]


def test_virtual_batch_not_smaller_than_batch_is_plain_bn():
    torch.manual_seed(4)
    x = torch.randn(8, 3, 4, 4)
    g, bn = bnlab.GhostBatchNorm2d(3, virtual_batch_size=8), bnlab.BatchNorm2d(3)
    torch.testing.assert_close(g(x), bn(x))
    torch.testing.assert_close(g.running_var, bn.running_var)


def test_each_virtual_batch_is_standardised_and_eval_uses_running_stats():
    torch.manual_seed(5)
    g = bnlab.GhostBatchNorm2d(2, virtual_batch_size=4)
    x = torch.randn(8, 2, 3, 3)
    x[4:] += 10.0
    y = g(x)
    for chunk in y.split(4):
        torch.testing.assert_close(chunk.mean((0, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    g.eval()
    full, halves = g(x), torch.cat([g(x[:4]), g(x[4:])])
    torch.testing.assert_close(full, halves)  # eval does not depend on the batch's cut
    assert not torch.allclose(full, y, atol=1e-2)


def test_bad_virtual_batch_size_and_registry():
    with pytest.raises(ValueError, match="virtual_batch_size must be an int >= 2, got 1"):
        bnlab.GhostBatchNorm2d(3, virtual_batch_size=1)
    m = bnlab.make_norm("ghost", 5, 3, virtual_batch_size=4)
    assert isinstance(m, bnlab.GhostBatchNorm3d) and m.virtual_batch_size == 4

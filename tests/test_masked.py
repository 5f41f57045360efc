"""MaskedBatchNorm1d against torch's BatchNorm1d applied to the valid positions alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab

N, C, L = 5, 3, 7


def _mask(seed: int) -> torch.Tensor:
    """A random mask with one sample of a single valid position and one of padding only."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(N, L, generator=g) < 0.6
    mask[0] = False
    mask[0, 3] = True  # one valid position
    mask[1] = False  # padding only
    mask[2, :2] = True
    return mask


def _gather(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The valid positions of ``x`` (N, C, L) as (n_valid, C)."""
    return x.transpose(1, 2)[mask]


def _pair(**kw):
    torch.manual_seed(0)
    ours = bnlab.MaskedBatchNorm1d(C, dtype=torch.float64, **kw)
    ref = nn.BatchNorm1d(C, dtype=torch.float64, momentum=kw.get("momentum", 0.1))
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 2.0, C, dtype=torch.float64))
            m.bias.copy_(torch.linspace(-1.0, 1.0, C, dtype=torch.float64))
    return ours, ref


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("layout", ["ncl", "nlc"])
def test_training_output_stats_and_gradient_equal_bn_on_valid_positions(seed, layout):
    ours, ref = _pair(layout=layout)
    mask = _mask(seed)
    g = torch.Generator().manual_seed(100 + seed)
    x = (torch.randn(N, C, L, generator=g, dtype=torch.float64) * 3 + 2)
    x[~mask[:, None, :].expand_as(x)] = 1e3  # padding far from the data: it must not count
    gy = torch.randn(N, C, L, generator=g, dtype=torch.float64)
    xin = (x.transpose(1, 2).contiguous() if layout == "nlc" else x.clone()).requires_grad_()
    y = ours(xin, mask=mask)
    y_ncl = y.transpose(1, 2) if layout == "nlc" else y
    (y_ncl * gy).sum().backward()
    dx = xin.grad.transpose(1, 2) if layout == "nlc" else xin.grad

    xv = _gather(x, mask).clone().requires_grad_()
    yv = ref(xv)
    (yv * _gather(gy, mask)).sum().backward()

    assert torch.allclose(_gather(y_ncl, mask), yv, atol=1e-10, rtol=0)
    assert torch.allclose(_gather(dx, mask), xv.grad, atol=1e-10, rtol=0)
    assert torch.allclose(ours.running_mean, ref.running_mean, atol=1e-10, rtol=0)
    assert torch.allclose(ours.running_var, ref.running_var, atol=1e-10, rtol=0)
    assert int(ours.num_batches_tracked) == 1
    pad = ~mask[:, None, :].expand_as(x)
    assert (y_ncl[pad] == 0).all()
    assert (dx[pad] == 0).all()
    assert torch.allclose(ours.weight.grad, ref.weight.grad, atol=1e-10, rtol=0)
    assert torch.allclose(ours.bias.grad, ref.bias.grad, atol=1e-10, rtol=0)


def test_nonfinite_padding_never_leaks():
    ours, ref = _pair()
    mask = _mask(3)
    x = torch.randn(N, C, L, dtype=torch.float64)
    xp = x.clone()
    xp[~mask[:, None, :].expand_as(x)] = float("nan")
    xp.requires_grad_()
    y = ours(xp, mask=mask)
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(xp.grad).all()
    assert torch.allclose(_gather(y, mask), ref(_gather(x, mask)), atol=1e-10, rtol=0)
    assert torch.isfinite(ours.running_var).all()


@pytest.mark.parametrize("layout", ["ncl", "nlc"])
def test_no_mask_is_exactly_batchnorm1d(layout):
    ours, ref = _pair(layout=layout)
    x = torch.randn(N, C, L, dtype=torch.float64)
    xin = x.transpose(1, 2).contiguous() if layout == "nlc" else x
    # (nlc: BatchNorm1d of the same (N, C, L) view, so both reduce in the same memory order)
    x = xin.transpose(1, 2) if layout == "nlc" else x
    for _ in range(2):
        y = ours(xin)
        y = y.transpose(1, 2) if layout == "nlc" else y
        assert torch.equal(y, ref(x))
    # nlc: the running update reduces the strided view in another order (last-bit rounding)
    same = torch.equal if layout == "ncl" else lambda a, b: torch.allclose(a, b, atol=1e-14)
    assert same(ours.running_mean, ref.running_mean)
    assert same(ours.running_var, ref.running_var)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    ours.eval(), ref.eval()
    y = ours(xin)
    assert torch.equal(y.transpose(1, 2) if layout == "nlc" else y, ref(x))


def test_lengths_equal_the_equivalent_mask():
    lengths = torch.tensor([7, 0, 3, 1, 5])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    a, _ = _pair()
    b, _ = _pair()
    x = torch.randn(N, C, L, dtype=torch.float64)
    assert torch.equal(a(x, lengths=lengths), b(x, mask=mask))
    assert torch.equal(a.running_var, b.running_var)


@pytest.mark.parametrize("running,kw", [("window", {"window_size": 2}), ("cumulative", {})])
def test_running_policies_follow_valid_statistics(running, kw):
    ours, _ = _pair(running=running, **kw)
    means, uvars = [], []
    for step in range(3):
        mask = _mask(10 + step)
        x = torch.randn(N, C, L, dtype=torch.float64) + step
        ours(x, mask=mask)
        xv = _gather(x, mask)
        means.append(xv.mean(0))
        uvars.append(xv.var(0, unbiased=True))
    keep = slice(-2, None) if running == "window" else slice(None)
    assert torch.allclose(ours.running_mean, torch.stack(means[keep]).mean(0), atol=1e-10)
    assert torch.allclose(ours.running_var, torch.stack(uvars[keep]).mean(0), atol=1e-10)
    assert int(ours.num_batches_tracked) == 3


def test_evaluation_uses_running_stats_at_valid_positions_and_zeroes_padding():
    ours, ref = _pair()
    x = torch.randn(N, C, L, dtype=torch.float64) * 2 + 1
    mask = _mask(4)
    ours(x, mask=mask)
    ref(_gather(x, mask))
    ours.eval(), ref.eval()
    before = ours.running_mean.clone()
    x2 = torch.randn(N, C, L, dtype=torch.float64)
    y = ours(x2, mask=mask)
    assert torch.allclose(_gather(y, mask), ref(_gather(x2, mask)), atol=1e-10, rtol=0)
    assert (y[~mask[:, None, :].expand_as(y)] == 0).all()
    assert torch.equal(ours.running_mean, before)


def test_compile_fullgraph_one_graph_for_changing_masks():
    import torch._dynamo

    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    eager, _ = _pair()
    compiled_layer, _ = _pair()
    step = torch.compile(compiled_layer, backend=backend, fullgraph=True)
    torch._dynamo.utils.counters.clear()
    for seed in range(3):
        mask = _mask(20 + seed)
        x = torch.randn(N, C, L, dtype=torch.float64)
        y = step(x, mask=mask)
        assert torch.allclose(y, eager(x, mask=mask), atol=1e-12, rtol=0)
    assert len(graphs) == 1
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    assert torch.allclose(compiled_layer.running_mean, eager.running_mean, atol=1e-12)
    assert torch.allclose(compiled_layer.running_var, eager.running_var, atol=1e-12)
    assert int(compiled_layer.num_batches_tracked) == 3


_X = torch.randn(N, C, L)
_ERRORS = [
    (dict(mask=torch.ones(N, L + 1, dtype=torch.bool)), ValueError, r"mask must have shape"),
    (dict(mask=torch.ones(N, L)), TypeError, r"mask must be a torch.bool tensor.*float32"),
    (dict(mask=torch.ones(N, L, dtype=torch.bool, device="meta")), ValueError,
     r"mask must be on the input's device cpu, got meta"),
    (dict(lengths=torch.tensor([7, 7, 7, 7, 8])), ValueError, r"lengths must be in \[0, L=7\]"),
    (dict(lengths=torch.tensor([7, -1, 7, 7, 7])), ValueError, r"lengths must be in \[0, L=7\]"),
    (dict(lengths=torch.tensor([7, 7])), ValueError, r"lengths must have shape \(N,\) = \(5,\)"),
    (dict(lengths=torch.ones(N)), TypeError, r"lengths must be an integer tensor"),
    (dict(mask=torch.ones(N, L, dtype=torch.bool), lengths=torch.full((N,), L)), ValueError,
     r"mask or lengths, not both"),
    (dict(mask=torch.zeros(N, L, dtype=torch.bool)), ValueError,
     r"more than 1 valid position.*got 0"),
    (dict(lengths=torch.tensor([1, 0, 0, 0, 0])), ValueError,
     r"more than 1 valid position.*got 1"),
]


@pytest.mark.parametrize("kw,exc,match", _ERRORS)
def test_bad_input_raises_and_leaves_state_unchanged(kw, exc, match):
    bn = bnlab.MaskedBatchNorm1d(C)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(exc, match=match):
        bn(_X, **kw)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"layout must be one of \['ncl', 'nlc'\], got 'lnc'"):
        bnlab.MaskedBatchNorm1d(C, layout="lnc")
    with pytest.raises(ValueError, match=r"process_group is not supported yet"):
        bnlab.MaskedBatchNorm1d(C, process_group=object())
    with pytest.raises(ValueError, match=r"mask/lengths need a 3D input"):
        bnlab.MaskedBatchNorm1d(C)(torch.randn(N, C), mask=torch.ones(N, C, dtype=torch.bool))

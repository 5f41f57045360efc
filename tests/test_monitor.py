"""bnlab.tools.Monitor: values recorded per BN layer, gradients, hooks removed on exit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab
from bnlab.tools import Monitor
from bnlab.tools.monitor import summary_stats


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Sigmoid(), nn.Linear(6, 4),
                         bnlab.BatchNorm1d(4), nn.Linear(4, 2))


def test_summary_stats_against_numpy_style_reference():
    x = torch.arange(101, dtype=torch.float32)
    s = summary_stats(x)
    assert s["p15"] == pytest.approx(15) and s["p50"] == pytest.approx(50)
    assert s["p85"] == pytest.approx(85) and s["mean"] == pytest.approx(50)
    assert s["std"] == pytest.approx(x.std(correction=0).item())


def test_records_forward_statistics_drift_and_gradients(tmp_path):
    net = _net()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(32, 5, generator=g) * 3 + 1 for _ in range(4)]
    with Monitor(net, every=2) as mon:
        for x in batches:
            net(x).square().mul(torch.randn(32, 2, generator=g)).sum().backward()
    rows = mon.to_rows()
    assert [(r["step"], r["layer"]) for r in rows] == [(0, "1"), (0, "4"), (2, "1"), (2, "4")]
    first = rows[0]
    pre = net[0](batches[0])  # the weights did not change: no optimiser step
    assert first["in_mean"] == pytest.approx(pre.mean().item(), rel=1e-5)
    assert abs(first["out_mean"] - net[1].bias.mean().item()) < 1e-5  # train-mode BN output
    assert first["out_std"] == pytest.approx(1.0, abs=1e-3)  # gamma is 1, beta 0
    # drift against the initial running stats (0 mean, unit var)
    ref = (pre.mean(0).abs()).mean().item()
    assert first["drift_mean"] == pytest.approx(ref, rel=1e-4)
    assert first["grad_in_norm"] > 0 and first["grad_out_norm"] > 0
    assert first["gamma_mean"] == 1.0 and first["beta_max"] == 0.0
    nested = mon.records()[0]
    assert set(nested["in"]) == {"mean", "std", "p15", "p50", "p85"}
    # every hook is gone: further forwards and backwards record nothing
    net(batches[0]).sum().backward()
    assert len(mon.to_rows()) == 4
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    out = mon.plot(tmp_path / "monitor.png")
    assert out.stat().st_size > 1000


def test_hooks_removed_on_error_and_validation():
    net = _net()
    with pytest.raises(RuntimeError), Monitor(net):
        net(torch.randn(4, 3))  # wrong width
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    with pytest.raises(ValueError, match="every must be a positive int"):
        Monitor(net, every=0)
    with Monitor(net) as mon:
        pass
    with pytest.raises(ValueError, match="nothing recorded"):
        mon.plot("unused.png")

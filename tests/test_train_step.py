"""``train_step``: the lab's one optimisation step, and the one place of the lab that steps an
optimizer."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import bnlab.lab.train as train_pkg
from bnlab.lab.train import StepResult, loop, step, train_step

LAB = Path(train_pkg.__file__).resolve().parents[1]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def _batch(seed: int, n: int = 32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


class _PackedLinear(nn.Module):
    """``S`` independent linear classifiers: ``(S, B, F) -> (S, B, C)``."""

    def __init__(self, s: int, f: int, c: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.weight = nn.Parameter(torch.randn(s, f, c, generator=g))
        self.bias = nn.Parameter(torch.randn(s, c, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("sbf,sfc->sbc", x, self.weight) + self.bias[:, None]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_a_step_is_a_plain_training_loops_step(smoothing):
    net = _net()
    ref = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for seed in range(3):
        x, y = _batch(seed)
        done = train_step(net, opt, x, y, label_smoothing=smoothing)
        out = ref(x)
        loss = nn.functional.cross_entropy(out, y, label_smoothing=smoothing)
        ref_opt.zero_grad(set_to_none=True)
        loss.backward()
        ref_opt.step()
        assert done.losses == [loss.item()]
        assert done.hits == [int((out.argmax(1) == y).sum())]
        assert done.nonfinite == []
    for (k, a), b in zip(net.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_label_smoothing_is_the_loss_that_is_minimised():
    x, y = _batch(0)
    losses = {}
    for s in (0.0, 0.3):
        net = _net()
        losses[s] = train_step(net, torch.optim.SGD(net.parameters(), lr=0.1), x, y,
                               label_smoothing=s).losses[0]
    net = _net()
    with torch.no_grad():
        out = net.train()(x)
    assert losses[0.3] == pytest.approx(
        nn.functional.cross_entropy(out, y, label_smoothing=0.3).item(), rel=1e-6)
    assert losses[0.3] != pytest.approx(losses[0.0], rel=1e-3)


@pytest.mark.parametrize("bad", [1.5, -0.1, math.nan])
def test_a_bad_label_smoothing_is_refused_before_anything_changes(bad):
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = copy.deepcopy(net.state_dict())
    x, y = _batch(0)
    with pytest.raises(ValueError, match=r"train_step: label_smoothing must be a float in "
                                         rf"\[0, 1\], got {re.escape(repr(bad))}"):
        train_step(net, opt, x, y, lr=0.5, label_smoothing=bad)
    assert opt.param_groups[0]["lr"] == 0.1
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_lr_sets_every_group_before_the_step():
    net = _net()
    opt = torch.optim.SGD([{"params": net[0].parameters()}, {"params": net[3].parameters()}],
                          lr=0.1)
    w0 = net[3].weight.detach().clone()
    train_step(net, opt, *_batch(0), lr=0.0)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    assert torch.equal(net[3].weight, w0)  # a learning rate of 0 moved nothing


def test_the_result_holds_detached_tensors_until_read():
    net = _net()
    done = train_step(net, torch.optim.SGD(net.parameters(), lr=0.1), *_batch(0))
    assert isinstance(done, StepResult)
    assert done.loss.shape == (1,) and not done.loss.requires_grad
    assert done.logits.shape == (1, 32, 4) and not done.logits.requires_grad
    assert done.target.shape == (1, 32)


def test_packed_members_each_minimise_their_own_loss():
    pk = _PackedLinear(3, 6, 4)
    ref = [nn.Linear(6, 4) for _ in range(3)]
    with torch.no_grad():
        for k, m in enumerate(ref):
            m.weight.copy_(pk.weight[k].T)
            m.bias.copy_(pk.bias[k])
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 10, 6, generator=g), torch.randint(0, 4, (3, 10), generator=g)
    done = train_step(pk, torch.optim.SGD(pk.parameters(), lr=0.5), x, y, packed=True,
                      label_smoothing=0.1)
    for k, m in enumerate(ref):
        out = m(x[k])
        loss = nn.functional.cross_entropy(out, y[k], label_smoothing=0.1)
        assert done.losses[k] == pytest.approx(loss.item(), rel=1e-5)
        assert done.hits[k] == int((out.argmax(1) == y[k]).sum())
        loss.backward()
        with torch.no_grad():
            torch.testing.assert_close(pk.weight[k].T, m.weight - 0.5 * m.weight.grad)


def test_a_nonfinite_member_stops_the_step_before_backward():
    pk = _PackedLinear(3, 6, 4)
    before = copy.deepcopy(pk.state_dict())
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 10, 6, generator=g), torch.randint(0, 4, (3, 10), generator=g)
    x[1, 0, 0] = math.inf
    opt = torch.optim.SGD(pk.parameters(), lr=0.5)
    done = train_step(pk, opt, x, y, packed=True, skip_nonfinite=True)
    assert done.nonfinite == [1]
    assert math.isfinite(done.losses[0]) and not math.isfinite(done.losses[1])
    assert all(torch.equal(v, before[k]) for k, v in pk.state_dict().items())
    assert all(p.grad is None for p in pk.parameters())


def test_one_step_function_under_every_name():
    assert train_pkg.train_step is loop.train_step is step.train_step
    assert train_pkg.StepResult is loop.StepResult is step.StepResult


def test_the_lab_steps_an_optimizer_in_train_step_only():
    """The one loop: every training loop of the lab (trainer, studies, cost study, example
    worker) steps through ``train_step``; no other file of the lab calls ``opt.step()``."""
    calls = re.compile(r"\b(opt|optimizer)\w*\.step\(")
    found = {p.relative_to(LAB).as_posix() for p in LAB.rglob("*.py")
             if calls.search(p.read_text())}
    assert found == {"train/step.py"}


def test_the_cost_study_times_train_step(monkeypatch):
    from bnlab.lab.models import small_cnn
    from bnlab.lab.studies import cost

    calls = []

    def counted(*args, **kwargs):
        calls.append(args[2].shape)
        return train_step(*args, **kwargs)

    monkeypatch.setattr(cost, "train_step", counted)
    torch.manual_seed(0)
    model = small_cnn("bn", placement="before")
    w0 = model[0].weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2 * cost.TRAIN_BATCH, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (2 * cost.TRAIN_BATCH,), generator=g)
    assert cost._train_time(model, x, y, 2) > 0
    assert calls == [(cost.TRAIN_BATCH, 1, 28, 28)] * 2
    assert not torch.equal(model[0].weight, w0)
    assert int(model[1].num_batches_tracked) == 2

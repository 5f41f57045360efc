"""One table of layers and configurations, run through one generic battery of checks."""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass, field

import pytest
import torch

import bnlab
from tests.reference import ref_bn, ref_bn_backward, ref_stats


@dataclass(frozen=True)
class Case:
    cls: type
    torch_cls: type
    shape: tuple[int, ...]
    kwargs: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        kw = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.cls.__name__}{list(self.shape)}{kw}"


SHAPES = [
    (bnlab.BatchNorm1d, torch.nn.BatchNorm1d, (8, 3)),
    (bnlab.BatchNorm1d, torch.nn.BatchNorm1d, (6, 3, 5)),
    (bnlab.BatchNorm2d, torch.nn.BatchNorm2d, (6, 3, 5, 4)),
    (bnlab.BatchNorm3d, torch.nn.BatchNorm3d, (4, 3, 2, 3, 3)),
]
TORCH_CONFIGS = [
    dict(momentum=m, affine=a, track_running_stats=t)
    for m, a, t in itertools.product([0.1, None, 0.7], [True, False], [True, False])
] + [dict(momentum=0.1, affine=True, track_running_stats=True, bias=False)]
PARITY_CASES = [Case(c, tc, s, kw) for (c, tc, s) in SHAPES for kw in TORCH_CONFIGS]
MODE_CASES = [
    Case(c, tc, s, kw)
    for (c, tc, s) in SHAPES
    for kw in (
        dict(),
        dict(running="cumulative"),
        dict(running="window", window_size=3),
        dict(normalize_with="running"),
        dict(affine=False, track_running_stats=False),
    )
]


def _randomize_affine(*layers) -> None:
    w = torch.rand(layers[0].num_features) + 0.5
    b = torch.randn(layers[0].num_features)
    with torch.no_grad():
        for layer in layers:
            if layer.weight is not None:
                layer.weight.copy_(w)
            if layer.bias is not None:
                layer.bias.copy_(b)


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: c.id)
def test_matches_torch_over_several_steps(case: Case) -> None:
    ours, theirs = case.cls(3, **case.kwargs), case.torch_cls(3, **case.kwargs)
    _randomize_affine(ours, theirs)
    for step in range(4):
        x = torch.randn(case.shape) * 2 + 0.5 * step
        dy = torch.randn(case.shape)
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yt = ours(xo), theirs(xt)
        yo.backward(dy)
        yt.backward(dy)
        _close(yo, yt, f"output step {step}")
        _close(xo.grad, xt.grad, f"input grad step {step}")
        if case.kwargs["affine"]:
            _close(ours.weight.grad, theirs.weight.grad, "weight grad")
        if ours.bias is not None:
            _close(ours.bias.grad, theirs.bias.grad, "bias grad")
        if case.kwargs["track_running_stats"]:
            _close(ours.running_mean, theirs.running_mean, "running_mean")
            _close(ours.running_var, theirs.running_var, "running_var")
            assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == step + 1
    ours.eval()
    theirs.eval()
    x = torch.randn(case.shape)
    _close(ours(x), theirs(x), "eval output")


@pytest.mark.parametrize("case", PARITY_CASES[::3], ids=lambda c: c.id)
def test_checkpoints_cross_load_between_torch_and_bnlab(case: Case) -> None:
    theirs = case.torch_cls(3, **case.kwargs)
    _randomize_affine(theirs)
    theirs(torch.randn(case.shape))  # move the statistics off their initial values
    buf = io.BytesIO()
    torch.save(theirs.state_dict(), buf)
    buf.seek(0)
    ours = case.cls(3, **case.kwargs)
    ours.load_state_dict(torch.load(buf, weights_only=True))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.eval()
    theirs.eval()
    x = torch.randn(case.shape)
    _close(ours(x), theirs(x), "output after torch->bnlab load")
    back = case.torch_cls(3, **case.kwargs)
    back.load_state_dict(ours.state_dict())
    back.eval()
    _close(back(x), theirs(x), "output after bnlab->torch load")


@pytest.mark.parametrize("case", MODE_CASES, ids=lambda c: c.id)
class TestBattery:
    def test_float64_reference_in_training(self, case: Case) -> None:
        layer = case.cls(3, **case.kwargs).double()
        _randomize_affine(layer)
        x = (torch.randn(case.shape) * 3 + 1).double().requires_grad_()
        y = layer(x)
        mean, var = ref_stats(x)
        w = layer.weight if layer.affine else None
        b = layer.bias if layer.affine else None
        torch.testing.assert_close(y, ref_bn(x, mean, var, w, b, layer.eps), rtol=1e-10, atol=1e-10)
        dy = torch.randn(case.shape, dtype=torch.float64)
        y.backward(dy)
        dx, dgamma, dbeta = ref_bn_backward(x.detach(), dy, w, layer.eps)
        torch.testing.assert_close(x.grad, dx, rtol=1e-9, atol=1e-9)
        if layer.affine:
            torch.testing.assert_close(layer.weight.grad, dgamma, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(layer.bias.grad, dbeta, rtol=1e-9, atol=1e-9)

    def test_float32_close_to_float64_reference(self, case: Case) -> None:
        layer = case.cls(3, **case.kwargs)
        x = torch.randn(case.shape) * 5 - 2
        y = layer(x)
        mean, var = ref_stats(x)
        torch.testing.assert_close(y.double(), ref_bn(x, mean, var), rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_inputs_use_float32_statistics(self, case: Case, dtype) -> None:
        layer = case.cls(3, **case.kwargs)
        x = torch.randn(case.shape) * 4 + 3
        y = layer(x.to(dtype))
        assert y.dtype == dtype
        if layer.track_running_stats:
            assert layer.running_mean.dtype == torch.float32
            assert torch.isfinite(layer.running_var).all()
        mean, var = ref_stats(x.to(dtype))
        tol = 1e-2 if dtype == torch.float16 else 5e-2
        torch.testing.assert_close(y.double(), ref_bn(x.to(dtype), mean, var), rtol=tol, atol=tol)

    def test_noncontiguous_and_channels_last(self, case: Case) -> None:
        x = torch.randn(case.shape) * 2 + 1
        expected = case.cls(3, **case.kwargs)(x)
        # a non-contiguous view with the same values
        big = torch.randn(case.shape[0], case.shape[1] * 2, *case.shape[2:])
        big[:, ::2] = x
        view = big[:, ::2]
        assert not view.is_contiguous()
        torch.testing.assert_close(case.cls(3, **case.kwargs)(view), expected)
        if x.dim() in (4, 5):
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            xcl = x.contiguous(memory_format=fmt)
            torch.testing.assert_close(case.cls(3, **case.kwargs)(xcl), expected)

    def test_state_dict_round_trip(self, case: Case) -> None:
        a = case.cls(3, **case.kwargs)
        _randomize_affine(a)
        for _ in range(5):
            a(torch.randn(case.shape) + 1)
        buf = io.BytesIO()
        torch.save(a.state_dict(), buf)
        buf.seek(0)
        b = case.cls(3, **case.kwargs)
        b.load_state_dict(torch.load(buf, weights_only=True))
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert ka == kb
            torch.testing.assert_close(va, vb)
        # the restored layer keeps evolving exactly like the original
        x = torch.randn(case.shape)
        torch.testing.assert_close(a(x), b(x))
        a.eval()
        b.eval()
        torch.testing.assert_close(a(x), b(x))

    def test_train_differs_from_eval_and_eval_never_updates(self, case: Case) -> None:
        layer = case.cls(3, **case.kwargs)
        for _ in range(3):
            layer(torch.randn(case.shape) * 3 + 2)
        layer.eval()
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        x = torch.randn(case.shape) * 3 + 2
        y_eval = layer(x)
        layer(x)
        for k, v in layer.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed in eval mode"
        layer.train()
        y_train = layer(x)
        if layer.normalize_with == "running":
            # the seed's step 5: training normalises with the statistics from before the batch,
            # exactly what evaluation uses, and only then updates them
            torch.testing.assert_close(y_eval, y_train)
            assert not torch.equal(layer.running_mean, before["running_mean"])
        elif layer.track_running_stats:
            assert not torch.allclose(y_eval, y_train, atol=1e-3)
        else:
            torch.testing.assert_close(y_eval, y_train)

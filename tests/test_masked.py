"""MaskedBatchNorm1d against torch's BatchNorm1d applied to the valid positions alone, on
bnlab's masked operators (the default on CPU float32/float64) and on the tensor ops (forced
with ``use_backend("torch")``)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import bnlab
from bnlab.kernels import masked as KM

# the extension is built by `make setup` (tests/test_kernels.py fails when it is not)
BACKENDS = ["native", "torch"]


def _backend(name):
    return bnlab.kernels.use_backend(name)

N, C, L = 5, 3, 7


def _mask(seed: int) -> torch.Tensor:
    """A random mask with one sample of a single valid position, one of padding only, and two
    whose valid positions are a prefix (as lengths make them; the kernels take those rows
    without masks)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(N, L, generator=g) < 0.6
    mask[0] = False
    mask[0, 3] = True  # one valid position
    mask[1] = False  # padding only
    mask[2, :2] = True
    mask[2, 2] = False  # not a prefix
    mask[2, 5] = True
    mask[3] = torch.arange(L) < 4  # a prefix
    mask[4] = True  # a whole sample
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("layout", ["ncl", "nlc"])
def test_training_output_stats_and_gradient_equal_bn_on_valid_positions(seed, layout, backend):
    ours, ref = _pair(layout=layout)
    mask = _mask(seed)
    g = torch.Generator().manual_seed(100 + seed)
    x = (torch.randn(N, C, L, generator=g, dtype=torch.float64) * 3 + 2)
    x[~mask[:, None, :].expand_as(x)] = 1e3  # padding far from the data: it must not count
    gy = torch.randn(N, C, L, generator=g, dtype=torch.float64)
    xin = (x.transpose(1, 2).contiguous() if layout == "nlc" else x.clone()).requires_grad_()
    with _backend(backend):
        y = ours(xin, mask=mask)
        y_ncl = y.transpose(1, 2) if layout == "nlc" else y
        (y_ncl * gy).sum().backward()
    assert y.stride() == xin.stride()  # (N, L, C) in, (N, L, C) out
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


@pytest.mark.parametrize("layout", ["ncl", "nlc"])
def test_long_planes_and_prefix_rows_on_the_operators(layout):
    """Planes longer than the kernels' accumulation block (512), vector tails, prefix and
    scattered rows in one batch, against torch's BatchNorm1d on the valid positions."""
    n, c, length = 6, 5, 1100
    g = torch.Generator().manual_seed(11)
    lengths = torch.tensor([1100, 1037, 513, 3, 0, 700])
    mask = torch.arange(length)[None, :] < lengths[:, None]
    mask[5] = torch.rand(length, generator=g) < 0.5  # scattered
    x = 5 + 2 * torch.randn(n, c, length, generator=g, dtype=torch.float64)
    gy = torch.randn(n, c, length, generator=g, dtype=torch.float64)
    ours = bnlab.MaskedBatchNorm1d(c, layout=layout, dtype=torch.float64)
    ref = nn.BatchNorm1d(c, dtype=torch.float64)
    xin = (x.transpose(1, 2).contiguous() if layout == "nlc" else x.clone()).requires_grad_()
    with _backend("native"):
        y = ours(xin, mask=mask)
        y.backward(gy.transpose(1, 2) if layout == "nlc" else gy)
    y, dx = (y.transpose(1, 2), xin.grad.transpose(1, 2)) if layout == "nlc" else (y, xin.grad)
    xv = _gather(x, mask).requires_grad_()
    yv = ref(xv)
    yv.backward(_gather(gy, mask))
    torch.testing.assert_close(_gather(y, mask), yv, atol=1e-10, rtol=0)
    torch.testing.assert_close(_gather(dx, mask), xv.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-9, rtol=0)
    torch.testing.assert_close(ours.running_var, ref.running_var, atol=1e-12, rtol=0)
    pad = ~mask[:, None, :].expand_as(y)
    assert (y[pad] == 0).all() and (dx[pad] == 0).all()


@pytest.mark.parametrize("layout", ["ncl", "nlc"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_padding_never_leaks(backend, layout):
    ours, ref = _pair(layout=layout)
    mask = _mask(3)
    x = torch.randn(N, C, L, dtype=torch.float64)
    xp = x.clone()
    xp[~mask[:, None, :].expand_as(x)] = float("nan")
    xin = (xp.transpose(1, 2).contiguous() if layout == "nlc" else xp).requires_grad_()
    gy = torch.randn(N, C, L, dtype=torch.float64)
    gy[~mask[:, None, :].expand_as(x)] = float("inf")  # nor may an upstream gradient there
    with _backend(backend):
        y = ours(xin, mask=mask)
        y.backward(gy.transpose(1, 2) if layout == "nlc" else gy)
    y = y.transpose(1, 2) if layout == "nlc" else y
    assert torch.isfinite(y).all() and torch.isfinite(xin.grad).all()
    assert torch.isfinite(ours.weight.grad).all() and torch.isfinite(ours.bias.grad).all()
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


@pytest.mark.parametrize("kernels", BACKENDS)
def test_compile_fullgraph_one_graph_for_changing_masks(kernels):
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
        with _backend(kernels):  # (the suite may run under BNLAB_KERNELS=torch)
            y = step(x, mask=mask)
            assert torch.allclose(y, eager(x, mask=mask), atol=1e-12, rtol=0)
    assert len(graphs) == 1
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    ops = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    # the operator eager code calls, or the tensor ops
    assert any(t.startswith("bnlab.masked_forward") for t in ops) == (kernels == "native")
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
    (dict(mask=torch.ones(N, L, dtype=torch.uint8)), TypeError,
     r"mask must be a torch.bool tensor.*got torch.uint8; use mask.bool\(\)"),
    (dict(mask=[[True] * L] * N), TypeError, r"mask must be a torch.bool tensor.*got list"),
    (dict(mask=torch.ones(L, N, dtype=torch.bool)), ValueError,
     r"mask must have shape \(N, L\) = \(5, 7\), got \(7, 5\)"),
    (dict(lengths=torch.full((N,), L, device="meta")), ValueError,
     r"lengths must be on the input's device cpu, got meta"),
    (dict(lengths=torch.tensor([7, 7, 7, 7, 9])), ValueError,
     r"lengths must be in \[0, L=7\], got values in \[7, 9\]"),
    (dict(mask=torch.ones(N, L, dtype=torch.bool), lengths=torch.full((N,), L)), ValueError,
     r"mask or lengths, not both"),
    (dict(mask=torch.zeros(N, L, dtype=torch.bool)), ValueError,
     r"more than 1 valid position.*got 0"),
    (dict(lengths=torch.tensor([1, 0, 0, 0, 0])), ValueError,
     r"more than 1 valid position.*got 1"),
]


@pytest.mark.parametrize("layout", ["ncl", "nlc"])
@pytest.mark.parametrize("kw,exc,match", _ERRORS)
def test_bad_input_raises_and_leaves_state_unchanged(kw, exc, match, layout):
    bn = bnlab.MaskedBatchNorm1d(C, layout=layout)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(exc, match=match):
        bn(_X.transpose(1, 2).contiguous() if layout == "nlc" else _X, **kw)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"layout must be one of \['ncl', 'nlc'\], got 'lnc'"):
        bnlab.MaskedBatchNorm1d(C, layout="lnc")
    with pytest.raises(TypeError, match=r"process_group must be None or a torch.distributed"
                                        r".ProcessGroup, got object"):
        bnlab.MaskedBatchNorm1d(C, process_group=object())
    with pytest.raises(ValueError, match=r"mask/lengths need a 3D input"):
        bnlab.MaskedBatchNorm1d(C)(torch.randn(N, C), mask=torch.ones(N, C, dtype=torch.bool))


def test_a_process_group_without_an_initialised_group_is_the_local_layer():
    assert not dist.is_initialized()
    synced = bnlab.MaskedBatchNorm1d(C, dtype=torch.float64, process_group=dist.ProcessGroup(0, 1))
    converted = bnlab.SyncBatchNorm.convert_sync_batchnorm(bnlab.MaskedBatchNorm1d(
        C, dtype=torch.float64))  # fmt: skip
    local, _ = _pair()
    assert synced.sync and converted.sync and type(converted) is bnlab.MaskedBatchNorm1d
    for m in (synced, converted):
        m.load_state_dict(local.state_dict())
    mask = _mask(5)
    x = torch.randn(N, C, L, dtype=torch.float64)
    gy = torch.randn(N, C, L, dtype=torch.float64)
    outs = []
    for m in (local, synced, converted):
        xi = x.clone().requires_grad_()
        y = m(xi, mask=mask)
        y.backward(gy)
        outs.append((y, xi.grad, m.weight.grad, m.running_var.clone()))
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["ncl", "nlc"])
def test_float32_with_a_large_common_offset_keeps_its_digits(layout, backend):
    """float32 input of mean 1e4 and std 1e-2 (an ulp of 1e4 is 1e-3): against float64 BN on
    the same values, neither the statistics nor the output and gradients may lose digits."""
    g = torch.Generator().manual_seed(7)
    n, c, length = 16, 8, 40
    mask = torch.rand(n, length, generator=g) < 0.7
    x = 1e4 + 1e-2 * torch.randn(n, c, length, generator=g)
    gy = torch.randn(n, c, length, generator=g)
    xv = _gather(x, mask).double().requires_grad_()
    ref = nn.BatchNorm1d(c, momentum=1.0, dtype=torch.float64)
    yv = ref(xv)
    yv.backward(_gather(gy, mask).double())
    bn = bnlab.MaskedBatchNorm1d(c, layout=layout, momentum=1.0)  # running = this batch's
    xin = (x.transpose(1, 2).contiguous() if layout == "nlc" else x).requires_grad_()
    with _backend(backend):
        y = bn(xin, mask=mask)
        y.backward(gy.transpose(1, 2) if layout == "nlc" else gy)
    y, dx = (y.transpose(1, 2), xin.grad.transpose(1, 2)) if layout == "nlc" else (y, xin.grad)
    torch.testing.assert_close(_gather(y, mask).double(), yv.detach(), atol=2e-5, rtol=0)
    # dx reaches ~360 (invstd 100): float32 keeps ~1e-5 of it
    torch.testing.assert_close(_gather(dx, mask).double(), xv.grad, atol=5e-4, rtol=0)
    torch.testing.assert_close(bn.weight.grad.double(), ref.weight.grad, atol=2e-5, rtol=0)
    torch.testing.assert_close(bn.bias.grad.double(), ref.bias.grad, atol=2e-5, rtol=0)
    # (the shared running update computes 1 + m (var - 1) in float32: 1e-7 / 1e-4 = 1e-3)
    torch.testing.assert_close(bn.running_var.double(), ref.running_var, rtol=1e-3, atol=0)
    torch.testing.assert_close(bn.running_mean.double(), ref.running_mean, rtol=0, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_and_double_backward(backend):
    mask = _mask(6)
    x = torch.randn(N, C, L, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        with _backend(backend):
            return KM.train(x, mask, w, b, 1e-5)[0]

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))
    bn = bnlab.MaskedBatchNorm1d(C, dtype=torch.float64, track_running_stats=False)

    def layer(x):
        with _backend(backend):
            return bn(x, mask=mask)

    assert torch.autograd.gradcheck(layer, (x,))


def test_compiled_training_step_equals_eager_with_gradients():
    import torch._dynamo

    torch._dynamo.reset()
    eager, _ = _pair()
    compiled_layer, _ = _pair()
    step = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True)
    for seed in range(3):
        mask = _mask(30 + seed)
        x = torch.randn(N, C, L, dtype=torch.float64)
        gy = torch.randn(N, C, L, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        with _backend("native"):  # the operator and its registered formula, in a graph
            step(xa, mask=mask).backward(gy)
        eager(xb, mask=mask).backward(gy)
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(compiled_layer.weight.grad, eager.weight.grad, atol=1e-11, rtol=0)
    torch.testing.assert_close(compiled_layer.running_var, eager.running_var, atol=1e-12, rtol=0)


def test_strides_the_operators_do_not_take_run_on_the_tensor_ops():
    ours, ref = _pair(layout="nlc")
    big = torch.randn(N, 2 * L, C, dtype=torch.float64)
    x = big[:, ::2]  # a strided (N, L, C) view
    mask = _mask(8)
    y = ours(x, mask=mask)
    assert torch.allclose(_gather(y.transpose(1, 2), mask),
                          ref(_gather(x.transpose(1, 2), mask)), atol=1e-10, rtol=0)  # fmt: skip


def test_masked_operators_pass_opcheck_and_refuse_bad_tensors():
    x = torch.randn(N, C, L, dtype=torch.float64)
    mask = _mask(9)
    mean, var = torch.rand(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    w = torch.rand(C, dtype=torch.float64)
    for op, args in [
        (torch.ops.bnlab.masked_forward, (x, mask, w, None, 1e-5, True)),
        (torch.ops.bnlab.masked_forward, (x.transpose(1, 2).contiguous().transpose(1, 2), mask,
                                          None, w, 1e-5, False)),
        (torch.ops.bnlab.masked_normalize, (x, mask, mean, None, var, w, w, 1e-5)),
        (torch.ops.bnlab.masked_normalize, (x, mask, mean, 1e-9 * var, var, None, None, 1e-5)),
        (torch.ops.bnlab.masked_backward, (x, x, mask, mean, None, var, w, True)),
        (torch.ops.bnlab.masked_backward, (x, x, mask, mean, 1e-9 * var, var, None, False)),
        (torch.ops.bnlab.masked_grad_input, (x, x, mask, mean, None, var, None, mean, var)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    # the training forward's autograd formula is registered (graphs differentiate it)
    xg = x.clone().requires_grad_()
    torch.library.opcheck(torch.ops.bnlab.masked_forward, (xg, mask, w, None, 1e-5, True),
                          test_utils=("test_autograd_registration",))  # fmt: skip
    with pytest.raises(RuntimeError, match=r"masked_forward: x must be contiguous \(N, C, L\) "
                                           r"or the transpose of a contiguous \(N, L, C\)"):
        torch.ops.bnlab.masked_forward(x[:, :, ::2], mask[:, ::2].contiguous(), None, None, 1e-5,
                                       True)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"masked_forward: mask must be contiguous"):
        torch.ops.bnlab.masked_forward(x[:, :, ::2].contiguous(), mask[:, ::2], None, None, 1e-5,
                                       True)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"mask must have shape \(N, L\) = \(5, 7\)"):
        torch.ops.bnlab.masked_forward(x, mask.T.contiguous(), None, None, 1e-5, True)
    with pytest.raises(RuntimeError, match=r"mask must be a CPU bool tensor"):
        torch.ops.bnlab.masked_forward(x, mask.to(torch.uint8), None, None, 1e-5, True)

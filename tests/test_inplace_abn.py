"""In-place activated BN: BatchNormAct2d(inplace=True) keeps only its output for backward.

Reference: an eager Conv-BatchNorm2d-activation stack in float64. The in-place stack must
give the same outputs, gradients and running statistics (1e-7), save only its outputs, write
over its inputs where autograd allows, and compose with compile, fold, freeze, the state dict
of BatchNorm2d and both kernel backends. (Two gloo ranks: tests/test_sync_multiprocess.py,
case "inplace".)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab
from bnlab.kernels import inplace as inplace_mod

ACTS = {
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "elu": lambda: nn.ELU(),
    "identity": lambda: nn.Identity(),
}


def _bn_kwargs(act: str) -> dict:
    return {"act": act, "negative_slope": 0.1} if act == "leaky_relu" else {"act": act}


def stack(kind: str, act: str, c: int = 6, depth: int = 3, dtype=torch.float64, **kw):
    """Conv3x3 blocks with eager BN + activation, the fused layer or the in-place one; the BN
    weights include negative ones and the biases are non-zero (both enter the inversion)."""
    torch.manual_seed(3)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers.append(nn.Conv2d(c, c, 3, padding=1, bias=False, dtype=dtype))
        if kind == "eager":
            layers += [nn.BatchNorm2d(c, dtype=dtype, **kw), ACTS[act]()]
        else:
            layers.append(bnlab.BatchNormAct2d(c, dtype=dtype, inplace=kind == "inplace",
                                               **_bn_kwargs(act), **kw))  # fmt: skip
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            with torch.no_grad():
                m.weight.copy_((torch.rand(c, generator=g, dtype=dtype) + 0.5)
                               * torch.tensor([1.0, -1.0]).repeat(c)[:c].to(dtype))  # fmt: skip
                m.bias.copy_(torch.randn(c, generator=g, dtype=dtype))
    return model


def train_steps(model: nn.Module, x: torch.Tensor, steps: int = 3):
    """A few steps of forward + backward (no optimiser): outputs and gradients of the last."""
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        y = model(xr)
        gy = torch.sin(torch.arange(y.numel(), dtype=y.dtype)).reshape(y.shape)
        (y * gy).sum().backward()
    return y.detach(), xr.grad, [p.grad for p in model.parameters()], list(model.buffers())


def max_diff(a, b) -> float:
    pairs = [(a[0], b[0]), (a[1], b[1]), *zip(a[2], b[2], strict=True),
             *zip(a[3], b[3], strict=True)]  # fmt: skip
    return max((p.double() - q.double()).abs().max().item() for p, q in pairs)


# ------------------------------------------------------------------ equality with eager
@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_inplace_stack_equals_eager_float64(backend, act, layout):
    x = torch.randn(5, 6, 7, 7, dtype=torch.float64) * 2 + 0.5
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    with bnlab.kernels.use_backend(backend):
        ref = train_steps(stack("eager", act).to(memory_format=fmt), x.to(memory_format=fmt))
        got = train_steps(stack("inplace", act).to(memory_format=fmt), x.to(memory_format=fmt))
    assert max_diff(ref, got) < 1e-7


@pytest.mark.parametrize("running", ["ema", "cumulative", "window"])
def test_inplace_running_modes_equal_fused(running):
    kw = {"running": running, "window_size": 3} if running == "window" else {"running": running}
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    ref = train_steps(stack("fused", "leaky_relu", **kw), x, steps=4)
    got = train_steps(stack("inplace", "leaky_relu", **kw), x, steps=4)
    assert max_diff(ref, got) < 1e-9


def test_inplace_float32_rule_near_zero():
    """float32: the pre-activation the in-place layer recovers and the one eager computes are
    rounded differently; an element whose pre-activation lies within 1e-5 (relative to the
    channel's scale) of zero may take the other side of the leaky ReLU and get a gradient
    ``slope`` times the other. Those elements are left out of the elementwise comparison of
    the input gradient; everything else (and every parameter gradient, relative) agrees to
    1e-4."""
    torch.manual_seed(0)
    x = torch.randn(8, 6, 9, 9)
    eager = stack("eager", "leaky_relu", dtype=torch.float32)
    inpl = stack("inplace", "leaky_relu", dtype=torch.float32)
    ref, got = train_steps(eager, x, 1), train_steps(inpl, x, 1)
    # the first block's pre-activation, from eager (the same weights in both stacks)
    with torch.no_grad():
        bn = eager[1]
        z = nn.functional.batch_norm(eager[0](x), None, None, bn.weight, bn.bias, True)
    near = (z.abs() < 1e-5 * z.abs().amax(dim=(0, 2, 3), keepdim=True))
    assert torch.allclose(ref[0], got[0], atol=1e-5)
    scale = ref[1].abs().max()
    assert ((ref[1] - got[1]).abs() / scale)[~near].max() < 1e-4
    for a, b in zip(ref[2], got[2], strict=True):
        assert ((a - b).abs().max() / a.abs().max()) < 1e-4
    for a, b in zip(ref[3], got[3], strict=True):
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ memory
def _saved_storages(fn) -> tuple[dict[int, int], torch.Tensor]:
    """``({storage pointer: bytes} saved for backward by fn(), fn())``."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return seen, out


def test_inplace_saves_only_its_output_and_overwrites_its_input():
    layer = bnlab.BatchNormAct2d(4, act="leaky_relu", inplace=True)
    x0 = torch.randn(3, 4, 6, 6, requires_grad=True)
    h = x0 * 2.0  # a non-leaf: autograd allows writing over it
    ptr = h.data_ptr()
    own = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen, y = _saved_storages(lambda: layer(h))
    assert y.data_ptr() == ptr  # written over its input
    acts = {p: n for p, n in seen.items() if p not in own}
    # and only that tensor is kept, besides C values (the inverse standard deviation)
    assert y.untyped_storage().data_ptr() in acts
    others = [n for p, n in acts.items() if p != y.untyped_storage().data_ptr()]
    assert others == [layer.num_features * 4]
    y.sum().backward()
    assert x0.grad is not None and torch.isfinite(x0.grad).all()


def test_fused_saves_its_input_not_its_output():
    layer = bnlab.BatchNormAct2d(4, act="leaky_relu")
    h = torch.randn(3, 4, 6, 6, requires_grad=True) * 2.0
    seen, y = _saved_storages(lambda: layer(h))
    assert h.untyped_storage().data_ptr() in seen
    assert y.untyped_storage().data_ptr() not in seen


@pytest.mark.parametrize("what", ["leaf", "view"])
def test_no_overwrite_where_autograd_forbids(what):
    layer = bnlab.BatchNormAct2d(4, act="leaky_relu", inplace=True)
    base = torch.randn(3, 4 if what == "leaf" else 8, 5, 5, requires_grad=what == "leaf")
    x = base if what == "leaf" else base[:, :4]
    before = x.detach().clone()
    y = layer(x)
    assert y.data_ptr() != x.data_ptr()
    assert torch.equal(x.detach(), before)
    if what == "leaf":
        y.sum().backward()
        assert base.grad is not None


def test_overwriting_a_saved_tensor_raises_in_backward():
    """As ReLU(inplace=True): overwriting a tensor another op saved is an autograd error."""
    model = nn.Sequential(nn.Sigmoid(), bnlab.BatchNormAct2d(4, act="leaky_relu", inplace=True))
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(x).sum().backward()


def _activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages saved for backward, parameters and buffers left out
    (as bench/bench_fused_memory.py counts them)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    return sum(v for k, v in seen.items() if k not in own)


def test_stack_saved_bytes_at_most_40_percent_of_eager():
    """8 Conv3x3-BN-LeakyReLU blocks: the in-place layer saves <= 0.40x of eager (the network
    count: each convolution saves its input, the previous block's output)."""
    x = torch.randn(4, 16, 8, 8, dtype=torch.float32)
    eager = _activation_bytes(stack("eager", "leaky_relu", c=16, depth=8,
                                    dtype=torch.float32), x)  # fmt: skip
    fused = _activation_bytes(stack("fused", "leaky_relu", c=16, depth=8,
                                    dtype=torch.float32), x)  # fmt: skip
    inpl = _activation_bytes(stack("inplace", "leaky_relu", c=16, depth=8,
                                   dtype=torch.float32), x)  # fmt: skip
    assert inpl <= 0.40 * eager < fused, (inpl, fused, eager)


# ------------------------------------------------------------------ weights near zero
def test_zero_weight_falls_back_to_saving_the_input_with_exact_gradients():
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    models = {k: stack(k, "leaky_relu") for k in ("eager", "inplace")}
    for m in models.values():
        bns = [b for b in m if isinstance(b, nn.BatchNorm2d)]
        with torch.no_grad():
            bns[0].weight[2] = 0.0  # a zero-initialised channel (e.g. a residual branch)
            bns[1].weight[0] = 1e-4  # and one below MIN_WEIGHT
    ref = train_steps(models["eager"], x)
    got = train_steps(models["inplace"], x)
    assert max_diff(ref, got) < 1e-7
    assert ref[2][1][2] != 0  # the zero weight's gradient is not lost
    layer = models["inplace"][1]
    h = torch.randn(4, 6, 5, 5, dtype=torch.float64, requires_grad=True) * 1.0
    seen, y = _saved_storages(lambda: layer(h))
    assert h.untyped_storage().data_ptr() in seen  # this call kept its input
    assert inplace_mod.MIN_WEIGHT == 1e-3


# ------------------------------------------------------------------ arguments
def test_relu_inplace_refused_with_advice():
    with pytest.raises(ValueError, match="ReLU.*cannot be recovered.*leaky_relu"):
        bnlab.BatchNormAct2d(4, act="relu", inplace=True)


@pytest.mark.parametrize("slope", [0.0, -0.1, float("nan")])
def test_leaky_slope_must_be_positive_inplace(slope):
    with pytest.raises(ValueError, match="negative_slope > 0"):
        bnlab.BatchNormAct2d(4, act="leaky_relu", negative_slope=slope, inplace=True)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="normalize_with"):
        bnlab.BatchNormAct2d(4, act="leaky_relu", inplace=True, normalize_with="running")
    with pytest.raises(TypeError, match="inplace must be a bool"):
        bnlab.BatchNormAct2d(4, act="leaky_relu", inplace="yes")
    with pytest.raises(ValueError, match="alpha must be a positive"):
        bnlab.BatchNormAct2d(4, act="elu", alpha=0.0)


def test_double_backward_refused():
    layer = bnlab.BatchNormAct2d(4, act="leaky_relu", inplace=True).double()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    y = layer(x * 1.0)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((y**2).sum(), x, create_graph=True)


def test_retain_graph_backward_twice_is_the_same():
    layer = bnlab.BatchNormAct2d(4, act="leaky_relu", inplace=True).double()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    y = layer(x * 1.0)
    g1 = torch.autograd.grad(y.sum() + (y**2).sum(), x, retain_graph=True)[0]
    g2 = torch.autograd.grad(y.sum() + (y**2).sum(), x)[0]
    assert torch.equal(g1, g2)


# ------------------------------------------------------------------ composition
def test_state_dict_is_batchnorm2d_and_repr():
    layer = bnlab.BatchNormAct2d(5, act="leaky_relu", inplace=True)
    torch_bn = nn.BatchNorm2d(5)
    assert layer.state_dict().keys() == torch_bn.state_dict().keys()
    layer.load_state_dict(torch_bn.state_dict())
    assert isinstance(layer, nn.modules.batchnorm._BatchNorm)
    assert "inplace=True" in repr(layer)


def test_compile_fullgraph_equals_eager():
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    eager_model = stack("inplace", "leaky_relu")
    compiled_model = stack("inplace", "leaky_relu")
    explain = torch._dynamo.explain(stack("inplace", "leaky_relu"))(x.clone())
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    ref = train_steps(eager_model, x)
    got = train_steps(compiled, x)
    assert max_diff(ref, got) < 1e-10


def test_fold_and_freeze_in_eval():
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    for act in ("identity", "leaky_relu", "elu"):
        model = stack("inplace", act)
        train_steps(model, x)
        model.eval()
        with torch.no_grad():
            ref = model(x)
            frozen = bnlab.freeze(model)
            want = "FrozenBatchNorm2d" if act == "identity" else "FrozenBatchNormAct2d"
            assert type(frozen[1]).__name__ == want
            assert frozen[1]._activation()[0] == act
            if act != "identity":
                assert frozen[1]._activation() == model[1]._activation()
            assert torch.allclose(frozen(x), ref, atol=1e-12)
            folded = bnlab.tools.fold(model, x, warn=False)
            assert torch.allclose(folded(x), ref, atol=1e-10)
            report = folded.fold_report.summary()
        n_bn = sum(isinstance(m, bnlab.BatchNormAct2d) for m in folded.modules())
        if act == "identity":
            assert n_bn == 0  # folded into the convolutions
        else:
            assert n_bn == 3 and act in report  # left, and the report says why


def test_models_train_with_inplace_leaky_resnet():
    from bnlab.lab.models import small_resnet

    model = small_resnet(act="leaky_relu", bn_act="inplace")
    n_inplace = sum(getattr(m, "inplace", False) for m in model.modules()
                    if isinstance(m, bnlab.BatchNormAct2d))  # fmt: skip
    assert n_inplace > 0
    x = torch.randn(4, 1, 28, 28)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------ the kernel
@pytest.mark.skipif(not bnlab.kernels.native_available(), reason="native kernels not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(8, 16, 2, 2), (4, 5, 3, 3), (6, 3, 1, 1), (3, 40, 17, 9),
                                   (7, 9, 11), (3, 8, 16, 17)])  # fmt: skip
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("act", ["leaky_relu", "identity"])
def test_native_backward_from_output_equals_tensor_ops(dtype, shape, layout, act):
    """Every layout path of the C backward (planes, runs of short planes, rows, tiles, channel
    by channel) with ACT_INV_LEAKY equals the tensor-op version of the same formula."""
    from bnlab.kernels import _ops

    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g, dtype=dtype) * 3 + 1
    if layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w = (torch.rand(c, generator=g, dtype=dtype) + 0.2) * (1 - 2 * (torch.arange(c) % 2)).to(dtype)
    b = torch.randn(c, generator=g, dtype=dtype)
    y, _, _, invstd, _, _ = _ops.native_train_forward(x, w, b, 1e-5, act, 0.2)
    dy = torch.randn(y.shape, generator=g, dtype=dtype)
    got = _ops.native_backward_from_output(dy, y, invstd, w, b, act, 0.2, True)
    ref = _ops.torch_backward_from_output(dy, y, invstd, w, b, act, 0.2, True)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    for a, r in zip(got, ref, strict=True):
        assert ((a - r).abs().max() / r.abs().max().clamp_min(1)) < tol


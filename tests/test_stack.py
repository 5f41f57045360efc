"""bnlab in the stack users run: torch.compile, torch.export, ONNX, torch.func, torch.fx,
in-place ops after a BN output, and bad input refused the same way on every backend.

Compiled tests use the ``aot_eager`` backend (dynamo + AOT autograd: the graph capture,
the custom ops' fake and autograd formulas, the partitioner) except one that runs inductor,
the default backend, end to end.
"""

from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn

import bnlab
from bnlab import functional as F

LAYERS = {
    "BatchNorm1d": lambda c: bnlab.BatchNorm1d(c),
    "BatchNorm3d": lambda c: bnlab.BatchNorm3d(c),
    "BatchNorm2d": lambda c: bnlab.BatchNorm2d(c),
    "BatchNorm2d(cumulative)": lambda c: bnlab.BatchNorm2d(c, running="cumulative"),
    "BatchNorm2d(momentum=None)": lambda c: bnlab.BatchNorm2d(c, momentum=None),
    "BatchNorm2d(window)": lambda c: bnlab.BatchNorm2d(c, running="window", window_size=3),
    "BatchNorm2d(running)": lambda c: bnlab.BatchNorm2d(c, normalize_with="running"),
    "BatchNorm2d(window, running)": lambda c: bnlab.BatchNorm2d(
        c, running="window", window_size=2, normalize_with="running"
    ),
    "BatchNorm2d(cumulative, running)": lambda c: bnlab.BatchNorm2d(
        c, running="cumulative", normalize_with="running"
    ),
    "BatchNormAct2d(relu)": lambda c: bnlab.BatchNormAct2d(c, act="relu"),
    "BatchNormAct2d(leaky_relu)": lambda c: bnlab.BatchNormAct2d(c, act="leaky_relu"),
    "BatchNormAct2d(identity)": lambda c: bnlab.BatchNormAct2d(c, act="identity"),
    "BatchRenorm2d": lambda c: bnlab.BatchRenorm2d(c, warmup_steps=1, relax_steps=2),
    "GhostBatchNorm2d": lambda c: bnlab.GhostBatchNorm2d(c, virtual_batch_size=4),
    "FrozenBatchNorm2d": lambda c: bnlab.FrozenBatchNorm2d(c),
    "SyncBatchNorm": lambda c: bnlab.SyncBatchNorm(c),
}


def _net(name: str, dtype=torch.float64) -> nn.Module:
    norm = LAYERS[name]
    if name == "BatchNorm1d":
        body = [nn.Conv1d(3, 8, 3), norm(8), nn.ReLU(), nn.Conv1d(8, 16, 3), norm(16)]
    elif name == "BatchNorm3d":
        body = [nn.Conv3d(3, 8, 3), norm(8), nn.ReLU(), nn.Conv3d(8, 16, 3), norm(16)]
    else:
        body = [nn.Conv2d(3, 8, 3), norm(8), nn.ReLU(), nn.Conv2d(8, 16, 3), norm(16)]
    net = nn.Sequential(*body, nn.Flatten(), nn.LazyLinear(5))
    net(_input(name, dtype=torch.float32))  # materialise the lazy layer
    for m in net.modules():
        if isinstance(m, bnlab.FrozenBatchNorm2d):  # a frozen layer with real statistics
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.to(dtype)


def _input(name: str, n: int = 8, dtype=torch.float64) -> torch.Tensor:
    shape = {"BatchNorm1d": (n, 3, 10), "BatchNorm3d": (n, 3, 5, 5, 5)}.get(name, (n, 3, 8, 8))
    return torch.randn(shape, dtype=dtype)


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name", list(LAYERS))
def test_compiled_training_equals_eager(name):
    dynamo.reset()
    eager = _net(name)
    compiled_net = copy.deepcopy(eager)
    before = _state(eager)
    compiled = torch.compile(compiled_net, fullgraph=True, backend="aot_eager")
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    opt_c = torch.optim.SGD(compiled_net.parameters(), lr=0.05)
    for _ in range(5):
        x = _input(name)
        for model, opt in ((eager, opt_e), (compiled, opt_c)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    want, got = _state(eager), _state(compiled_net)
    assert want.keys() == got.keys()
    for key in want:
        if key.endswith("num_batches_tracked"):
            assert torch.equal(got[key], want[key]), key
            assert int(got[key]) == int(before[key]) + (0 if "Frozen" in name else 5), key
        else:
            torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12, msg=key)
    eager.eval()
    compiled_net.eval()
    x = _input(name)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(LAYERS))
def test_no_graph_breaks_in_training_and_evaluation(name):
    dynamo.reset()
    net = _net(name, torch.float32)
    for mode in (True, False):
        net.train(mode)
        explained = dynamo.explain(net)(_input(name, dtype=torch.float32))
        assert explained.graph_break_count == 0, (mode, explained.break_reasons)
        assert explained.graph_count == 1


def test_compiled_graphs_take_torchs_kernels_unless_native_is_forced():
    """By default a compiled bnlab layer is torch's own BN in the graph (inductor fuses it with
    its neighbours, as it does torch's); ``use_backend("native")`` puts bnlab's operator there."""
    dynamo.reset()
    seen = []

    def capture(gm, example_inputs):
        seen.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    for name in ("BatchNorm2d", "BatchNormAct2d(relu)"):
        net = _net(name, torch.float32)
        torch.compile(net, backend=capture, fullgraph=True)(_input("x", dtype=torch.float32))
        assert not any("bnlab.train_forward" in t for t in seen[-1]), seen[-1]
        assert any("native_batch_norm" in t for t in seen[-1]), seen[-1]
        if bnlab.kernels.native_available():
            dynamo.reset()
            with bnlab.kernels.use_backend("native"):
                torch.compile(net, backend=capture, fullgraph=True)(
                    _input("x", dtype=torch.float32))
            assert any("bnlab.train_forward" in t for t in seen[-1]), seen[-1]


def test_compiled_under_the_native_backend_takes_the_operator_and_guards_the_choice():
    """``use_backend("native")`` around a compiled model's calls gives a graph of bnlab's
    operators with eager's numbers; leaving the block recompiles to torch's kernels instead of
    reusing that graph, and re-entering it reuses the first graph."""
    if not bnlab.kernels.native_available():
        pytest.skip("native kernels not built")
    dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), bnlab.BatchNorm2d(8), nn.ReLU())
    ref = copy.deepcopy(net)
    compiled = torch.compile(net, backend=capture, fullgraph=True)
    x = torch.randn(4, 3, 10, 10)
    with bnlab.kernels.use_backend("native"):
        y = compiled(x)
        y.sum().backward()
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net[1].running_var, ref[1].running_var, rtol=1e-6, atol=1e-7)
    assert len(graphs) == 1 and any("bnlab.train_forward" in t for t in graphs[0]), graphs
    compiled(x)
    with bnlab.kernels.use_backend("native"):
        compiled(x)
    assert len(graphs) == 2 and not any("bnlab.train_forward" in t for t in graphs[1]), graphs


def _graphs_for_channel_change(make) -> int:
    dynamo.reset()
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(m, x):
        return m(x).sum()

    fn = torch.compile(step, backend=count)
    for c in (32, 64, 32, 64):
        m = make(c)
        fn(m, torch.randn(4, c, 5, 5)).backward()
    return len(graphs)


def test_channel_change_recompiles_no_more_than_torch():
    torch_graphs = _graphs_for_channel_change(nn.BatchNorm2d)
    for make in (bnlab.BatchNorm2d, lambda c: bnlab.BatchNorm2d(c, running="window",
                                                               window_size=3)):  # fmt: skip
        assert _graphs_for_channel_change(make) <= torch_graphs


@pytest.mark.slow
def test_inductor_trains_and_matches_eager():
    """The default backend (inductor) end to end, with the native op inside."""
    dynamo.reset()
    eager = nn.Sequential(
        nn.Conv2d(3, 8, 3), bnlab.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3), bnlab.BatchNormAct2d(8, act="leaky_relu"),
    )  # fmt: skip
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net, fullgraph=True)
    for _ in range(3):
        x = torch.randn(8, 3, 10, 10)
        g = torch.randn(8, 8, 6, 6)
        ye, yc = eager(x), compiled(x)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
        ye.backward(g)
        yc.backward(g)
    for pe, pc in zip(eager.parameters(), compiled_net.parameters(), strict=True):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_state(compiled_net), _state(eager), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- in-place after BN
@pytest.mark.parametrize("name", [n for n in LAYERS if n not in ("BatchNorm1d", "BatchNorm3d")])
@pytest.mark.parametrize("training", [True, False])
def test_inplace_ops_after_the_output(name, training):
    norm = LAYERS[name]
    conv = nn.Conv2d(3, 64, 3, padding=1)
    net = nn.Sequential(conv, norm(64), nn.ReLU(inplace=True)).train(training)
    x = torch.randn(16, 3, 32, 32)  # outputs of 4 MiB: the kernels' huge-page buffers
    net(x).sum().backward()
    bn = norm(64).train(training)
    residual = torch.randn(16, 64, 32, 32)
    h = conv(x)
    y = bn(h)
    y += residual
    y.relu_().sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


def test_native_outputs_are_not_views():
    x = torch.randn(16, 64, 32, 32)
    for layer in (bnlab.BatchNorm2d(64), bnlab.BatchNorm2d(64).eval()):
        y = layer(x)
        assert y._base is None


# ------------------------------------------------------------------------- export and ONNX
def _conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), bnlab.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3), bnlab.BatchNormAct2d(8, act="leaky_relu"),
                         nn.Conv2d(8, 4, 3), bnlab.BatchNorm2d(4, running="window",
                                                               window_size=2))  # fmt: skip


@pytest.mark.parametrize("training", [True, False])
def test_torch_export(training):
    net = _conv_net().train(training)
    x = torch.randn(4, 3, 10, 10)
    reference = copy.deepcopy(net)
    exported = torch.export.export(copy.deepcopy(net), (x,))
    torch.testing.assert_close(exported.module()(x), reference(x), rtol=1e-5, atol=1e-5)
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("batch_norm" in t for t in targets), targets  # torch's kernels by default
    if training and bnlab.kernels.native_available():
        with bnlab.kernels.use_backend("native"):
            exported = torch.export.export(copy.deepcopy(reference), (x,))
        targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
        assert any("bnlab.train_forward" in t for t in targets), targets


def test_onnx_export_has_batch_normalization_nodes_or_folds_them(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    # BN after a convolution is folded into it by the exporter; BN after a ReLU cannot be
    # folded and must appear as BatchNormalization, never as a Sub/Mul/Add decomposition
    net = nn.Sequential(_conv_net(), nn.ReLU(), bnlab.BatchNorm2d(4))
    for _ in range(3):  # non-trivial statistics
        net.train()(torch.randn(8, 3, 10, 10))
    net.eval()
    x = torch.randn(4, 3, 10, 10)
    path = tmp_path / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), dynamo=True)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("BatchNormalization") == 1, ops
    assert set(ops) <= {"Conv", "Relu", "LeakyRelu", "BatchNormalization"}, ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), net(x).detach(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- torch.func and fx
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("make", [lambda: bnlab.BatchNorm2d(6),
                                  lambda: bnlab.BatchNormAct2d(6, act="leaky_relu"),
                                  lambda: bnlab.BatchNorm2d(6, running="window", window_size=2)])
def test_vmapped_ensemble_equals_models_one_by_one(training, make):
    from torch.func import functional_call, stack_module_state

    models = [nn.Sequential(nn.Conv2d(3, 6, 3), make()).train(training) for _ in range(3)]
    for m in models:  # different running statistics per member
        m.train()(torch.randn(8, 3, 7, 7) * (1 + torch.rand(1)))
        m.train(training)
    copies = copy.deepcopy(models)
    params, buffers = stack_module_state(copies)
    base = copy.deepcopy(copies[0]).to("meta")

    def run(p, b, x):
        return functional_call(base, (p, b), (x,))

    x = torch.randn(3, 8, 3, 7, 7)
    got = torch.vmap(run)(params, buffers, x)
    for i, m in enumerate(models):
        want = m(x[i])
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
        for key, value in m.state_dict().items():
            torch.testing.assert_close(buffers[key][i] if key in buffers else value, value,
                                       rtol=1e-5, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "identity"])
@pytest.mark.parametrize("stats", [True, False])
def test_jvp_through_batchnormact(act, stats):
    import torch.autograd.forward_ad as fwAD
    from torch.func import jvp

    acts = {"relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(), "identity": nn.Identity()}
    layer = bnlab.BatchNormAct2d(4, act=act, track_running_stats=stats).double()
    ref = nn.Sequential(nn.BatchNorm2d(4, track_running_stats=stats), acts[act]).double()
    shape = (6, 4, 3, 3)
    x, t = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    ref.train()(x * 3 + 1)
    layer.train()(x * 3 + 1)
    for training in (True, False):
        layer.train(training)
        ref.train(training)
        if training and stats:
            # torch.func forbids mutating captured buffers (torch's BN alike): forward-mode
            # AD itself, with the running statistics updated as in eager
            with fwAD.dual_level():
                y, dy = fwAD.unpack_dual(layer(fwAD.make_dual(x, t)))
                y_ref, dy_ref = fwAD.unpack_dual(ref(fwAD.make_dual(x, t)))
            torch.testing.assert_close(layer.running_var, ref[0].running_var)
        else:
            y, dy = jvp(layer, (x,), (t,))
            y_ref, dy_ref = jvp(ref, (x,), (t,))
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(dy, dy_ref)


def test_fx_symbolic_trace_and_conv_bn_fusion():
    from torch.fx.experimental.optimization import fuse

    net = nn.Sequential(nn.Conv2d(3, 8, 3), bnlab.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                        nn.Conv2d(8, 4, 3), bnlab.BatchNormAct2d(4))  # fmt: skip
    for _ in range(3):
        net.train()(torch.randn(8, 3, 10, 10))
    net.eval()
    x = torch.randn(4, 3, 10, 10)
    traced = torch.fx.symbolic_trace(net)
    torch.testing.assert_close(traced(x), net(x))
    calls = [str(n.target) for n in traced.graph.nodes if n.op == "call_function"]
    assert sum("batch_norm" in c for c in calls) == 2  # the bnlab layers: one torch op each
    fused = fuse(net)
    torch.testing.assert_close(fused(x), net(x), rtol=1e-5, atol=1e-5)
    kinds = [type(m) for m in fused.modules()]
    assert nn.BatchNorm2d not in kinds  # torch's pair was folded into its convolution
    folded = bnlab.tools.fold(net, warn=False)  # bnlab's own pass folds the plain BN layers
    assert not any(isinstance(m, bnlab.BatchNorm2d) for m in folded.modules())
    assert [b for b, *_ in folded.fold_report.folded] == ["1", "4"]
    assert "applies relu" in str(folded.fold_report.not_folded)  # the fused ReLU is kept
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)


def test_fx_trace_of_a_training_layer_is_refused_clearly():
    with pytest.raises(NotImplementedError, match="model.eval"):
        torch.fx.symbolic_trace(nn.Sequential(bnlab.BatchNorm2d(3)).train())


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("eps", [-1e-5, 0.0, float("nan"), float("inf")])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_bad_eps_refused_the_same_way_everywhere(eps, backend):
    if backend == "native" and not bnlab.kernels.native_available():
        pytest.skip("native kernels not built")
    x, mean, var = torch.randn(4, 3, 5, 5), torch.zeros(3), torch.ones(3)
    with bnlab.kernels.use_backend(backend):
        for call in (
            lambda: F.normalize(x, mean, var, None, None, eps),
            lambda: F.batch_norm_train(x, None, None, eps),
            lambda: F.batch_norm(x, mean, var, training=True, eps=eps),
            lambda: bnlab.BatchNorm2d(3, eps=eps),
        ):
            with pytest.raises(ValueError, match="eps must be a positive finite float"):
                call()


def test_huge_window_refused_quickly_with_the_memory_it_needs():
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"window_size=1000000000 needs 256,000,000,000 bytes"):
        bnlab.BatchNorm2d(32, running="window", window_size=10**9)
    assert time.perf_counter() - start < 0.5


@pytest.mark.skipif(not bnlab.kernels.native_available(), reason="native kernels not built")
@pytest.mark.skipif(not bnlab.kernels.native_available(), reason="native kernels not built")
def test_every_native_entry_point_rejects_wrong_shapes_and_dtypes():
    """Each C++ operator checks its tensors at the entry: an exception naming the argument,
    never a read out of bounds. (Meta tensors are not refused: they dispatch to the fake
    implementations, which compile and export trace with.)"""
    ops = torch.ops.bnlab
    x = torch.randn(4, 3, 5, 5)
    xb = x.bfloat16()
    c3, c4 = torch.ones(3), torch.ones(4)
    nbt = torch.tensor(0)
    cases = [
        (lambda: ops.train_forward(x.double(), c3, c3, 1e-5, 0, 0.0),
         "weight must have x's dtype \\(Double\\), got Float"),
        (lambda: ops.train_forward(x, c4, c3, 1e-5, 0, 0.0), "weight must have C=3 values"),
        (lambda: ops.train_forward(x[:, :, ::2], c3, c3, 1e-5, 0, 0.0),
         "contiguous or channels-last"),
        (lambda: ops.train_forward(x.int(), None, None, 1e-5, 0, 0.0),
         "x must be float32, float64 or bfloat16, got Int"),
        # bfloat16 activations beside float32 (C,) tensors: the identity in training, the
        # saved statistics and no gradient into them in backward
        (lambda: ops.train_forward(xb, c3.double(), c3, 1e-5, 0, 0.0),
         "weight must be float32 beside a bfloat16 x, got Double"),
        (lambda: ops.train_forward(xb, xb[0, :, 0, 0], c3, 1e-5, 0, 0.0),
         "weight must be float32 beside a bfloat16 x, got BFloat16"),
        (lambda: ops.train_forward(xb, c3, c3, 1e-5, 1, 0.0),
         "a bfloat16 x trains with the identity only"),
        (lambda: ops.backward(xb, xb, c3, c3, None, None, c3, None, None, None, 1e-5, 1, 0.0,
                              True, True), "a bfloat16 x takes the identity only"),
        (lambda: ops.backward(xb, xb, None, None, None, None, c3, None, None, None, 1e-5, 0,
                              0.0, True, True), "a bfloat16 x needs the saved mean and invstd"),
        (lambda: ops.backward(xb, xb, c3, c3, None, None, c3, None, c3, None, 1e-5, 0, 0.0,
                              True, True), "a bfloat16 x takes no gradient of the statistics"),
        (lambda: ops.backward(x, xb, c3, c3, None, None, c3, None, None, None, 1e-5, 0, 0.0,
                              True, True), "dy must be a CPU tensor of x's dtype"),
        (lambda: ops.eval_forward(xb, c3, c3.bfloat16(), None, None, 0, 0.0, 1e-5),
         "var must be float32 beside a bfloat16 x"),
        (lambda: ops.train_forward(x[:0], None, None, 1e-5, 0, 0.0), "at least one value"),
        (lambda: ops.train_forward(x, None, None, -1.0, 0, 0.0), "eps must be a positive"),
        (lambda: ops.train_forward(x, None, None, 1e-5, 7, 0.0), "act code must be in 0..2"),
        (lambda: ops.train_forward_update(x, None, None, c3, None, 0.1, 1.0, 1e-5, 0, 0.0, None),
         "go together"),
        (lambda: ops.train_forward_update(x, None, None, torch.ones(3, 2)[:, 0], c3, 0.1, 1.0,
                                          1e-5, 0, 0.0, None), "running_mean must be contiguous"),
        (lambda: ops.train_forward_update(x, None, None, None, None, 0.1, 1.0, 1e-5, 0, 0.0,
                                          x[:2]), "out must have x's shape"),
        (lambda: ops.eval_forward(x, c4, c3, None, None, 0, 0.0, 1e-5), "mean must have C=3"),
        (lambda: ops.eval_forward(x, c3, c3.double(), None, None, 0, 0.0, -1.0),
         "invstd must have x's dtype"),
        (lambda: ops.backward(x[:2], x, c3, c3, None, None, None, None, None, None, 1e-5, 0,
                              0.0, True, True), "dy must have x's shape"),
        (lambda: ops.backward(x, x, c4, c3, None, None, None, None, None, None, 1e-5, 0, 0.0,
                              True, True), "mean must have C=3"),
        (lambda: ops.backward(x, x, c3, None, None, None, None, None, None, None, 1e-5, 0, 0.0,
                              True, True), "mean and invstd go together"),
        (lambda: ops.backward(x, x, c3, c3, None, None, c3.double(), None, None, None, 1e-5, 1,
                              0.0, False, True), "weight must have x's dtype"),
        (lambda: ops.running_update_(c3, c4, nbt, c3, c3, 0.1, 1.0, 1e-5),
         "running_var must have 3 values"),
        (lambda: ops.running_update_(c3, c3, torch.tensor(0.0), c3, c3, 0.1, 1.0, 1e-5),
         "num_batches_tracked must be a CPU int64"),
        (lambda: ops.running_update_(c3, c3, nbt, c3.double(), c3, 0.1, 1.0, 1e-5),
         "mean must have running_mean's dtype"),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
    assert int(nbt) == 0  # refused calls change nothing


@pytest.mark.parametrize("fused", [False, True])
def test_a_bfloat16_model_runs_on_torchs_kernels_like_torch(fused):
    # parameters and buffers in bfloat16 (model.bfloat16()): torch's kernel needs running
    # buffers of the parameters' dtype, and the result equals torch's own bf16 BN
    ours = (bnlab.BatchNormAct2d(4) if fused else bnlab.BatchNorm2d(4)).bfloat16()
    ref = nn.BatchNorm2d(4).bfloat16()
    x = torch.randn(8, 4, 3, 3).bfloat16().requires_grad_()
    y = ours(x)
    want = ref(x).relu() if fused else ref(x)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_input_to_a_float32_layer_takes_the_one_step_like_torch(dtype):
    # the autocast case (float32 layer, bf16/fp16 activations, channels-last): the layer's step
    # is torch's kernel plus the guarded running update in one operator, as for float32 inputs
    # (it used to take the generic path: a batch_norm call and several tensor ops more), and
    # its numbers are torch's own
    torch.manual_seed(0)
    ours, ref = bnlab.BatchNorm2d(4), nn.BatchNorm2d(4)
    x = (torch.randn(8, 4, 5, 5) * 3 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    assert ours._step(x.detach()) is not None  # the one-call step, not the generic fallback
    ours.load_state_dict(ref.state_dict())
    for _ in range(3):
        xs = x.detach().requires_grad_()
        xr = x.detach().requires_grad_()
        y, want = ours(xs), ref(xr)
        assert y.dtype == dtype
        torch.testing.assert_close(y, want, rtol=0, atol=0)
        g = torch.randn_like(y)
        y.backward(g)
        want.backward(g)
        torch.testing.assert_close(xs.grad, xr.grad, rtol=0, atol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=1e-6, atol=1e-7)
    assert ours.running_mean.dtype == torch.float32
    # a NaN batch leaves the statistics as they were (torch's layer would absorb it)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    bad = x.detach().clone()
    bad[0, 1, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        ours(bad)
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)


def test_the_step_reads_the_tensors_the_module_holds_now():
    # the step reads weight, bias and the buffers from the module's dicts (faster than
    # attribute access): a reassigned parameter, buffers replaced by .double(), a
    # functional_call's substitutes and a frozen layer's buffer-held weight must all be seen
    torch.manual_seed(0)
    ours, ref = bnlab.BatchNorm1d(5), nn.BatchNorm1d(5)
    x = torch.randn(7, 5)
    new_w = nn.Parameter(torch.rand(5) + 0.5)
    ours.weight, ref.weight = new_w, nn.Parameter(new_w.detach().clone())
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)
    ours.double(), ref.double()
    xd = x.double()
    torch.testing.assert_close(ours(xd), ref(xd), rtol=0, atol=1e-12)
    # (the first step ran in float32: its update reaches torch's within float32 rounding)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=0, atol=1e-6)
    subs = {"weight": torch.full((5,), 2.0, dtype=torch.float64),
            "bias": torch.full((5,), -1.0, dtype=torch.float64)}
    got = torch.func.functional_call(ours, subs, (xd,))
    want = torch.func.functional_call(ref, subs, (xd,))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # a frozen layer holds weight and bias as buffers: the step's fallback reads them
    frozen = bnlab.FrozenBatchNorm2d(3)
    with torch.no_grad():
        frozen.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        frozen.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
    assert "weight" in frozen._buffers
    xi = torch.randn(2, 3, 4, 4)
    want = nn.functional.batch_norm(xi, frozen.running_mean, frozen.running_var, frozen.weight,
                                    frozen.bias, training=False, eps=frozen.eps)
    torch.testing.assert_close(frozen(xi), want, rtol=0, atol=1e-6)


def test_a_compiled_layer_does_not_recompile_when_another_environment_variable_changes(
        monkeypatch):
    # the backend choice reads BNLAB_KERNELS; under dynamo that read must guard on that one
    # variable, not on the whole environment (any os.environ write would recompile)
    from torch._dynamo.testing import CompileCounter

    dynamo.reset()
    cnt = CompileCounter()
    layer = torch.compile(bnlab.BatchNorm1d(6), backend=cnt, fullgraph=True)
    x = torch.randn(9, 6)
    layer(x)
    monkeypatch.setenv("BNLAB_TEST_UNRELATED_VARIABLE", "1")
    layer(x)
    monkeypatch.setenv("BNLAB_TEST_UNRELATED_VARIABLE", "2")
    layer(x)
    assert cnt.frame_count == 1


def test_a_fresh_process_compiles_a_bnlab_model_once():
    # the first read of BNLAB_KERNELS used to happen inside the trace; its cache assignment
    # replayed after the graph and failed the guard on the old value: every compiled model
    # compiled twice in a process that had not run a bnlab layer eagerly before
    import subprocess
    import sys

    code = (
        "import torch, bnlab\n"
        "from torch._dynamo.testing import CompileCounter\n"
        "cnt = CompileCounter()\n"
        "m = torch.compile(torch.nn.Sequential(torch.nn.Conv1d(1, 4, 3), bnlab.BatchNorm1d(4),"
        " torch.nn.ReLU()), backend=cnt)\n"
        "x = torch.randn(5, 1, 10)\n"
        "for _ in range(3):\n"
        "    m(x).sum().backward()\n"
        "print(cnt.frame_count)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "1"


def _python_guards(model: nn.Module, x: torch.Tensor) -> int:
    """How many of the guards dynamo puts on ``torch.compile(model)`` run in Python
    (``LAMBDA_GUARD``): each runs on every call of the compiled model."""
    import logging

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    log = logging.getLogger("torch._dynamo.guards.__guards")
    keep = Keep()
    log.addHandler(keep)
    torch._logging.set_logs(guards=True)
    try:
        dynamo.reset()
        torch.compile(model)(x).sum().backward()
    finally:
        torch._logging.set_logs()
        log.removeHandler(keep)
    text = "\n".join(lines)
    assert "GuardManager" in text  # the guards were seen
    return text.count("LAMBDA_GUARD")


def test_a_compiled_bnlab_model_adds_no_python_guard_to_torch_s():
    # an object a traced layer reaches by two names (a module through two imports, torch from
    # two bnlab modules, type(self) of two layers of one class) costs an aliasing check that
    # dynamo runs in Python on every call; bnlab's layers used to add nine to a 3-layer MLP
    def mlp():
        return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Sigmoid(),
                             nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Sigmoid(),
                             nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Sigmoid())  # fmt: skip

    x = torch.randn(8, 5)
    assert _python_guards(bnlab.convert(mlp()), x) <= _python_guards(mlp(), x)

"""The error table: every bad argument of a public constructor or tool is one ValueError or
TypeError that names the argument, what was expected and what was received, raised where the
argument enters, before anything is built or modified.

Each row is ``(id, build, call, exception, match)``: ``build()`` makes the object the call may
touch (a model, or ``None`` for a constructor), ``call(obj)`` must raise, and afterwards the
object's state dict, training flags and ``requires_grad`` flags are unchanged.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import pytest
import torch
import torch.distributed as dist
from torch import nn

import bnlab
from bnlab import tools

NAN, INF = float("nan"), float("inf")


class Row(NamedTuple):
    id: str
    build: Any
    call: Any
    exc: type[Exception]
    match: str


def _none():
    return None


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()


def _bnlab_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), bnlab.BatchNorm2d(4), nn.ReLU()).eval()


def _meta_net():
    return _net().to("meta")


def _lazy_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.LazyBatchNorm2d())


def _overflow_net():
    net = _net()
    with torch.no_grad():
        net[0].weight[1].fill_(10.0)
        net[1].weight.fill_(3e38)
    return net


def _bad_stats_net(key: str, value: float):
    def build():
        net = _net()
        getattr(net[1], key).data[1] = value
        return net

    return build


X = torch.randn(2, 1, 8, 8)

LAYERS = [bnlab.BatchNorm1d, bnlab.BatchNorm2d, bnlab.BatchNorm3d, bnlab.BatchNormAct2d,
          bnlab.SyncBatchNorm, bnlab.GhostBatchNorm2d, bnlab.BatchRenorm2d,
          bnlab.FrozenBatchNorm2d, bnlab.FrozenBatchNormAct2d]


def _layer_rows() -> list[Row]:
    rows = []
    for cls in LAYERS:
        n = cls.__name__
        for kw, exc, match in [
            ({"eps": True}, ValueError, f"{n}: eps must be a positive finite float, got True"),
            ({"momentum": True}, ValueError, f"{n}: momentum must be a float in"),
            ({"affine": "yes"}, TypeError, f"{n}: affine must be a bool, got 'yes'"),
            ({"affine": None}, TypeError, f"{n}: affine must be a bool, got None"),
            ({"track_running_stats": "no"}, TypeError,
             f"{n}: track_running_stats must be a bool, got 'no'"),
            ({"bias": 1}, TypeError, f"{n}: bias must be a bool, got 1"),
            ({"device": "bogus"}, ValueError,
             f"{n}: device must be None, a torch.device or a device string such as 'cpu' or "
             "'cuda:0', got 'bogus'"),
            ({"device": 3.5}, TypeError, f"{n}: device must be None, a torch.device"),
            ({"dtype": torch.int64}, TypeError,
             f"{n}: dtype must be None or a floating-point torch.dtype, got torch.int64"),
            ({"dtype": "float32"}, TypeError,
             f"{n}: dtype must be None or a floating-point torch.dtype, got 'float32'"),
        ]:
            rows.append(Row(f"{n}-{next(iter(kw))}={kw[next(iter(kw))]!r}", _none,
                            lambda _, cls=cls, kw=kw: cls(4, **kw), exc, match))
    return rows


def _trained_pn():
    """A PowerNorm in training mode with moved statistics: a refused call must leave them."""
    torch.manual_seed(0)
    pn = bnlab.PowerNorm(4, warmup_iters=1, layout="nlc")
    x = torch.randn(2, 5, 4, requires_grad=True)
    pn(x).backward(torch.randn(2, 5, 4))
    return pn


def _powernorm_rows() -> list[Row]:
    n = "PowerNorm"
    rows = [Row(f"{n}-{next(iter(kw))}={kw[next(iter(kw))]!r}", _none,
                lambda _, kw=kw: bnlab.PowerNorm(6, **kw), exc, match)
            for kw, exc, match in [
        ({"warmup_iters": -1}, ValueError, f"{n}: warmup_iters must be an int >= 0 (training "
         "batches normalised with their own statistics), got -1"),
        ({"warmup_iters": 2.5}, ValueError, f"{n}: warmup_iters must be an int >= 0"),
        ({"alpha_fwd": 1.5}, ValueError,
         f"{n}: alpha_fwd must be a float in [0, 1] (the old value's weight, as in the paper), "
         "got 1.5"),
        ({"alpha_fwd": True}, ValueError, f"{n}: alpha_fwd must be a float in [0, 1]"),
        ({"alpha_bkw": -0.1}, ValueError, f"{n}: alpha_bkw must be a float in [0, 1] (the old "
         "value's weight, as in the paper), got -0.1"),
        ({"group_num": 4}, ValueError,
         f"{n}: group_num must be a positive int dividing num_features=6, got 4"),
        ({"group_num": 0}, ValueError, f"{n}: group_num must be a positive int dividing"),
        ({"eps": 0.0}, ValueError, f"{n}: eps must be a positive finite float, got 0.0"),
        ({"affine": "yes"}, TypeError, f"{n}: affine must be a bool, got 'yes'"),
        ({"layout": "tbc"}, ValueError, f"{n}: layout must be one of ['ncl', 'nlc'], got 'tbc'"),
        ({"nonfinite": "warn"}, ValueError,
         f"{n}: nonfinite must be one of ['raise', 'skip'], got 'warn'"),
        ({"device": "bogus"}, ValueError, f"{n}: device must be None, a torch.device"),
        ({"dtype": torch.int64}, TypeError,
         f"{n}: dtype must be None or a floating-point torch.dtype, got torch.int64"),
    ]]  # fmt: skip
    rows.append(Row(f"{n}-num_features=0", _none, lambda _: bnlab.PowerNorm(0), ValueError,
                    f"{n}: num_features must be a positive int, got 0"))
    x = torch.randn(2, 5, 4)  # (N, L, C)
    for rid, kw, exc, match in [
        ("mask-shape", {"mask": torch.ones(2, 6, dtype=torch.bool)}, ValueError,
         f"{n}: mask must have shape (N, L) = (2, 5), got (2, 6)"),
        ("mask-dtype", {"mask": torch.ones(2, 5)}, TypeError,
         f"{n}: mask must be a torch.bool tensor (true = valid), got torch.float32"),
        ("mask-device", {"mask": torch.ones(2, 5, dtype=torch.bool, device="meta")}, ValueError,
         f"{n}: mask must be on the input's device cpu, got meta"),
        ("lengths-beyond-L", {"lengths": torch.tensor([5, 6])}, ValueError,
         f"{n}: lengths must be in [0, L=5], got values in [5, 6]"),
        ("lengths-float", {"lengths": torch.tensor([5.0, 2.0])}, TypeError,
         f"{n}: lengths must be an integer tensor of shape (N,), got torch.float32"),
        ("no-valid-position", {"mask": torch.zeros(2, 5, dtype=torch.bool)}, ValueError,
         f"{n}: a training batch needs at least 1 valid position, got 0 in mask of shape (2, 5)"),
        ("mask-and-lengths", {"mask": torch.ones(2, 5, dtype=torch.bool),
                              "lengths": torch.tensor([5, 5])}, ValueError,
         f"{n}: give mask or lengths, not both"),
    ]:  # fmt: skip
        rows.append(Row(f"{n}-forward-{rid}", _trained_pn, lambda m, kw=kw: m(x, **kw), exc,
                        match))
    rows += [
        Row(f"{n}-forward-channels", _trained_pn, lambda m: m(torch.randn(2, 5, 3)), ValueError,
            f"{n}: expected 4 channels in dim 2 (num_features=4), got input of shape (2, 5, 3)"),
        Row(f"{n}-forward-4D", _trained_pn, lambda m: m(torch.randn(2, 4, 5, 5)), ValueError,
            f"{n}: expected 2D (N, C) or 3D (N, L, C) input, got 4D input of shape "
            "(2, 4, 5, 5)"),
        Row(f"{n}-forward-int", _trained_pn, lambda m: m(torch.ones(2, 5, 4, dtype=torch.long)),
            TypeError, f"{n}: expected a floating-point input, got dtype torch.int64"),
        Row(f"{n}-forward-mask-2D-input", _trained_pn,
            lambda m: m(torch.randn(3, 4), mask=torch.ones(3, 1, dtype=torch.bool)), ValueError,
            f"{n}: mask/lengths need a 3D input ((N, L, C)), got 2D input of shape (3, 4)"),
        Row(f"{n}-load-negative-phi", _trained_pn,
            lambda m: m.load_state_dict({**m.state_dict(), "running_phi": -torch.ones(4)}),
            ValueError, f"{n}: state dict key 'running_phi' holds 4 negative of 4 values"),
    ]
    return rows


ROWS: list[Row] = [
    *_layer_rows(),
    # ---------------------------------------------------------------- process groups
    Row("SyncBatchNorm-process_group-str", _none,
        lambda _: bnlab.SyncBatchNorm(4, process_group="bogus"), TypeError,
        "SyncBatchNorm: process_group must be None or a torch.distributed.ProcessGroup, "
        "got str"),
    Row("BatchNorm2d-process_group-int", _none,
        lambda _: bnlab.BatchNorm2d(4, process_group=3), TypeError,
        "BatchNorm2d: process_group must be None or a torch.distributed.ProcessGroup, got int"),
    Row("convert_sync_batchnorm-process_group-str", _net,
        lambda m: bnlab.SyncBatchNorm.convert_sync_batchnorm(m, process_group="bogus"),
        TypeError, "convert_sync_batchnorm: process_group must be None or a "
        "torch.distributed.ProcessGroup, got str"),
    # ---------------------------------------------------------------- variant keywords
    Row("BatchNormAct2d-negative_slope-nan", _none,
        lambda _: bnlab.BatchNormAct2d(4, act="leaky_relu", negative_slope=NAN), ValueError,
        "BatchNormAct2d: negative_slope must be a finite float, got nan"),
    Row("BatchNormAct2d-negative_slope-inf", _none,
        lambda _: bnlab.BatchNormAct2d(4, act="leaky_relu", negative_slope=-INF), ValueError,
        "BatchNormAct2d: negative_slope must be a finite float, got -inf"),
    Row("GhostBatchNorm2d-strict-str", _none,
        lambda _: bnlab.GhostBatchNorm2d(4, strict="yes"), TypeError,
        "GhostBatchNorm2d: strict must be a bool, got 'yes'"),
    Row("BatchRenorm2d-r_max-bool", _none, lambda _: bnlab.BatchRenorm2d(4, r_max=True),
        ValueError, "BatchRenorm2d: r_max must be a finite float >= 1, got True"),
    Row("BatchRenorm2d-d_max-bool", _none, lambda _: bnlab.BatchRenorm2d(4, d_max=False),
        ValueError, "BatchRenorm2d: d_max must be a finite float >= 0, got False"),
    *_powernorm_rows(),
    # ---------------------------------------------------------------- registry, converters
    Row("make_norm-dim-bool", _none, lambda _: bnlab.make_norm("bn", 4, dim=True), ValueError,
        "make_norm: dim must be 1, 2 or 3, got True"),
    Row("register_norm-name-int", _none, lambda _: bnlab.register_norm(3, lambda c, d: None),
        TypeError, "register_norm: name must be a non-empty str, got 3"),
    Row("register_norm-factory-int", _none, lambda _: bnlab.register_norm("zz-new", 3),
        TypeError, "register_norm: factory must be callable, got int"),
    Row("convert-inplace-str", _net, lambda m: bnlab.convert(m, inplace="no"), TypeError,
        "convert: inplace must be a bool, got 'no'"),
    *[Row(f"convert-to-torch-{type(layer).__name__}", lambda layer=layer: nn.Sequential(
              nn.Conv2d(1, 4, 3), layer), lambda m: bnlab.convert(m, to="torch"), ValueError,
          f"convert: layer 1 ({type(layer).__name__}) {why}")
      for layer, why in [
          (bnlab.GhostBatchNorm2d(4), "has no torch.nn equivalent"),
          (bnlab.BatchRenorm2d(4), "has no torch.nn equivalent"),
          (bnlab.FrozenBatchNorm2d(4), "has no torch.nn equivalent"),
          (bnlab.FrozenBatchNormAct2d(4), "has no torch.nn equivalent"),
          (bnlab.SyncBatchNorm(4), "has no torch.nn equivalent"),
          (type("MyBN", (bnlab.BatchNorm2d,), {})(4), "has no torch.nn equivalent"),
          (bnlab.SyncBatchNorm.convert_sync_batchnorm(bnlab.BatchNorm2d(4)),
           "synchronises its statistics (process_group)"),
      ]],
    *[Row(f"{name}-lazy", _lazy_net, call, ValueError,
          f"{name}: layer 1 (LazyBatchNorm2d) is an uninitialised lazy module (its parameters "
          "are created by its first forward); run one forward with an example batch first")
      for name, call in [
          ("convert", lambda m: bnlab.convert(m)),
          ("convert", lambda m: bnlab.convert(m, to="torch")),
          ("freeze", bnlab.freeze), ("unfreeze", bnlab.unfreeze),
          ("convert_sync_batchnorm", bnlab.SyncBatchNorm.convert_sync_batchnorm),
          ("fold", tools.fold), ("lint", tools.lint),
          ("recalibrate", lambda m: tools.recalibrate(m, [X])),
          ("adapt", lambda m: tools.adapt(m, [X])),
      ]],
    # ---------------------------------------------------------------- tools: the model
    *[Row(f"{name}-not-a-module", _none, call, TypeError,
          f"{name}: model must be a torch.nn.Module, got {got}")
      for name, call, got in [
          ("fold", lambda _: tools.fold("str"), "str"),
          ("lint", lambda _: tools.lint(3), "int"),
          ("lint", lambda _: tools.lint(42), "int"),
          ("recalibrate", lambda _: tools.recalibrate(42, [X]), "int"),
          ("adapt", lambda _: tools.adapt(42, [X]), "int"),
          ("adapt", lambda _: tools.adapt([1], [X], "tent"), "list"),
          ("Tent", lambda _: tools.Tent(42), "int"),
          ("Monitor", lambda _: tools.Monitor(42), "int"),
          ("bn_layers", lambda _: tools.bn_layers(42), "int"),
      ]],
    *[Row(f"{name}-meta", _meta_net, call, ValueError,
          f"{name}: parameter '0.weight' is on the meta device (a shape without values); "
          f"{name} needs real weights")
      for name, call in [
          ("fold", tools.fold),
          ("fold", lambda m: tools.fold(m, X)),
          ("lint", tools.lint),
          ("lint", lambda m: tools.lint(m, X)),
          ("recalibrate", lambda m: tools.recalibrate(m, [X])),
          ("adapt", lambda m: tools.adapt(m, [X])),
          ("adapt", lambda m: tools.adapt(m, [X], "tent")),
          ("Tent", tools.Tent),
      ]],
    # ---------------------------------------------------------------- fold
    Row("fold-empty-example", _net, lambda m: tools.fold(m, torch.randn(0, 1, 8, 8)),
        ValueError, "fold: example_input has an empty batch (shape (0, 1, 8, 8)); the fold "
        "cannot be checked on 0 samples: pass at least one"),
    Row("fold-empty-example-tuple", _net, lambda m: tools.fold(m, (torch.randn(0, 1, 8, 8),)),
        ValueError, "fold: example_input has an empty batch (shape (0, 1, 8, 8))"),
    Row("fold-meta-example", _net, lambda m: tools.fold(m, X.to("meta")), ValueError,
        "fold: example_input is on the meta device (a shape without values)"),
    *[Row(f"fold-{key}-{value}", _bad_stats_net(key, value), call, ValueError,
          f"fold: BN layer '1' (BatchNorm2d): {key} holds 1 {words} of 4 values; the folded "
          "weights would not be finite")
      for key, value, words in [("running_var", NAN, "NaN"), ("running_var", -1.0, "negative"),
                                ("running_mean", INF, "Inf"), ("weight", NAN, "NaN")]
      for call in (tools.fold, lambda m: tools.fold(m, X))],
    Row("fold-nonfinite-example", _net, lambda m: tools.fold(m, torch.full((2, 1, 8, 8), NAN)),
        ValueError, "fold: the model's output on example_input is not finite (NaN/Inf)"),
    Row("fold-overflow", _overflow_net, tools.fold, ValueError,
        "fold: folding BN layer '1' into '0' gives a weight with 9 Inf of 36 values (the "
        "product overflows torch.float32)"),
    Row("fold-warn-str", _net, lambda m: tools.fold(m, warn="no"), TypeError,
        "fold: warn must be a bool, got 'no'"),
    Row("fold_conv_bn-layer", _none,
        lambda _: tools.fold_conv_bn(nn.ReLU(), nn.BatchNorm2d(4).eval()), TypeError,
        "fold_conv_bn: layer must be a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear, "
        "got ReLU"),
    Row("fold_conv_bn-bn", _none, lambda _: tools.fold_conv_bn(nn.Conv2d(1, 4, 3), nn.ReLU()),
        TypeError, "fold_conv_bn: bn must be a torch or bnlab BN layer, got ReLU"),
    Row("fold_conv_bn-nan", _bad_stats_net("running_var", NAN),
        lambda m: tools.fold_conv_bn(m[0], m[1]), ValueError,
        "fold_conv_bn: bn: running_var holds 1 NaN of 4 values"),
    Row("load_folded-factory", _none, lambda _: tools.load_folded("x.pt", factory=3),
        TypeError, "load_folded: factory must be None or a callable returning the model, "
                   "got int"),
    # ---------------------------------------------------------------- lint
    Row("lint-optimizer", _net, lambda m: tools.lint(m, optimizer=3), TypeError,
        "lint: optimizer must be None or a torch.optim.Optimizer, got int"),
    Row("lint_source-filename", _none, lambda _: tools.lint_source("x = 1", filename=3),
        TypeError, "lint_source: filename must be a str, got int"),
    # ---------------------------------------------------------------- recalibrate, adapt
    Row("recalibrate-batches-int", _bnlab_net, lambda m: tools.recalibrate(m, 5), TypeError,
        "recalibrate: batches must be an iterable of batches (a DataLoader, or a list of "
        "tensors or (input, target) tuples), got int"),
    Row("recalibrate-batches-tensor", _bnlab_net, lambda m: tools.recalibrate(m, X),
        TypeError, "recalibrate: batches must be an iterable of batches (a DataLoader, or a "
        "list of tensors or (input, target) tuples), got a Tensor (iterating it would give "
        "single samples); pass [x] for one batch"),
    Row("recalibrate-empty-iterable", _bnlab_net, lambda m: tools.recalibrate(m, []),
        ValueError, "recalibrate: batches yielded no batch; pass a non-empty iterable"),
    Row("recalibrate-zero-size", _bnlab_net,
        lambda m: tools.recalibrate(m, [torch.randn(0, 1, 8, 8)] * 2), ValueError,
        "recalibrate: every batch that reached BN layer '1' was empty (0 values per channel, "
        "2 batches); no statistics were changed"),
    *[Row(f"adapt-{method}-{what}", _bnlab_net, call, ValueError, match)
      for method in ("adabn", "tent")
      for what, call, match in [
          ("empty", lambda m, method=method: tools.adapt(m, [], method),
           "adapt: batches yielded no batch; pass a non-empty iterable"),
          ("num_batches-0", lambda m, method=method: tools.adapt(m, [X], method, num_batches=0),
           "adapt: num_batches must be a positive int or None, got 0"),
          ("num_batches-short", lambda m, method=method: tools.adapt(m, [X], method,
                                                                     num_batches=3),
           "adapt: asked for num_batches=3 but batches yielded only 1"),
          ("lr-nan", lambda m, method=method: tools.adapt(m, [X], method, lr=NAN),
           "adapt: lr must be a finite float >= 0, got nan"),
          ("lr-negative", lambda m, method=method: tools.adapt(m, [X], method, lr=-1.0),
           "adapt: lr must be a finite float >= 0, got -1.0"),
          ("steps-0", lambda m, method=method: tools.adapt(m, [X], method, steps=0),
           "adapt: steps must be a positive int, got 0"),
      ]],
    Row("adapt-lr-str", _bnlab_net, lambda m: tools.adapt(m, [X], "tent", lr="x"), TypeError,
        "adapt: lr must be a float, got str"),
    Row("adapt-episodic-str", _bnlab_net, lambda m: tools.adapt(m, [X], "tent", episodic="x"),
        TypeError, "adapt: episodic must be a bool, got 'x'"),
    Row("Tent-optimizer", _bnlab_net, lambda m: tools.Tent(m, optimizer=3), TypeError,
        "Tent: optimizer must be None or a callable building an optimizer from a parameter "
        "list, got int"),
    Row("Tent-episodic", _bnlab_net, lambda m: tools.Tent(m, episodic="x"), TypeError,
        "Tent: episodic must be a bool, got 'x'"),
    Row("entropy-list", _none, lambda _: tools.entropy([1.0, 2.0]), TypeError,
        "entropy: logits must be a torch.Tensor, got list"),
    Row("entropy-1d", _none, lambda _: tools.entropy(torch.randn(3)), ValueError,
        "entropy: logits must be (N, K), with classes in dim 1, got shape (3,)"),
    Row("Monitor-max_samples", _net, lambda m: tools.Monitor(m, max_samples=0), ValueError,
        "Monitor: max_samples must be a positive int, got 0"),
]


def _state(obj) -> Any:
    if not isinstance(obj, nn.Module):
        return None
    # meta tensors and a lazy module's parameters have no values: compare what they are
    state = {k: type(v) if nn.parameter.is_lazy(v)
             else (v.shape, v.dtype, v.device) if v.is_meta else v.clone()
             for k, v in obj.state_dict().items()}
    flags = [(n, m.training) for n, m in obj.named_modules()]
    grads = [(n, p.requires_grad) for n, p in obj.named_parameters()]
    hooks = [(n, len(m._forward_hooks), len(m._forward_pre_hooks))
             for n, m in obj.named_modules()]
    return state, flags, grads, hooks


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    sa, *rest_a = a
    sb, *rest_b = b
    if sa.keys() != sb.keys():
        return False
    for k in sa:
        va, vb = sa[k], sb[k]
        if isinstance(va, torch.Tensor):
            nans = va.isnan() if va.is_floating_point() else torch.zeros_like(va, dtype=bool)
            if not (torch.equal(nans, vb.isnan() if vb.is_floating_point() else nans)
                    and torch.equal(va.nan_to_num(), vb.nan_to_num())):
                return False
        elif va != vb:
            return False
    return rest_a == rest_b


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_argument_is_named_and_changes_nothing(row: Row) -> None:
    obj = row.build()
    before = _state(obj)
    with pytest.raises(row.exc, match=re.escape(row.match)):
        row.call(obj)
    assert _same(before, _state(obj))


def test_a_real_process_group_is_accepted() -> None:
    pg = dist.ProcessGroup(0, 1)  # built without initialising torch.distributed
    assert bnlab.SyncBatchNorm(4, process_group=pg).process_group is pg
    assert bnlab.BatchNorm2d(4, process_group=pg).sync


def test_valid_flags_and_factories_are_accepted() -> None:
    bn = bnlab.BatchNorm2d(4, 1e-3, None, False, False, device=torch.device("cpu"),
                           dtype=torch.float64)
    assert not bn.affine and not bn.track_running_stats and bn.momentum is None
    assert bnlab.BatchNorm2d(4, device="cpu", dtype=torch.bfloat16).weight.dtype == torch.bfloat16
    assert bnlab.BatchNorm2d(4, device="meta").weight.is_meta
    assert bnlab.BatchNormAct2d(4, act="leaky_relu", negative_slope=-0.5).negative_slope == -0.5
    assert bnlab.make_norm("bn", 4, dim=1).num_features == 4

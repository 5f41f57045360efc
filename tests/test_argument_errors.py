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
    # ---------------------------------------------------------------- registry, converters
    Row("make_norm-dim-bool", _none, lambda _: bnlab.make_norm("bn", 4, dim=True), ValueError,
        "make_norm: dim must be 1, 2 or 3, got True"),
    Row("register_norm-name-int", _none, lambda _: bnlab.register_norm(3, lambda c, d: None),
        TypeError, "register_norm: name must be a non-empty str, got 3"),
    Row("register_norm-factory-int", _none, lambda _: bnlab.register_norm("zz-new", 3),
        TypeError, "register_norm: factory must be callable, got int"),
    Row("convert-inplace-str", _net, lambda m: bnlab.convert(m, inplace="no"), TypeError,
        "convert: inplace must be a bool, got 'no'"),
]


def _state(obj) -> Any:
    if not isinstance(obj, nn.Module):
        return None
    if any(t.is_meta for t in (*obj.parameters(), *obj.buffers())):
        # meta tensors have no values: compare what they are, not what they hold
        state = {k: (v.shape, v.dtype, v.device) for k, v in obj.state_dict().items()}
    else:
        state = {k: v.clone() for k, v in obj.state_dict().items()}
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

"""bnlab's C kernels: CPU float32/float64, contiguous NCHW or channels-last.

Eager calls run the autograd Functions of :mod:`bnlab.kernels.api` (the cheapest per call);
inside ``torch.compile`` and ``torch.export`` the training step is the ``bnlab::train_forward``
custom op of :mod:`bnlab.kernels.library`, so compiled models keep the native kernels.
Evaluation inside a graph is left to :mod:`.aten` (inductor fuses it; ONNX shows
``BatchNormalization``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ops, api, library
from .. import supports as _eager_supports

NAME = "native"


def _capturing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _graph_supports(x: Tensor, per_channel: tuple) -> bool:
    from .. import _native, backend

    if _native is None or backend() != "native":
        return False
    if not (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)):
        return False
    if x.dim() < 2 or _ops._layout(x) is None:
        return False
    c = x.shape[1]
    return all(
        t is None or (t.dtype == x.dtype and t.device.type == "cpu" and t.dim() == 1
                      and t.shape[0] == c)  # fmt: skip
        for t in per_channel
    )


def supports(x: Tensor, per_channel: tuple, train: bool) -> bool:
    if _capturing():
        return train and _graph_supports(x, per_channel)
    return _eager_supports(x, *per_channel)


def train(x, weight, bias, eps, act, slope) -> tuple[Tensor, Tensor, Tensor]:
    if _capturing():
        y, mean, var, *_ = library.train_forward(x, weight, bias, float(eps), act, float(slope))
        return y, mean, var
    return api._TrainFn.apply(x, weight, bias, float(eps), act, float(slope), True)


def evaluate(x, mean, var, weight, bias, eps, act, slope) -> Tensor:
    return api._normalize_act_native(x, mean, var, weight, bias, eps, act, slope)

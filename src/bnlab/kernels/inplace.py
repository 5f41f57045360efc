"""The rules of in-place activated BN: ``act(BN(x))`` that keeps only its output for backward
(the autograd Function is :class:`bnlab.kernels.autograd.InPlaceBN`, the call
:func:`bnlab.kernels.backends.train_inplace`).

The idea of In-Place ABN (Rota Bulo, Porzi and Kontschieder, CVPR 2018): in a network, the
layer after a BN + activation (a convolution) saves that output for its own backward anyway.
If BN's backward can work from the output too, the input need not be kept at all, and the
output may even be written over the input. For an invertible activation (identity, leaky ReLU
with a positive slope, ELU) the pre-activation is ``z = act^-1(y)`` and the normalised input
``xhat = (z - bias) / weight``, which is all BN's backward needs besides ``(C,)`` statistics.

Rules a user can rely on:

* **Exact gradients for every weight.** Recovering ``xhat`` divides by ``weight``. A call in
  which some ``|weight|`` is below :data:`MIN_WEIGHT` (a zero-initialised residual branch, a
  channel pruned by L1 decay) saves its input instead, as the plain fused layer does: the
  gradients stay exact and only that call's memory saving is lost. Above it, the
  reconstruction error is about ``u |bias| / |weight|`` per element (``u`` the unit
  roundoff: 6e-8 in float32), i.e. at most 6e-5 of ``xhat``'s scale at the threshold.
* **The output is written over the input where autograd allows it**: not for a leaf that
  requires grad, a view, an inference tensor outside inference mode, or a layout the kernels
  do not take (then a new tensor, still the only one saved). As with ``ReLU(inplace=True)``,
  a tensor that another operation saved for its backward (the output of ``exp``, ``sigmoid``,
  ``relu``...) may not be overwritten: autograd raises "modified by an inplace operation" in
  backward rather than computing anything wrong.
* **Double backward is refused** with an error (the input it would differentiate is gone).
* In graphs (``torch.compile``, ``torch.export``) and under ``torch.func`` transforms the
  layer runs as the plain fused one (functional, saves its input; the compiler plans memory).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MIN_WEIGHT", "INVERTIBLE", "can_overwrite", "weights_invertible"]

#: Below this ``|weight|`` (any channel) a call saves its input instead of recovering it.
MIN_WEIGHT = 1e-3
#: Activations whose output determines their input (``elu`` with ``alpha = slope``).
INVERTIBLE = ("identity", "leaky_relu", "elu")


def can_overwrite(x: Tensor) -> bool:
    """Whether autograd lets a function write its output over ``x``."""
    if x.requires_grad and x.is_leaf:
        return False
    if x._base is not None:  # a view: its base may be saved, and mark_dirty rules are strict
        return False
    return not (x.is_inference() and not torch.is_inference_mode_enabled())


def weights_invertible(weight: Tensor | None) -> bool:
    """Every ``|weight| >= MIN_WEIGHT`` (no weight: the identity scale). Reads one value."""
    if weight is None:
        return True
    return bool(weight.detach().abs().min() >= MIN_WEIGHT)

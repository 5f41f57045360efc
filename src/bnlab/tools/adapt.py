r"""Test-time adaptation of BN layers to a shifted input distribution.

* **AdaBN** (Li et al., *Revisiting Batch Normalization For Practical Domain Adaptation*, 2016):
  replace each BN layer's running statistics by the statistics of the target data, here the
  exact population statistics of :func:`bnlab.tools.recalibrate`. No labels, no gradients.
* **TENT** (Wang et al., *Tent: Fully Test-Time Adaptation by Entropy Minimization*, ICLR 2021):
  BN layers normalise with the statistics of each test batch, and only their affine
  parameters :math:`\gamma, \beta` are trained, online, to minimise the mean prediction entropy

  .. math:: H(\hat y) = -\sum_c p(\hat y_c) \log p(\hat y_c),

  one optimiser step per test batch; predictions are the outputs of the forward that computed
  the loss (made before the update, as in the paper). ``episodic=True`` resets weights and
  optimiser state before every batch.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import Tensor, nn

from .._checks import check_bool, check_module, check_real_weights
from .._tree import copy_model
from ._graph import bn_layers
from .recalibrate import (
    _recalibrate,
    check_batch_count,
    check_batches,
    check_num_batches,
    first_tensor,
)

__all__ = ["Tent", "adapt", "entropy", "tent_parameters"]

Method = Literal["adabn", "tent"]


def entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy of ``softmax(logits)`` over dim 1; ``logits`` ``(N, K)`` -> ``(N,)``."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"entropy: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() < 2:
        raise ValueError(f"entropy: logits must be (N, K), with classes in dim 1, got shape "
                         f"{tuple(logits.shape)}")
    logp = logits.log_softmax(dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def tent_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Configure ``model`` for TENT in place and return the parameters it trains.

    Every parameter is frozen except the BN affine ones; BN layers go to train mode without
    running statistics (so they normalise with test-batch statistics); the other modules are
    put in evaluation mode (Dropout off).
    """
    model.eval()
    model.requires_grad_(False)
    params: list[nn.Parameter] = []
    for _, bn in bn_layers(model):
        if not bn.affine:
            continue
        bn.train()
        bn.track_running_stats = False
        bn.running_mean = None
        bn.running_var = None
        bn.num_batches_tracked = None
        if hasattr(bn, "normalize_with"):
            bn.normalize_with = "batch"
        if hasattr(bn, "window_mean"):
            bn.window_mean = None
            bn.window_var = None
        bn.weight.requires_grad_(True)
        bn.bias.requires_grad_(True)
        params += [bn.weight, bn.bias]
    if not params:
        raise ValueError("Tent: the model has no BN layer with affine parameters to adapt")
    return params


def _check_tent_args(owner: str, model: object, steps: object, episodic: object) -> None:
    check_module(owner, "model", model)
    check_real_weights(owner, model)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{owner}: steps must be a positive int, got {steps!r}")
    check_bool(owner, "episodic", episodic)


class Tent(nn.Module):
    """Wrap a model so that each forward adapts its BN affine parameters (TENT), online.

    The wrapped model is configured in place by :func:`tent_parameters` (pass a copy to keep the
    original). ``optimizer`` builds the optimiser from the parameter list; the default is
    ``torch.optim.Adam(params, lr=1e-3)``, the paper's CIFAR setting. ``steps`` optimiser steps
    are taken per batch.

    Example::

        >>> tent = Tent(copy.deepcopy(source_model))
        >>> for x, _ in test_loader:
        ...     logits = tent(x)   # predictions, and one adaptation step
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
        steps: int = 1,
        episodic: bool = False,
    ) -> None:
        super().__init__()
        _check_tent_args("Tent", model, steps, episodic)
        if optimizer is not None and not callable(optimizer):
            raise TypeError(f"Tent: optimizer must be None or a callable building an optimizer "
                            f"from a parameter list, got {type(optimizer).__name__}")
        self.model = model
        self.steps = steps
        self.skipped = 0  # batches left out because their loss was NaN/Inf
        self.episodic = episodic
        params = tent_parameters(model)
        make = optimizer or (lambda p: torch.optim.Adam(p, lr=1e-3))
        self.optimizer = make(params)
        self._initial = (copy.deepcopy(model.state_dict()),
                         copy.deepcopy(self.optimizer.state_dict()))

    def reset(self) -> None:
        """Restore the weights and optimiser state the wrapper started with."""
        self.model.load_state_dict(self._initial[0])
        self.optimizer.load_state_dict(self._initial[1])

    def forward(self, x: Tensor) -> Tensor:
        if self.episodic:
            self.reset()
        with torch.enable_grad():
            for _ in range(self.steps):
                logits = self.model(x)
                loss = entropy(logits).mean()
                if not torch.isfinite(loss):
                    # a NaN/Inf batch would turn every adapted parameter into NaN: skip it
                    self.skipped += 1
                    warnings.warn(
                        f"Tent: skipped the update for a batch whose entropy is {loss.item()} "
                        f"(NaN/Inf in the input); {self.skipped} skipped so far",
                        RuntimeWarning, stacklevel=2,
                    )
                    break
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        return logits.detach()


def adapt(
    model: nn.Module,
    batches: Iterable,
    method: Method = "adabn",
    *,
    num_batches: int | None = None,
    lr: float = 1e-3,
    steps: int = 1,
    episodic: bool = False,
) -> nn.Module:
    """Return a copy of ``model`` adapted to the unlabelled target ``batches``; ``model`` is kept.

    ``method="adabn"``: an evaluation-mode copy whose BN running statistics are the exact
    statistics of the target batches (``num_batches`` of them, default all).
    ``method="tent"``: a :class:`Tent` wrapper around a copy, after one online pass over the
    batches (Adam with ``lr``, ``steps`` per batch); call it on further test batches to keep
    adapting (its BN layers always use test-batch statistics), or use ``.model``.

    Both methods check their arguments the same way and agree on loaders: one that yields no
    batch, or fewer than ``num_batches``, is a ``ValueError`` (``model`` is never modified).

    Raises:
        ValueError: unknown ``method``, ``num_batches``/``lr``/``steps`` out of range, no (or too
            few) batches, or the problems of :func:`recalibrate`.
    """
    if method not in ("adabn", "tent"):
        raise ValueError(f"adapt: method must be one of ['adabn', 'tent'], got {method!r}")
    _check_tent_args("adapt", model, steps, episodic)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"adapt: lr must be a float, got {type(lr).__name__}")
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"adapt: lr must be a finite float >= 0, got {lr!r}")
    check_batches("adapt", batches)
    check_num_batches("adapt", num_batches)
    if method == "adabn":
        adapted = copy_model(model).eval()
        return _recalibrate(adapted, batches, num_batches, "adapt")
    tent = Tent(copy_model(model), lambda p: torch.optim.Adam(p, lr=lr), steps, episodic)
    used = 0
    for batch in batches:
        if num_batches is not None and used >= num_batches:
            break
        tent(first_tensor(batch))
        used += 1
    check_batch_count("adapt", num_batches, used)
    return tent

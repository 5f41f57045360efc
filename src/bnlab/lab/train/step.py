"""The lab's one optimisation step: :func:`train_step`.

Every loop of the lab steps through it: the trainer (:mod:`bnlab.lab.train.loop`, one process
or a DDP rank, so the example worker too), the studies' loop (:mod:`bnlab.lab.studies._fit`,
one seed or a pack of seeds) and the cost study's timed loop. Timed loops run it, so it never
waits for the device unless the caller asks for a number: the loss and the logits stay
tensors in the :class:`StepResult`, and ``losses``/``hits`` convert them when read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["StepResult", "train_step"]


@dataclass(frozen=True)
class StepResult:
    """What one optimisation step computed, per member (one for a plain network).

    ``loss`` (``(S,)``), ``logits`` (``(S, B, classes)``) and ``target`` (``(S, B)``) are
    detached tensors on the model's device; reading :attr:`losses` or :attr:`hits` copies
    them to the host (one device synchronisation each), so a caller that reads neither pays
    for no copy and no wait.
    """

    loss: Tensor  # mean loss of each member's batch (label-smoothed when asked)
    logits: Tensor
    target: Tensor
    nonfinite: list[int] = field(default_factory=list)  # members whose loss was not finite

    @property
    def losses(self) -> list[float]:
        """Each member's mean loss, as floats."""
        return self.loss.tolist()

    @property
    def hits(self) -> list[int]:
        """Each member's correct predictions (argmax of the logits equals the label)."""
        return (self.logits.argmax(2) == self.target).sum(1).tolist()


def train_step(model: Any, opt: torch.optim.Optimizer, x: Tensor, y: Tensor,
               lr: float | None = None, *, packed: bool = False,
               skip_nonfinite: bool = False, label_smoothing: float = 0.0) -> StepResult:
    """One optimisation step: forward, cross-entropy, backward and the optimizer's update.

    ``model`` is a network (``x``: ``(B, ...)``, logits ``(B, classes)``; ``x`` and ``y`` go to
    the device of its parameters) or, with ``packed``, ``S`` members trained at once (``x``:
    ``(S, B, ...)``, logits ``(S, B, classes)``, e.g. a :class:`bnlab.lab.studies._pack.Pack`):
    each member's loss is the mean cross-entropy of its own batch and their sum is minimised
    (members share no parameters, so each gets its own gradient).

    Args:
        lr: sets every parameter group's learning rate before the step (``None``: as it is),
            so a schedule is a function of the step and needs no scheduler state.
        packed: ``model`` is ``S`` members (see above).
        skip_nonfinite: a member whose loss is not finite stops the step before the backward
            pass: the result lists it in ``nonfinite`` and nothing was updated but what the
            forward pass updates (running statistics). Reads the losses on the host (one
            synchronisation) to decide.
        label_smoothing: ``torch.nn.functional.cross_entropy``'s ``label_smoothing`` in
            ``[0, 1]``; the reported loss is the smoothed one.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
        ...                           torch.nn.Linear(8, 3))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> done = train_step(net, opt, torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> len(done.losses), 0 <= done.hits[0] <= 16
        (1, True)
    """
    if not (0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"train_step: label_smoothing must be a float in [0, 1], got "
                         f"{label_smoothing!r}")
    if lr is not None:
        for group in opt.param_groups:
            group["lr"] = lr
    if not packed:
        device = next(model.parameters()).device
        x, y = x.to(device), y.to(device)
    out = model(x)
    if packed:
        s = out.shape[0]
        losses = nn.functional.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none",
                                             label_smoothing=label_smoothing).view(s, -1).mean(1)
    else:  # torch's mean reduction: one kernel, the numbers of a plain training loop
        losses = nn.functional.cross_entropy(out, y, label_smoothing=label_smoothing)
        losses, out, y = losses.unsqueeze(0), out.unsqueeze(0), y.unsqueeze(0)
    done = StepResult(losses.detach(), out.detach(), y)
    if skip_nonfinite:
        bad = [k for k, v in enumerate(done.losses) if not math.isfinite(v)]
        if bad:
            return StepResult(done.loss, done.logits, y, bad)
    opt.zero_grad(set_to_none=True)
    losses.sum().backward()
    opt.step()
    return done

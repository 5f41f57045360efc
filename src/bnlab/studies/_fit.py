"""A small, deterministic step-based training loop for the studies.

Studies need curves against steps (accuracy after k steps, steps to a target), divergence
detection and cheap probes, which the epoch-based run trainer does not give; this loop is
the minimum for that and nothing more.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ..train.loop import evaluate as _train_evaluate

__all__ = ["FitConfig", "FitResult", "fit", "evaluate", "batches"]


@dataclass(frozen=True)
class FitConfig:
    steps: int
    batch_size: int
    lr: float
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    eval_every: int = 0  # 0: evaluate only at the end
    seed: int = 0
    class_sorted: bool = False  # non-i.i.d. batches: each batch drawn from label-sorted data


@dataclass
class FitResult:
    steps: list[int] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    final_test_acc: float = math.nan
    final_train_acc: float = math.nan
    diverged: bool = False
    seconds: float = 0.0

    def steps_to(self, target: float) -> int | None:
        """First evaluated step whose test accuracy reaches ``target``; None if never."""
        for s, a in zip(self.steps, self.test_acc, strict=True):
            if a >= target:
                return s
        return None


def batches(n: int, cfg: FitConfig, labels: Tensor | None = None):
    """Endless seeded stream of index batches (label-sorted chunks when ``class_sorted``)."""
    g = torch.Generator().manual_seed(cfg.seed)
    while True:
        if cfg.class_sorted and labels is not None:
            order = torch.argsort(labels[:n] * n + torch.randperm(n, generator=g))
            chunks = list(order.split(cfg.batch_size))
            for i in torch.randperm(len(chunks), generator=g).tolist():
                if len(chunks[i]) == cfg.batch_size:
                    yield chunks[i]
        else:
            perm = torch.randperm(n, generator=g)
            for start in range(0, n - cfg.batch_size + 1, cfg.batch_size):
                yield perm[start : start + cfg.batch_size]


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` in eval mode (the trainer's evaluation)."""
    loss, acc = _train_evaluate(model, x, y, batch_size)
    return acc, loss


def make_optimizer(model: nn.Module, cfg: FitConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {cfg.optimizer!r}")


def fit(model: nn.Module, x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor,
        cfg: FitConfig, *, on_step: Callable[[int, nn.Module], None] | None = None,
        eval_train: int = 2000) -> FitResult:
    """Train ``model`` for ``cfg.steps`` steps; evaluate every ``cfg.eval_every`` steps.

    ``on_step(step, model)`` runs after each optimiser step (probes, monitors). A non-finite
    loss stops training and marks the run as diverged.
    """
    torch.manual_seed(cfg.seed)
    opt = make_optimizer(model, cfg)
    res = FitResult()
    stream = batches(len(x_train), cfg, y_train)
    model.train()
    t0 = time.perf_counter()
    running, count = 0.0, 0
    for step in range(1, cfg.steps + 1):
        idx = next(stream)
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        if not torch.isfinite(loss):
            res.diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.item()
        count += 1
        if on_step is not None:
            on_step(step, model)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            acc, tl = evaluate(model, x_test, y_test)
            res.steps.append(step)
            res.test_acc.append(acc)
            res.test_loss.append(tl)
            res.train_loss.append(running / max(count, 1))
            running, count = 0.0, 0
            if not math.isfinite(tl):
                res.diverged = True
                break
    res.seconds = time.perf_counter() - t0
    if res.diverged:
        # non-finite logits give argmax 0: the measured accuracy is then chance level
        res.final_test_acc = evaluate(model, x_test, y_test)[0]
        res.final_train_acc = res.final_test_acc
        if not res.test_acc:
            res.steps, res.test_acc = [step], [res.final_test_acc]
        return res
    res.final_test_acc = res.test_acc[-1]
    res.final_train_acc = evaluate(model, x_train[:eval_train], y_train[:eval_train])[0]
    return res

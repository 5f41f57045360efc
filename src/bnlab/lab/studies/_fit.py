"""The studies' training loop: step-based, deterministic, one seed or many at once.

Studies need curves against steps (accuracy after k steps, steps to a target), divergence
detection and cheap probes, and train many seeds of one configuration. One loop,
:func:`_train_members`, does that for a group of members: a :class:`~._pack.Pack` of seeds
trained together, or one model on its own (:class:`_Solo`). :func:`fit` (one model, also the
shift benchmark's source model) and :func:`fit_seeds` (the studies) are its two entry points.

The run trainer (:mod:`bnlab.lab.train.loop`) is the other loop and stays apart: it is
epoch-based and writes a run directory (checkpoints, exact resume, DDP ranks), none of which
an in-memory study of hundreds of short runs wants; both build optimisers with
:func:`~bnlab.lab.train.loop.make_optimizer` and evaluate with
:func:`~bnlab.lab.train.loop.evaluate`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor, nn

from ..train.loop import EvalResult, evaluate, make_optimizer, train_step

__all__ = ["FitConfig", "FitResult", "fit", "fit_seeds", "evaluate", "batches"]


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


def fit(model: nn.Module, x_train: Tensor, y_train: Tensor, x_test: Tensor | None,
        y_test: Tensor | None, cfg: FitConfig, *,
        on_step: Callable[[int, nn.Module], None] | None = None,
        eval_train: int = 2000) -> FitResult:
    """Train ``model`` for ``cfg.steps`` steps; evaluate every ``cfg.eval_every`` steps.

    ``on_step(step, model)`` runs after each optimiser step (probes, monitors). A non-finite
    loss stops training and marks the run as diverged. Without test data (``x_test=None``)
    nothing is evaluated on it; ``eval_train=0`` skips the final training-set accuracy.
    """
    torch.manual_seed(cfg.seed)  # dropout's masks, as every run of this seed draws them
    probe = None if on_step is None else (lambda k, step, m: on_step(step, m))
    return _train_members(_Solo(model), [cfg.seed], x_train, y_train, x_test, y_test, cfg,
                          probe, lambda step: True, eval_train)[0]


def _finish_diverged(res: FitResult, step: int, acc: float) -> None:
    # non-finite logits give argmax 0: the measured accuracy is then chance level
    res.diverged = True
    res.final_test_acc = acc
    res.final_train_acc = acc
    if not res.test_acc:
        res.steps, res.test_acc = [step], [acc]


Probe = Callable[[int, int, nn.Module], None]  # (member index, step, member model)


class _Solo:
    """One model behind the interface of a :class:`~._pack.Pack` of one member, so that a
    model that trains alone goes through the same loop as seeds trained together."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.members = [model]

    def __len__(self) -> int:
        return 1

    def __call__(self, x: Tensor) -> Tensor:
        return self.model(x[0]).unsqueeze(0)

    def save_buffers(self) -> list[Tensor]:
        return [b.clone() for b in self.model.buffers()]

    def restore_buffers(self, saved: list[Tensor]) -> None:
        with torch.no_grad():
            for b, v in zip(self.model.buffers(), saved, strict=True):
                b.copy_(v)

    def sync(self, which: Sequence[int] | None = None) -> None:
        """The member is the model: nothing to copy."""


def fit_seeds(build: Callable[[], nn.Module], seeds: Sequence[int], x_train: Tensor,
              y_train: Tensor, x_test: Tensor, y_test: Tensor, cfg: FitConfig, *,
              together: bool | Literal["auto"] = "auto", on_step: Probe | None = None,
              probe_at: Callable[[int], bool] = lambda step: False,
              eval_train: int = 2000) -> list[tuple[nn.Module, FitResult]]:
    """Train one model per seed; returns ``(model, result)`` per seed, in order.

    Member ``k`` is ``build()`` after ``torch.manual_seed(seeds[k])``, trained by :func:`fit`
    with ``cfg.seed = seeds[k]`` (its own data order). With ``together=True`` the members
    train at once as one packed network (:mod:`._pack`); each equals the same seed trained
    alone up to float rounding (the packed kernels sum in another order). A network that
    cannot be packed exactly (dropout, attention) trains seed by seed. ``"auto"`` (the
    default) packs where it pays: not networks with 2-D convolutions, whose grouped
    convolutions make five packed seeds cost 5.4-5.75x one seed on a CPU against 5x seed by
    seed (``bench/bench_ensemble.py``). ``on_step(k, step, model)`` runs after the optimiser
    steps for which ``probe_at(step)`` is true.
    """
    from ._pack import NotPackable, Pack

    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(build())
    if together == "auto":
        together = not any(isinstance(m, nn.Conv2d) for m in models[0].modules())
    pk = None
    if together and len(models) > 1:
        try:
            pk = Pack(models)
        except NotPackable:
            pk = None
    if pk is None:
        out = []
        for k, (seed, model) in enumerate(zip(seeds, models, strict=True)):
            def probe(step: int, m: nn.Module, k: int = k) -> None:
                if on_step is not None and probe_at(step):
                    on_step(k, step, m)
            out.append((model, fit(model, x_train, y_train, x_test, y_test,
                                   replace(cfg, seed=seed), on_step=probe, eval_train=eval_train)))
        return out
    results = _train_members(pk, seeds, x_train, y_train, x_test, y_test, cfg, on_step,
                             probe_at, eval_train)
    return list(zip(models, results, strict=True))


def _evaluate_pack(pk, x: Tensor, y: Tensor, batch_size: int = 1000) -> list[EvalResult]:
    """:func:`evaluate` for every member on the same ``x``, in one pass of the pack."""
    was = pk.model.training
    pk.model.eval()
    s = len(pk)
    loss_sum, correct = torch.zeros(s, dtype=torch.float64), torch.zeros(s, dtype=torch.int64)
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                xb, yb = x[start : start + batch_size], y[start : start + batch_size]
                out = pk(xb.unsqueeze(0).expand(s, *xb.shape))  # (S, B, classes)
                loss_sum += nn.functional.cross_entropy(
                    out.flatten(0, 1), yb.repeat(s), reduction="none").view(s, -1).sum(1).double()
                correct += (out.argmax(2) == yb).sum(1)
    finally:
        pk.model.train(was)
    return [EvalResult(loss=ls / len(x), accuracy=c / len(x))
            for c, ls in zip(correct.tolist(), loss_sum.tolist(), strict=True)]


def _train_members(pk, seeds, x_train, y_train, x_test, y_test, cfg, on_step, probe_at,
                   eval_train) -> list[FitResult]:
    """The loop: the members of ``pk`` (a Pack, or a _Solo) train on their own batch streams
    (seed ``seeds[k]``) with one optimiser; a member whose loss turns non-finite stops there
    and the others train on without it."""
    from ._pack import Pack

    s = len(pk)
    members = list(pk.members)
    streams = [batches(len(x_train), replace(cfg, seed=seed), y_train) for seed in seeds]
    results = [FitResult() for _ in range(s)]
    active = list(range(s))  # the member index of each position in the pack
    running, count = [0.0] * s, [0] * s
    opt = make_optimizer(pk.model.parameters(), cfg)
    pk.model.train()

    def drop(positions: list[int]) -> None:
        """Train on without the members at ``positions`` (they diverged)."""
        nonlocal pk, opt, active
        keep = [j for j in range(len(active)) if j not in positions]
        active = [active[j] for j in keep]
        if not keep:
            return
        pk.sync(keep)
        new = Pack([members[k] for k in active])
        new_opt = make_optimizer(new.model.parameters(), cfg)
        pk.optimizer_state_for(keep, opt, new, new_opt)
        pk, opt = new, new_opt
        pk.model.train()

    def diverge(positions: list[int], step: int) -> None:
        pk.sync(positions)
        for j in positions:
            k = active[j]
            res = results[k]
            res.seconds = time.perf_counter() - t0
            acc = math.nan if x_test is None else evaluate(members[k], x_test, y_test).accuracy
            _finish_diverged(res, step, acc)

    t0 = time.perf_counter()
    step = 0
    for step in range(1, cfg.steps + 1):
        if not active:
            break
        idx = torch.stack([next(streams[k]) for k in active])
        while True:
            saved = pk.save_buffers()
            done = train_step(pk, opt, x_train[idx], y_train[idx], packed=True,
                              skip_nonfinite=True)
            bad = done.nonfinite
            if not bad:
                break
            # as alone: a non-finite loss stops that member after its forward pass; the
            # others' running statistics, which the shared non-finite guard kept back, are
            # restored and their step is run again without it
            diverge(bad, step)
            pk.restore_buffers(saved)
            idx = idx[[j for j in range(len(active)) if j not in bad]]
            drop(bad)
            if not active:
                break
        if not active:
            break
        values = done.losses
        for j, k in enumerate(active):
            running[k] += values[j]
            count[k] += 1
        if on_step is not None and probe_at(step):
            pk.sync()
            for k in active:
                on_step(k, step, members[k])
        if x_test is not None and ((cfg.eval_every and step % cfg.eval_every == 0)
                                   or step == cfg.steps):
            bad = []
            for j, (k, ev) in enumerate(zip(active, _evaluate_pack(pk, x_test, y_test),
                                            strict=True)):
                tl = ev.loss
                res = results[k]
                res.steps.append(step)
                res.test_acc.append(ev.accuracy)
                res.test_loss.append(tl)
                res.train_loss.append(running[k] / max(count[k], 1))
                running[k], count[k] = 0.0, 0
                if not math.isfinite(tl):
                    bad.append(j)
            if bad:
                diverge(bad, step)
                drop(bad)
    elapsed = time.perf_counter() - t0
    if active:
        pk.sync()
        n = min(eval_train, len(x_train))
        train_acc = _evaluate_pack(pk, x_train[:n], y_train[:n]) if n > 0 else None
        for j, k in enumerate(active):
            res = results[k]
            res.seconds = elapsed
            res.final_test_acc = res.test_acc[-1] if res.test_acc else math.nan
            res.final_train_acc = math.nan if train_acc is None else train_acc[j].accuracy
    return results

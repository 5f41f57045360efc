"""The trainer: small, deterministic, resumable.

``train(config, run_dir)`` trains one model and leaves a complete run directory (see
:mod:`bnlab.lab.train.rundir`). Same config and thread count give the same numbers: the initial
weights come from ``seed``, the batch order of each epoch from ``(seed, epoch)`` and the
learning rate is a pure function of the step. The checkpoint and the epoch's log rows are
committed together after every epoch (:mod:`bnlab.lab.train.commit`); Ctrl-C stops at the end
of the current step and commits there. ``resume=True`` continues from the checkpoint and
produces the metrics an uninterrupted run would, or refuses (:mod:`bnlab.lab.train.resume`).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..data import Dataset, batch_order, load_dataset
from ..models import build_model
from . import commit
from . import rundir as rd
from .config import TrainConfig, lr_at
from .monitoring import MONITOR_FILE, monitored, should_record
from .progress import Progress
from .replicas import Local
from .resume import ResumeError, RunExistsError, check_target, prepare
from .step import StepResult, train_step

__all__ = ["train", "train_step", "StepResult", "evaluate", "EvalResult", "build", "build_net",
           "make_optimizer", "RunExistsError", "ResumeError"]


def build(config: TrainConfig) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model (initialised from ``config.seed``) and its optimizer."""
    model = build_net(config)
    return model, make_optimizer(model.parameters(), config)


def build_net(config: TrainConfig) -> nn.Module:
    """The model of ``config``, initialised from ``config.seed``."""
    torch.manual_seed(config.seed)
    kwargs: dict[str, Any] = {}
    if config.model == "small_cnn":
        kwargs["placement"] = config.placement
    return build_model(config.model, config.norm, **kwargs)


class OptimizerConfig(Protocol):
    """What :func:`make_optimizer` reads: a :class:`TrainConfig` or a study's fit config."""

    optimizer: str
    lr: float
    momentum: float
    weight_decay: float


def make_optimizer(params: Any, config: OptimizerConfig) -> torch.optim.Optimizer:
    """``config.optimizer`` (``"sgd"`` or ``"adam"``) over ``params``, torch's argument order;
    the trainer's and the studies' optimizer."""
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {config.optimizer!r}")


@dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` measures, by name (no tuple order to get wrong)."""

    loss: float  # mean cross-entropy
    accuracy: float  # fraction of correct predictions


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` in eval mode (its mode is restored)."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    device = next(model.parameters()).device
    try:
        for start in range(0, len(x), batch_size):
            out = model(x[start : start + batch_size].to(device)).cpu()
            target = y[start : start + batch_size]
            loss_sum += nn.functional.cross_entropy(out, target, reduction="sum").item()
            correct += int((out.argmax(1) == target).sum())
    finally:
        model.train(was_training)
    return EvalResult(loss=loss_sum / len(x), accuracy=correct / len(x))


class _StopFlag:
    """Set by the first SIGINT or SIGTERM; a second one interrupts at once."""

    def __init__(self) -> None:
        self.set = False


@contextlib.contextmanager
def _sigint_stops(flag: _StopFlag) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.set:
            raise KeyboardInterrupt
        flag.set = True

    # SIGTERM (a scheduler or `kill` ending the job) is handled like Ctrl-C: the step ends,
    # a checkpoint is written and the run is marked interrupted, ready for --resume
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _say_what_resume_found(progress: Progress, config: TrainConfig, run_dir: Path,
                           start: Any, removed: list[str]) -> None:
    """One notice for each thing --resume changed or skipped in the run directory."""
    tag = f"[{config.name}] {run_dir}:"
    if removed:
        progress.notice(f"{tag} removed {', '.join(removed)}: an unfinished write of a process "
                        "that was killed; the last commit is kept")
    if start.dropped:
        step = start.ckpt["step"]
        rows = ", ".join(f"{k} row(s) of {n}" for n, k in start.dropped.items())
        progress.notice(f"{tag} dropped {rows} written after the checkpoint (step {step}); "
                        "they are trained again")
    if start.first_commit:
        progress.notice(f"{tag} no checkpoint yet (the run stopped before its first epoch "
                        "ended): starting at epoch 1")
    if start.complete:
        progress.notice(f"{tag} the run is complete ({config.epochs} epochs); nothing to "
                        "resume, nothing retrained")


def _summary(config: TrainConfig, epochs: list[dict], status: str) -> dict[str, Any]:
    s: dict[str, Any] = {"name": config.name, "norm": config.norm, "model": config.model,
                         "dataset": config.dataset, "seed": config.seed, "status": status,
                         "epochs_done": len(epochs), "epochs": config.epochs}
    if epochs:
        best = max(epochs, key=lambda r: r["val_acc"])
        last = epochs[-1]
        s.update({
            "final_val_acc": last["val_acc"], "final_val_loss": last["val_loss"],
            "final_train_acc": last["train_acc"], "final_train_loss": last["train_loss"],
            "best_val_acc": best["val_acc"], "best_epoch": best["epoch"],
            "mean_epoch_time": sum(r["epoch_time"] for r in epochs) / len(epochs),
            "total_train_time": sum(r["epoch_time"] for r in epochs),
        })
    return s


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    dataset: Dataset | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    on_step: Callable[[int], None] | None = None,
    replicas: Local | None = None,
    on_end: Callable[[nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Train ``config`` into ``run_dir`` and return the summary.

    ``dataset`` skips loading (subsets from the config still apply); ``on_step(global_step)``
    is called after every optimisation step, ``on_end(model)`` once with the final model.
    Raises :class:`KeyboardInterrupt` after saving a checkpoint when interrupted with Ctrl-C.
    ``replicas`` is the data-parallel context of this process (:mod:`bnlab.lab.train.ddp`; default:
    a single process); with it only rank 0 writes ``run_dir``.
    """
    run_dir = Path(run_dir)
    ctx = replicas or Local()
    check_target(run_dir, resume)
    if not ctx.is_main:
        return _train(config, run_dir, dataset, resume, progress, on_step, ctx, on_end)
    with rd.new_out_dir(run_dir), rd.lock_run_dir(run_dir):  # one writer (rank 0 for all)
        return _train(config, run_dir, dataset, resume, progress, on_step, ctx, on_end)


def _train(config, run_dir, dataset, resume, progress, on_step, ctx, on_end):
    progress = progress or Progress()
    if ctx.world_size != config.nproc_per_node:
        raise ValueError(
            f"train: config.nproc_per_node={config.nproc_per_node} but this process is one of "
            f"{ctx.world_size}; start it with `bnlab train --nproc-per-node "
            f"{config.nproc_per_node}`"
        )
    # rank 0 finishes or removes a commit a kill cut short before any rank reads the directory
    removed = commit.recover(run_dir)[1] if ctx.is_main else []
    ctx.barrier()
    start = prepare(config, run_dir, resume)
    ckpt = start.ckpt
    ctx.barrier()  # every rank has checked the directory before rank 0 writes into it
    if ctx.is_main:
        _say_what_resume_found(progress, config, run_dir, start, removed)
    if start.complete:
        if not ctx.is_main:
            return {"rank": ctx.rank, "status": "complete", "epochs_done": len(start.epochs)}
        return rd.read_json(run_dir / "summary.json")
    if config.threads:
        torch.set_num_threads(config.threads)
    if dataset is None:
        dataset = load_dataset(config.dataset, config.data_dir or None)
    data = dataset.subset(config.train_subset, config.test_subset)
    if ctx.is_main:
        rd.atomic_write_text(run_dir / "config.toml", config.to_toml())
        env = rd.run_environment()
        env.update(data_source=data.source, world_size=ctx.world_size,
                   device=str(ctx.device))
        rd.write_json(run_dir / "environment.json", env)

    ddp, model = ctx.wrap(build_net(config), config.sync_bn)
    opt = make_optimizer(ddp.parameters(), config)
    n = len(data.x_train)
    steps_per_epoch = -(-n // config.batch_size)
    epoch0, skip, step = 0, 0, 0
    acc: dict[str, float] = {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0, "time": 0.0,
                             "cpu": 0.0}
    steps, epochs, mon_rows = start.steps, start.epochs, start.monitor
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        epoch0, skip, step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]
        acc = dict(ckpt["accumulators"])
        progress.message(f"[{config.name}] resuming at epoch {epoch0 + 1}, step {step}")
    pending: list[dict] = []
    mon_pending: list[dict] = []

    def checkpoint(epoch: int, in_epoch: int, status: str) -> None:
        ctx.sync_stats(model)
        if not ctx.is_main:
            pending.clear()
            mon_pending.clear()
            return
        steps.extend(pending)
        pending.clear()
        files = {rd.CHECKPOINT: rd.checkpoint_bytes({
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "rng": torch.get_rng_state(), "epoch": epoch, "step_in_epoch": in_epoch,
            "step": step, "accumulators": dict(acc), "config": config.to_dict(),
        }), "steps.jsonl": rd.jsonl_bytes(steps), "epochs.jsonl": rd.jsonl_bytes(epochs)}
        if config.monitor:
            mon_rows.extend(mon_pending)
            mon_pending.clear()
            files[MONITOR_FILE] = rd.jsonl_bytes(mon_rows)
        files["summary.json"] = rd.json_bytes(_summary(config, epochs, status))
        # one transaction: the checkpoint and these rows become visible together
        commit.commit(run_dir, files, step=step, epoch=epoch)

    flag = _StopFlag()
    ddp.train()
    with _sigint_stops(flag):
        for epoch in range(epoch0, config.epochs):
            batches = list(batch_order(n, config.batch_size, config.seed, epoch))
            first = skip if epoch == epoch0 else 0
            progress.start_epoch(config.name, epoch, config.epochs, len(batches), first)
            for i in range(first, len(batches)):
                t0, c0 = time.perf_counter(), time.process_time()
                lr = lr_at(config, step, steps_per_epoch)
                idx = ctx.shard(batches[i])
                batch = (ddp, opt, data.x_train[idx], data.y_train[idx], lr)
                if config.monitor and ctx.is_main and should_record(config.monitor_every, step):
                    done, rows = monitored(model, step, epoch, train_step, *batch)
                    mon_pending.extend(rows)
                else:
                    done = train_step(*batch)
                lv, correct = done.losses[0], done.hits[0]
                # global loss and hits; any rank's Ctrl-C stops every rank at this step
                loss_sum, correct, seen, stop = ctx.reduce(
                    [lv * len(idx), correct, len(idx), float(flag.set)])
                flag.set = flag.set or stop > 0
                lv, correct = loss_sum / seen, int(correct)
                dt = time.perf_counter() - t0
                acc["loss_sum"] += loss_sum
                acc["correct"] += correct
                acc["seen"] += seen
                acc["time"] += dt
                acc["cpu"] += time.process_time() - c0
                pending.append({"step": step, "epoch": epoch, "loss": lv,
                                "acc": correct / seen, "lr": lr, "time": dt})
                step += 1
                progress.step(lv)
                if on_step is not None:
                    on_step(step)
                if flag.set and i + 1 < len(batches):
                    checkpoint(epoch, i + 1, "interrupted")
                    progress.message(f"[{config.name}] interrupted; checkpoint saved in "
                                     f"{run_dir} (continue with --resume)")
                    raise KeyboardInterrupt
            t0 = time.perf_counter()
            ctx.sync_stats(model)
            val_loss, val_acc = math.nan, math.nan
            if ctx.is_main:  # the other ranks wait in their next collective
                ev = evaluate(model, data.x_test, data.y_test, config.eval_batch_size)
                val_loss, val_acc = ev.loss, ev.accuracy
            record = {
                "epoch": epoch, "train_loss": acc["loss_sum"] / acc["seen"],
                "train_acc": acc["correct"] / acc["seen"], "val_loss": val_loss,
                "val_acc": val_acc, "lr": lr_at(config, step - 1, steps_per_epoch),
                "epoch_time": acc["time"], "epoch_cpu_time": acc["cpu"],
                "eval_time": time.perf_counter() - t0,
                "steps": len(batches),
            }
            epochs.append(record)
            acc = {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0, "time": 0.0, "cpu": 0.0}
            done = epoch + 1 == config.epochs
            checkpoint(epoch + 1, 0, "complete" if done else "running")
            progress.end_epoch(config.name, record, config.epochs)
            if flag.set and not done:
                progress.message(f"[{config.name}] interrupted; checkpoint saved in {run_dir} "
                                 "(continue with --resume)")
                raise KeyboardInterrupt
    ctx.barrier()  # rank 0 has written the last checkpoint before any rank leaves
    if on_end is not None:
        on_end(model)
    if not ctx.is_main:
        return {"rank": ctx.rank, "status": "complete", "epochs_done": len(epochs)}
    return rd.read_json(run_dir / "summary.json")

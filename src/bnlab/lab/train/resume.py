"""What ``train`` finds in its run directory: a new run, an exact resume, or a refusal, never
a silent restart over finished epochs.

======================================  ====================  ==============================
the directory                           without ``--resume``  with ``--resume``
======================================  ====================  ==============================
does not exist                          a new run             refused: check ``--out``
empty (or only a lock and leftovers)    a new run             refused: it holds no run
files but no ``config.toml``            a new run, unless it  refused: not a run directory
                                        holds a checkpoint
a run stopped before its first commit   refused: pass         starts at epoch 1, and says so
                                        ``--resume``
a run whose checkpoint is gone but      refused               refused: it cannot continue
whose rows are not                                            exactly
a run with a checkpoint                 refused               continues at its step
a complete run                          refused               says so; nothing is retrained
======================================  ====================  ==============================

Log rows past the checkpoint's step (only runs written before commits existed can have them)
are dropped, and the trainer says so; rows missing before it make the run refused, since its
logs could never be whole again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import commit
from . import rundir as rd
from .config import TrainConfig
from .monitoring import MONITOR_FILE

__all__ = ["ResumeError", "RunExistsError", "Start", "check_target", "prepare"]


class RunExistsError(FileExistsError):
    """The run directory already holds a run and ``resume`` was not asked for."""


class ResumeError(ValueError):
    """``--resume`` found no run it can continue exactly."""


@dataclass
class Start:
    """Where the run starts: the checkpoint (None: step 0) and the rows kept before it."""

    ckpt: dict[str, Any] | None = None
    steps: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    monitor: list[dict] = field(default_factory=list)
    complete: bool = False  # every epoch is done: nothing to train
    dropped: dict[str, int] = field(default_factory=dict)  # rows past the checkpoint, per file
    first_commit: bool = False  # a run resumed before its first checkpoint: starts at step 0


def check_target(run_dir: Path, resume: bool) -> None:
    """Before anything is created: ``--resume`` of a directory that does not exist (a
    mistyped ``--out``) is refused instead of starting a new run there."""
    if resume and not run_dir.exists():
        raise ResumeError(f"--resume: {run_dir} does not exist, so there is no run to resume; "
                          "check --out (or drop --resume to start a new run there)")


def prepare(config: TrainConfig, run_dir: Path, resume: bool) -> Start:
    """Check ``run_dir`` against the run asked for and read what it continues from. Reads
    only (the writer has run :func:`commit.recover` first)."""
    names = sorted(p.name for p in run_dir.iterdir() if p.name != rd.LOCK)
    if not rd.is_run_dir(run_dir):
        if resume:
            if names:
                listed = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                raise ResumeError(f"--resume: {run_dir} is not a bnlab run directory (no "
                                  f"config.toml; it holds {listed}); check --out")
            raise ResumeError(f"--resume: {run_dir} holds no run (it is empty), nothing to "
                              "resume; check --out, or drop --resume to start a new run there")
        stray = sorted({rd.CHECKPOINT, commit.MANIFEST} & set(names))
        if stray:
            raise RunExistsError(f"{run_dir} holds {', '.join(stray)} but no config.toml: not "
                                 "a run bnlab can continue or write over; choose another --out")
        return Start()
    if not resume:
        raise RunExistsError(f"{run_dir} already holds a run; pass --resume to continue it or "
                             "choose another --out")
    saved = TrainConfig.from_toml(run_dir / "config.toml")
    if saved != config:
        diff = {k: (v, getattr(config, k)) for k, v in saved.to_dict().items()
                if getattr(config, k) != v}
        raise ValueError(f"{run_dir}: --resume with another config; differences (saved, "
                         f"given): {diff}")
    m = commit.read_manifest(run_dir)
    if m is not None:
        commit.verify(run_dir, m)
    ckpt = commit.load_checkpoint(run_dir, rd.CHECKPOINT_KEYS)

    def rows(name: str, key: str) -> list[dict]:
        return rd.read_jsonl(commit.committed_path(run_dir, name, m), (key,))

    steps, epochs, mon = rows("steps.jsonl", "step"), rows("epochs.jsonl", "epoch"), \
        rows(MONITOR_FILE, "step")
    if ckpt is None:
        if m is not None or steps or epochs:
            raise ResumeError(
                f"--resume: {run_dir} has no {rd.CHECKPOINT}, but {len(epochs)} epoch(s) and "
                f"{len(steps)} step(s) of the run were written; it cannot continue exactly: put "
                f"the checkpoint back, or move {run_dir} away to start again")
        return Start(first_commit=True)
    _check_config(ckpt, config, run_dir)
    step, epoch = ckpt["step"], ckpt["epoch"]
    start = Start(ckpt, [r for r in steps if r["step"] < step],
                  [r for r in epochs if r["epoch"] < epoch], [r for r in mon if r["step"] < step],
                  complete=epoch >= config.epochs and ckpt["step_in_epoch"] == 0)
    start.dropped = {n: k for n, k in (("steps.jsonl", len(steps) - len(start.steps)),
                                       ("epochs.jsonl", len(epochs) - len(start.epochs)),
                                       (MONITOR_FILE, len(mon) - len(start.monitor))) if k}
    for name, kept, key, want in (("steps.jsonl", start.steps, "step", step),
                                  ("epochs.jsonl", start.epochs, "epoch", epoch)):
        if [r[key] for r in kept] != list(range(want)):
            have = {r[key] for r in kept}
            lost = next((k for k in range(want) if k not in have), None)
            raise rd.CheckpointError(
                f"{run_dir / name}: the checkpoint is at {key} {want}, but the file holds rows "
                f"for {len(have)} of {key}s 0..{want - 1}"
                + (f" ({key} {lost} is the first missing)" if lost is not None else "")
                + "; the rows were lost (a kill between the checkpoint and the log, before "
                f"bnlab committed both at once), so the run's logs cannot be whole again: move "
                f"{run_dir} away to start the run again")
    return start


def _check_config(ckpt: dict[str, Any], config: TrainConfig, run_dir: Path) -> None:
    # The checkpoint must be this run's: a copied-in file of another run would load (or fail
    # to) only after the data, or silently continue someone else's training.
    want = config.to_dict()
    diff = {k: (v, want.get(k)) for k, v in dict(ckpt["config"]).items() if want.get(k) != v}
    if diff:
        raise ValueError(
            f"{run_dir / rd.CHECKPOINT} was written for another config than this run's; "
            f"differences (checkpoint, run): {diff}; move it away to start the run again")

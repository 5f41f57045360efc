"""Read run directories back and aggregate them over seeds. Reports use nothing else."""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..train.commit import committed_path, read_manifest
from ..train.config import TrainConfig
from ..train.monitoring import MONITOR_FILE
from ..train.rundir import is_run_dir, read_json, read_jsonl

__all__ = ["Run", "Group", "find_runs", "load_runs", "group_runs", "mean_sd", "STUDY_FILE"]

STUDY_FILE = "study.json"
METRICS = ("train_loss", "val_loss", "train_acc", "val_acc", "epoch_time")


@dataclass
class Run:
    path: Path
    config: TrainConfig
    epochs: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    summary: dict[str, Any]
    environment: dict[str, Any]
    monitor: list[dict[str, Any]] = field(default_factory=list)  # monitor.jsonl, if recorded


@dataclass
class Group:
    """The runs of one normaliser (one label), over seeds."""

    name: str
    runs: list[Run] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [r.config.seed for r in self.runs]

    def curve(self, metric: str) -> list[list[float]]:
        """``metric`` per epoch, one list per epoch holding each seed's value."""
        n = min(len(r.epochs) for r in self.runs)
        return [[r.epochs[e][metric] for r in self.runs] for e in range(n)]

    def final(self, metric: str) -> list[float]:
        return [r.epochs[-1][metric] for r in self.runs if r.epochs]

    def best(self, metric: str = "val_acc") -> list[float]:
        return [max(e[metric] for e in r.epochs) for r in self.runs if r.epochs]


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``nan`` for a single value)."""
    if not values:
        return math.nan, math.nan
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) if len(values) > 1 else math.nan)


def find_runs(paths: list[str | os.PathLike]) -> list[Path]:
    """Run directories in ``paths`` (each a run directory or a folder holding some)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such run directory")
        if is_run_dir(p):
            found.append(p)
        else:
            found += sorted(d.parent for d in p.rglob("config.toml") if is_run_dir(d.parent))
    if not found:
        raise FileNotFoundError(
            f"no run directories (folders with config.toml) under {', '.join(map(str, paths))}"
        )
    return list(dict.fromkeys(found))


def load_runs(paths: list[str | os.PathLike]) -> list[Run]:
    """The runs in ``paths``, each as of its last commit (a run being written, or killed
    while publishing a commit, is read as that commit left it)."""
    runs = []
    for d in find_runs(paths):
        m = read_manifest(d)

        def path(name: str, d: Path = d, m: dict | None = m) -> Path:
            return committed_path(d, name, m)

        epochs = read_jsonl(path("epochs.jsonl"), ("epoch", *METRICS))
        if not epochs:
            continue  # started but never finished an epoch: nothing to report
        summary = read_json(path("summary.json")) if path("summary.json").exists() else {}
        env = read_json(d / "environment.json") if (d / "environment.json").exists() else {}
        runs.append(Run(d, TrainConfig.from_toml(d / "config.toml"), epochs,
                        read_jsonl(path("steps.jsonl"), ("step", "loss")), summary, env,
                        read_jsonl(path(MONITOR_FILE), ("layer", "step"))))
    if not runs:
        raise FileNotFoundError("the run directories hold no finished epoch yet")
    return runs


def group_runs(runs: list[Run], order: list[str] | None = None) -> list[Group]:
    """Groups by run name, in ``order`` first, then in order of appearance."""
    groups: dict[str, Group] = {}
    for name in order or []:
        groups[name] = Group(name)
    for r in runs:
        groups.setdefault(r.config.name, Group(r.config.name)).runs.append(r)
    return [g for g in groups.values() if g.runs]


def study_info(paths: list[str | os.PathLike]) -> dict[str, Any]:
    """``study.json`` of the first path that has one (written by ``bnlab run``), else {}."""
    for p in map(Path, paths):
        if (p / STUDY_FILE).is_file():
            return read_json(p / STUDY_FILE)
    return {}

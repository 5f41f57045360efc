"""The files of a run directory, each written atomically (temporary file, then ``os.replace``).

::

    RUN_DIR/
      config.toml        the resolved TrainConfig (loads back with TrainConfig.from_toml)
      environment.json   versions, threads, git revision, machine
      steps.jsonl        one record per optimisation step: step, epoch, loss, acc, lr, time
      epochs.jsonl       one record per epoch: train/val loss and accuracy, lr, times
      summary.json       final and best accuracy, status, time per epoch
      checkpoint.pt      model, optimizer, position and RNG state (torch.save)

A crash never leaves a half-written file under one of these names.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_write_text",
    "write_json",
    "read_json",
    "read_jsonl",
    "write_jsonl",
    "save_checkpoint",
    "load_checkpoint",
    "run_environment",
    "git_revision",
    "is_run_dir",
]

CHECKPOINT = "checkpoint.pt"


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def save_checkpoint(run_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    path = Path(run_dir) / CHECKPOINT
    tmp = _tmp(path)
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint of ``run_dir``, loaded with ``weights_only=True``, or None if absent."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def git_revision() -> str | None:
    """``<commit>`` (``+dirty`` if there are local changes) of the checkout bnlab runs from."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty.strip() else "")


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def run_environment() -> dict[str, Any]:
    """What :func:`bnlab.commands.info.environment` reports, plus git revision and CPUs."""
    from ..commands.info import environment

    env = environment()
    env.update({
        "git_revision": git_revision(),
        "cpu_count": os.cpu_count(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        # Other processes slow a run down: the load when it started explains odd timings.
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    })
    return env


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.toml").is_file()

"""The files of a run directory, each written atomically (temporary file, then ``os.replace``).

::

    RUN_DIR/
      config.toml        the resolved TrainConfig (loads back with TrainConfig.from_toml)
      environment.json   versions, threads, git revision, machine
      steps.jsonl        one record per optimisation step: step, epoch, loss, acc, lr, time
      epochs.jsonl       one record per epoch: train/val loss and accuracy, lr, times
      summary.json       final and best accuracy, status, time per epoch
      checkpoint.pt      model, optimizer, position and RNG state (torch.save)
      checkpoint.pt.sha256  the checkpoint's SHA-256, written with it, checked before use
      .lock              held (flock) by the run writing the directory; names its pid

A crash never leaves a half-written file under one of these names, a damaged checkpoint is
refused rather than resumed from, and two runs never write one directory at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import platform
import subprocess
from collections.abc import Iterator
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
    "lock_run_dir",
    "RunLockedError",
    "CheckpointError",
]

CHECKPOINT = "checkpoint.pt"
DIGEST = CHECKPOINT + ".sha256"
LOCK = ".lock"


class RunLockedError(RuntimeError):
    """Another process is writing the run directory."""


class CheckpointError(RuntimeError):
    """A checkpoint file is damaged or not a bnlab checkpoint."""


@contextlib.contextmanager
def lock_run_dir(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the run directory's exclusive lock for the ``with`` block.

    Raises :class:`RunLockedError`, naming the directory and the holder's pid, when another
    process holds it. The lock (``flock``) goes away with its process, so a crashed run never
    leaves the directory locked.
    """
    path = Path(run_dir) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunLockedError(
                f"{run_dir} is being written by another bnlab run (pid {holder}); wait for it "
                "to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``path`` through a temporary file and ``os.replace``; on any failure (a full
    disk) the temporary file is removed and ``path`` keeps its previous content."""
    path = Path(path)
    tmp = _tmp(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    """Write ``checkpoint.pt`` atomically, and its SHA-256 beside it."""
    path = Path(run_dir) / CHECKPOINT
    tmp = _tmp(path)
    # Serialised in memory first: torch.save straight to a full disk fails with an opaque
    # "unexpected pos" RuntimeError; a plain write fails with ENOSPC and the file's name.
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getbuffer()
    digest = hashlib.sha256(data).hexdigest()
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror} (writing {path.name}; the previous checkpoint "
                      "is kept)", str(path)) from e
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(Path(run_dir) / DIGEST, f"{digest}  {CHECKPOINT}\n")
    return path


def load_checkpoint(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint of ``run_dir``, loaded with ``weights_only=True``, or None if absent.

    Raises :class:`CheckpointError`, naming the file, when its SHA-256 differs from the one
    recorded when it was written (a damaged file is never resumed from) or it does not load.
    """
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    digest_file = Path(run_dir) / DIGEST
    if digest_file.exists():  # runs written before digests existed have none
        want = digest_file.read_text(encoding="utf-8").split()[0]
        got = _sha256(path)
        if got != want:
            raise CheckpointError(
                f"{path}: SHA-256 {got[:16]}... differs from {want[:16]}... recorded in "
                f"{digest_file.name} when it was written; the file is damaged, refusing to "
                "resume from it (move it away to start the run again)"
            )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise CheckpointError(f"{path}: not a readable bnlab checkpoint ({e})") from e


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

"""The files of a run directory, each written atomically (temporary file, then ``os.replace``).

::

    RUN_DIR/
      config.toml        the resolved TrainConfig (loads back with TrainConfig.from_toml)
      environment.json   versions, threads, git revision, machine
      steps.jsonl        one record per optimisation step: step, epoch, loss, acc, lr, time
      epochs.jsonl       one record per epoch: train/val loss and accuracy, lr, times
      summary.json       final and best accuracy, status, time per epoch
      checkpoint.pt      model, optimizer, position and RNG state (torch.save)
      manifest.json      the last commit: its step and each file's SHA-256 (see commit.py)
      .lock              held (flock) by the run writing the directory; names its pid

The checkpoint and the log rows it goes with are committed together, once per epoch
(:mod:`bnlab.lab.train.commit`): a kill at any point leaves the previous commit or the new
one, a damaged file is refused rather than resumed from, and two runs never write one
directory at once. Every write passes :func:`fault_point` first, where the tests kill the
process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import platform
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_write_text",
    "atomic_write_bytes",
    "make_out_dir",
    "new_out_dir",
    "write_json",
    "json_bytes",
    "jsonl_bytes",
    "read_json",
    "read_jsonl",
    "write_jsonl",
    "write_synced",
    "fsync_dir",
    "fault_point",
    "checkpoint_bytes",
    "CHECKPOINT",
    "LOCK",
    "run_environment",
    "git_revision",
    "is_run_dir",
    "lock_run_dir",
    "RunLockedError",
    "CheckpointError",
]

CHECKPOINT = "checkpoint.pt"
#: the checkpoint's digest as runs written before manifest.json kept it (still read)
DIGEST = CHECKPOINT + ".sha256"
LOCK = ".lock"
#: what the training loop stores in a checkpoint and resuming reads
CHECKPOINT_KEYS = ("model", "optimizer", "rng", "epoch", "step_in_epoch", "step",
                   "accumulators", "config")


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


_faults = {"count": 0}


def fault_point(name: str) -> None:
    """Where the tests kill a run: every write of a run directory passes here first.

    ``BNLAB_FAULT_TRACE=FILE`` appends each point's name to FILE; ``BNLAB_KILL_AT=N`` kills
    the process with SIGKILL (no handler, no cleanup, like a power cut to the program) at its
    N-th point. Neither is set outside tests, and then this does nothing.
    """
    trace, kill_at = os.environ.get("BNLAB_FAULT_TRACE"), os.environ.get("BNLAB_KILL_AT")
    if not (trace or kill_at):
        return
    _faults["count"] += 1
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(name + "\n")
    if kill_at and _faults["count"] == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)


def write_synced(path: Path, data: bytes | memoryview, name: str) -> None:
    """Write ``data`` to the new file ``path`` and fsync it (fault points ``write NAME``, and
    ``half NAME`` with half of it written: a torn write)."""
    fault_point(f"write {name}")
    with path.open("wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        fault_point(f"half {name}")
        f.write(data[len(data) // 2 :])
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make the renames in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``path`` through a temporary file and ``os.replace``; on any failure (a full
    disk) the temporary file is removed, ``path`` keeps its previous content (or stays absent:
    never a 0-byte or half-written file) and the error names ``path``."""
    path = Path(path)
    tmp = _tmp(path)
    try:
        write_synced(tmp, data, path.name)
        fault_point(f"rename {path.name}")
        os.replace(tmp, path)
    except OSError as e:
        if e.strerror is None:
            raise
        raise OSError(e.errno, f"{e.strerror} (writing {path.name}; nothing was written "
                      "under that name)", str(path)) from e
    finally:
        with contextlib.suppress(OSError):  # also when tmp's directory is not one
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def make_out_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Create directory ``path`` (and its parents) for ``option``; a file in the way is a
    one-line error naming it, not ``[Errno 17] File exists``."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            where = "is a file" if p == path else f"is under {p}, which is a file"
            raise NotADirectoryError(f"{option} {path} {where}; {option} must be a directory")
        if p.is_dir():
            break
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def new_out_dir(path: str | os.PathLike, option: str = "--out") -> Iterator[Path]:
    """:func:`make_out_dir` for the ``with`` block; if the block fails before it wrote
    anything but the lock, the directory is left as it was: the lock file goes if the block
    made it, and so do the directories it created (a refused run leaves no folder holding a
    ``.lock`` behind)."""
    path = Path(path)
    created = [p for p in (path, *path.parents) if not p.exists()]
    before = {p.name for p in path.iterdir()} if path.is_dir() else set()
    make_out_dir(path, option)
    try:
        yield path
    except BaseException:
        if LOCK not in before and {p.name for p in path.iterdir()} <= before | {LOCK}:
            with contextlib.suppress(OSError):
                (path / LOCK).unlink(missing_ok=True)
                for p in created:  # deepest first; stops at the first that is not empty
                    p.rmdir()
        raise


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode("utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from e


def read_jsonl(path: str | os.PathLike, keys: tuple[str, ...] = ()) -> list[dict]:
    """The records of a JSON-lines file ([] when it is absent); a damaged line, or a record
    that is not an object holding every one of ``keys``, is an error naming the file and the
    line."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} is not JSON ({e}); was the file cut short "
                                 "or edited?") from e
            missing = [k for k in keys if not isinstance(record, dict) or k not in record]
            if missing:
                raise ValueError(f"{path}: line {n} lacks {', '.join(map(repr, missing))}; "
                                 "was the file edited or written by another program?")
            out.append(record)
    return out


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    atomic_write_bytes(path, jsonl_bytes(records))


def checkpoint_bytes(state: dict[str, Any]) -> bytes:
    """``state`` as ``torch.save`` writes it, in memory: torch.save straight to a full disk
    fails with an opaque "unexpected pos" RuntimeError; a plain write fails with ENOSPC and
    the file's name."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


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
    """What :func:`bnlab.lab.commands.info.environment` reports, plus git revision and CPUs."""
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

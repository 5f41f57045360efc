"""A run directory as one transaction per checkpoint: the checkpoint and the log rows it goes
with become visible together.

::

    RUN_DIR/manifest.json   {"format": "bnlab.run/1", "generation": G, "step": S,
                             "epoch": E, "files": {NAME: {"sha256": ..., "bytes": ...}}}

:func:`commit` writes every file of the new state (``checkpoint.pt``, ``steps.jsonl``,
``epochs.jsonl``, ``monitor.jsonl``, ``summary.json``) under a staged name ``.NAME.gG`` and
fsyncs it, then writes ``manifest.json`` naming them with their SHA-256 and replaces the old
one with a single ``os.replace``: the commit point. Only then is each staged file renamed to
its name (publishing). So a kill at any instruction leaves

* before the manifest's rename: the previous commit, whole; the staged files of the
  unfinished one are removed by the next writer (:func:`recover`, which ``--resume`` runs
  and reports);
* after it: the new commit, whose files not yet renamed :func:`recover` renames.

Readers that do not write (reports) take each file from :func:`committed_path`, so they see
the last commit even before it is published. :func:`load_checkpoint` checks the checkpoint
against the manifest's SHA-256 before loading it with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from . import rundir as rd

__all__ = ["MANIFEST", "commit", "recover", "read_manifest", "committed_path",
           "load_checkpoint", "verify"]

MANIFEST = "manifest.json"
FORMAT = "bnlab.run/1"
#: the files the trainer writes: only their staged or temporary copies are ever removed
_OURS = ("config.toml", "environment.json", "steps.jsonl", "epochs.jsonl", "monitor.jsonl",
         "summary.json", rd.CHECKPOINT, MANIFEST)
_LEFTOVER = re.compile(r"\.(" + "|".join(map(re.escape, _OURS)) + r")\.(g\d+|tmp\d+)")


def _staged(run_dir: Path, name: str, generation: int) -> Path:
    return run_dir / f".{name}.g{generation}"


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The last commit of ``run_dir`` (None: nothing committed yet, or a run written before
    manifests); a manifest that is not one is a :class:`~.rundir.CheckpointError`."""
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise rd.CheckpointError(f"{path}: not JSON ({e}); bnlab writes it in one rename, so "
                                 "the file was damaged or edited") from e
    ok = (isinstance(m, dict) and m.get("format") == FORMAT
          and isinstance(m.get("generation"), int) and isinstance(m.get("files"), dict)
          and all(isinstance(f, dict) and isinstance(f.get("sha256"), str)
                  for f in m["files"].values()))
    if not ok:
        raise rd.CheckpointError(f"{path}: not a bnlab run manifest (expected format "
                                 f"{FORMAT!r} with generation and files)")
    return m


def commit(run_dir: str | os.PathLike, files: dict[str, bytes], **meta: Any) -> dict[str, Any]:
    """Make ``files`` (name -> content) the run directory's new state, all or nothing;
    ``meta`` (step, epoch) goes into the manifest. Returns the manifest.

    On a write error (a full disk) the staged files are removed, the previous commit stays
    and the OSError names the file.
    """
    run_dir = Path(run_dir)
    old = read_manifest(run_dir)
    generation = (old["generation"] if old else 0) + 1
    m = {"format": FORMAT, "generation": generation, **meta,
         "files": {n: {"sha256": _sha256(d), "bytes": len(d)} for n, d in files.items()}}
    written: list[Path] = []
    name = MANIFEST
    try:
        for name, data in files.items():
            written.append(_staged(run_dir, name, generation))
            rd.write_synced(written[-1], data, name)
        name = MANIFEST
        written.append(_staged(run_dir, MANIFEST, generation))
        rd.write_synced(written[-1], (json.dumps(m, indent=2, sort_keys=True) + "\n").encode(),
                        MANIFEST)
        rd.fault_point(f"commit {MANIFEST}")
        os.replace(written[-1], run_dir / MANIFEST)  # the commit point
    except OSError as e:
        for p in written:
            p.unlink(missing_ok=True)
        if e.strerror is None:
            raise
        raise OSError(e.errno, f"{e.strerror} (writing {name} for step {meta.get('step')}; "
                      "the previous checkpoint and logs are kept)",
                      str(run_dir / name)) from e
    rd.fsync_dir(run_dir)
    _publish(run_dir, m)
    return m


def _publish(run_dir: Path, m: dict[str, Any]) -> None:
    """Rename the staged files of commit ``m`` to their names (those already renamed are
    skipped: publishing again after a kill is harmless)."""
    for name in m["files"]:
        rd.fault_point(f"publish {name}")
        try:
            os.replace(_staged(run_dir, name, m["generation"]), run_dir / name)
        except FileNotFoundError:
            pass
    (run_dir / rd.DIGEST).unlink(missing_ok=True)  # an older run's digest: the manifest's now
    rd.fsync_dir(run_dir)


def recover(run_dir: str | os.PathLike) -> tuple[dict[str, Any] | None, list[str]]:
    """For the directory's writer (it holds the lock), before anything else: publish the last
    commit if a kill cut its publishing short, and remove what an unfinished commit or write
    left (staged and temporary copies of bnlab's own files; nothing else is touched).

    Returns the manifest and the names removed.
    """
    run_dir = Path(run_dir)
    m = read_manifest(run_dir)
    if m is not None:
        _publish(run_dir, m)
    removed = sorted(p.name for p in run_dir.iterdir() if _LEFTOVER.fullmatch(p.name))
    for name in removed:
        (run_dir / name).unlink(missing_ok=True)
    return m, removed


def committed_path(run_dir: str | os.PathLike, name: str,
                   m: dict[str, Any] | None = None) -> Path:
    """Where a reader finds file ``name`` of the last commit: its staged copy while the commit
    is not yet published, else the file under its name."""
    run_dir = Path(run_dir)
    m = m if m is not None else read_manifest(run_dir)
    if m is not None and name in m["files"]:
        staged = _staged(run_dir, name, m["generation"])
        if staged.exists():
            return staged
    return run_dir / name


def _read_committed(run_dir: Path, name: str, m: dict[str, Any]) -> bytes:
    """The bytes of file ``name`` of commit ``m``, checked against its SHA-256."""
    path = run_dir / name
    try:
        data = committed_path(run_dir, name, m).read_bytes()
    except FileNotFoundError:
        try:  # published between the look and the read
            data = path.read_bytes()
        except FileNotFoundError:
            raise rd.CheckpointError(
                f"{path} is missing, but {MANIFEST} records it (step {m.get('step')}); the run "
                "cannot continue exactly without it: put it back, or move the run directory "
                "away to start again") from None
    want, got = m["files"][name]["sha256"], _sha256(data)
    if got != want:
        raise rd.CheckpointError(
            f"{path}: SHA-256 {got[:16]}... differs from {want[:16]}... recorded in "
            f"{MANIFEST} when it was written; the file is damaged or was edited, refusing to "
            "resume from it (move the run directory away to start the run again)")
    return data


def verify(run_dir: str | os.PathLike, m: dict[str, Any]) -> None:
    """Check every file of commit ``m`` against its SHA-256 (a CheckpointError naming the
    first that is missing or differs)."""
    for name in m["files"]:
        _read_committed(Path(run_dir), name, m)


def _legacy_digest(run_dir: Path) -> str | None:
    """The SHA-256 in ``checkpoint.pt.sha256`` (runs written before manifests), or None."""
    path = run_dir / rd.DIGEST
    if not path.exists():
        return None
    words = path.read_text(encoding="utf-8", errors="replace").split()
    if not words or not re.fullmatch(r"[0-9a-f]{64}", words[0]):
        what = "is empty" if not words else f"holds {words[0][:20]!r}"
        raise rd.CheckpointError(
            f"{path} {what}, not the SHA-256 of {rd.CHECKPOINT}; if the checkpoint is intact, "
            f"delete {path.name} to resume without the check")
    return words[0]


def load_checkpoint(run_dir: str | os.PathLike, keys: tuple[str, ...] = ()
                    ) -> dict[str, Any] | None:
    """The committed checkpoint of ``run_dir``, loaded with ``weights_only=True``, or None if
    there is none.

    Raises :class:`~.rundir.CheckpointError`, naming the file, when its SHA-256 differs from
    the one recorded when it was written (``manifest.json``, or ``checkpoint.pt.sha256`` in
    older runs), it is missing though committed, it does not load, or it is not a dict
    holding every one of ``keys`` (the training loop passes ``CHECKPOINT_KEYS``: a foreign
    file is refused before any data is loaded).
    """
    run_dir = Path(run_dir)
    path = run_dir / rd.CHECKPOINT
    m = read_manifest(run_dir)
    if m is not None and rd.CHECKPOINT in m["files"]:
        data = _read_committed(run_dir, rd.CHECKPOINT, m)
    elif not path.exists():
        return None
    else:
        want = _legacy_digest(run_dir)
        data = path.read_bytes()
        if want is not None and _sha256(data) != want:
            raise rd.CheckpointError(
                f"{path}: SHA-256 {_sha256(data)[:16]}... differs from {want[:16]}... recorded "
                f"in {rd.DIGEST} when it was written; the file is damaged, refusing to resume "
                "from it (move it away to start the run again)")
    if not data:
        raise rd.CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint; move it away "
                                 "to start the run again")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
        from bnlab.tools._factory import load_error

        raise rd.CheckpointError(f"{path}: not a readable bnlab checkpoint "
                                 f"({load_error(e)})") from e
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        got = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise rd.CheckpointError(f"{path}: not a bnlab training checkpoint: expected keys "
                                 f"{', '.join(keys)}; missing {', '.join(missing)} "
                                 f"(got {got})")
    return state

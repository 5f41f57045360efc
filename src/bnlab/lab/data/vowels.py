"""Japanese Vowels (Kudo, Toyama & Shimbo 1999): where its two ``.ts`` files live, how they are
checked, fetched and loaded.

Nine male speakers said the vowel pair /ae/; each utterance is a series of 12 LPC cepstrum
coefficients over 7 to 29 frames, and the task is the speaker (9 classes). The UEA archive's
split has 270 training utterances (30 per speaker) and 370 test utterances (24 to 88 per
speaker). The files are the ones the ``aeon`` package ships
(``aeon/datasets/data/JapaneseVowels/JapaneseVowels_{TRAIN,TEST}.ts``); bnlab reads them
itself (:mod:`.ts`) and never imports aeon, whose dependencies (numba, llvmlite, pandas,
scikit-learn, scipy) come to about 590 MB installed.

Discovery order (the first directory holding both files with their recorded SHA-256 wins):
``--data-dir``, ``$BNLAB_DATA``, the per-user cache (each as ``ROOT/japanese-vowels`` and
``ROOT``), then an installed aeon's data directory, found without importing aeon.
:func:`download` (``bnlab data download japanese-vowels``, run by ``make setup``) fetches aeon's
wheel alone with pip (``pip download aeon==1.6.0 --no-deps``, 6.4 MB, checked against its
SHA-256 by pip's hash-checking mode), takes the two files out of it, checks them and moves
them into place with an atomic rename.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from .idx import sha256
from .sequences import SequenceDataset, Sequences, pad
from .sources import DataNotFoundError, DownloadError, cache_dir, check_data_dir, data_roots
from .ts import read_ts

__all__ = ["NAME", "FILES", "AEON_VERSION", "find_vowels", "verify_vowels", "download",
           "load_japanese_vowels"]

NAME = "japanese-vowels"
AEON_VERSION = "1.6.0"
AEON_WHEEL_SHA256 = "d05227086706f80111ac5fee8de4d5d3115bb3bcfd1c786c8629393055816409"
_IN_WHEEL = "aeon/datasets/data/JapaneseVowels/"
#: split -> (file name, SHA-256 of the file as aeon 1.6.0 ships it, number of series)
FILES = {
    "train": ("JapaneseVowels_TRAIN.ts",
              "68a430eabd919cc77f40b1f5f3bc0dcafacc1486bca9260785aeb7d262cc78cd", 270),
    "test": ("JapaneseVowels_TEST.ts",
             "b3d41d6a0ca3bcad3afb9ca7d4365382aa51341e2e58bae2a574babdda5b9462", 370),
}
FETCH = "bnlab data download japanese-vowels"


def _aeon_dir() -> Path | None:
    """aeon's data directory for the set, if aeon is installed (``find_spec`` locates the
    package without running its ``__init__``)."""
    try:
        spec = importlib.util.find_spec("aeon")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / \
        "JapaneseVowels"


def search_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    dirs = data_roots(NAME, data_dir)
    aeon = _aeon_dir()
    return dirs + ([aeon] if aeon is not None else [])


def _instructions(dirs: list[Path]) -> str:
    names = " and ".join(f for f, _, _ in FILES.values())
    return "\n".join([
        f"dataset {NAME!r} not found. Put {names} (aeon {AEON_VERSION}'s {_IN_WHEEL}) in one "
        "of:", *(f"  {d}" for d in dirs),
        f"or run `{FETCH}` (pip fetches aeon's wheel alone, 6.4 MB; `make setup` runs it), or "
        "pass --data-dir DIR / set BNLAB_DATA=DIR.",
    ])


def find_vowels(data_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Paths of the train and test files from the first directory holding both with their
    recorded SHA-256. A ``data_dir`` given is used or refused, never silently replaced."""
    check_data_dir(data_dir)
    dirs = search_dirs(data_dir)
    problems: list[str] = []
    for i, d in enumerate(dirs):
        if data_dir and i == 2:
            raise DataNotFoundError(f"--data-dir {data_dir} holds neither of {NAME}'s files "
                                    f"(looked in {dirs[0]} and {dirs[1]})")
        paths = {k: d / f for k, (f, _, _) in FILES.items()}
        present = [p.is_file() for p in paths.values()]
        if not any(present):
            continue
        if not all(present):
            lacking = ", ".join(p.name for p in paths.values() if not p.is_file())
            problems.append(f"{d} lacks {lacking}")
        else:
            bad = [f"{p.name} has SHA-256 {sha256(p.read_bytes())}, expected {FILES[k][1]}"
                   for k, p in paths.items() if sha256(p.read_bytes()) != FILES[k][1]]
            if not bad:
                return paths
            problems.append(f"{d}: {'; '.join(bad)}")
        if data_dir and i < 2:
            raise DataNotFoundError(f"--data-dir {data_dir}: {problems[-1]}; run `{FETCH}` "
                                    "for the recorded files")
    raise DataNotFoundError(_instructions(dirs) + "".join(f"\n({p})" for p in problems))


def verify_vowels(data_dir: str | os.PathLike | None = None) -> list[dict]:
    """One record per file (``file, path, ok, sha256, message``), as :func:`.sources.verify`:
    the SHA-256 and the ``.ts`` content (series count, 12 dimensions, lengths 7 to 29)."""
    out = []
    for k, path in find_vowels(data_dir).items():
        name, digest, count = FILES[k]
        rec = {"file": name, "path": str(path), "ok": False, "sha256": digest, "message": ""}
        data = read_ts(path)
        lengths = data.lengths
        if len(data.series) != count or data.dimensions != 12:
            rec["message"] = (f"{len(data.series)} series of {data.dimensions} dimensions, "
                              f"expected {count} of 12")
        else:
            rec["ok"] = True
            rec["message"] = (f"ok (SHA-256 matches; {count} series, 12 dimensions, lengths "
                              f"{min(lengths)} to {max(lengths)})")
        out.append(rec)
    return out


def _pip_download(dest: Path) -> subprocess.CompletedProcess:
    req = dest / "aeon-requirement.txt"
    req.write_text(f"aeon=={AEON_VERSION} --hash=sha256:{AEON_WHEEL_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-r", str(req), "-d", str(dest)]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def download(dest: str | os.PathLike | None = None, *,
             fetch: Callable[[Path], subprocess.CompletedProcess] = _pip_download) -> Path:
    """Put the two files in ``dest`` (default: the per-user cache's ``japanese-vowels/``).

    Files already there with their recorded SHA-256 are kept; otherwise ``fetch(tmpdir)``
    (pip by default) puts aeon's wheel in a temporary directory, the files are read out of it,
    checked, and moved into place atomically. Raises :class:`DownloadError` naming what failed.
    """
    target = Path(dest) if dest else cache_dir() / NAME
    wanted = {k: target / f for k, (f, _, _) in FILES.items()}
    if all(p.is_file() and sha256(p.read_bytes()) == FILES[k][1] for k, p in wanted.items()):
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        done = fetch(Path(tmp))
        wheels = sorted(Path(tmp).glob(f"aeon-{AEON_VERSION}-*.whl"))
        if done.returncode != 0 or not wheels:
            tail = " ".join((done.stderr or done.stdout or "").split())[-400:]
            raise DownloadError(f"could not fetch aeon {AEON_VERSION}'s wheel with pip (exit "
                                f"{done.returncode}): {tail}\n" + _instructions(search_dirs()))
        with zipfile.ZipFile(wheels[0]) as z:
            for k, p in wanted.items():
                name, digest, _ = FILES[k]
                try:
                    content = z.read(_IN_WHEEL + name)
                except KeyError:
                    raise DownloadError(f"{wheels[0].name} has no {_IN_WHEEL}{name}") from None
                if sha256(content) != digest:
                    raise DownloadError(f"{wheels[0].name}: {name} has SHA-256 "
                                        f"{sha256(content)}, expected {digest}")
                part = p.with_name(p.name + f".tmp{os.getpid()}")
                part.write_bytes(content)
                os.replace(part, p)
    return target


def load_japanese_vowels(data_dir: str | os.PathLike | None = None) -> SequenceDataset:
    """The 270 training and 370 test utterances as :class:`.Sequences`: float32
    ``(N, 12, 29)`` zero-padded after each utterance's own 7 to 29 frames, speakers 0..8."""
    paths = find_vowels(data_dir)
    splits = {}
    for k, path in paths.items():
        data = read_ts(path)
        index = {c: i for i, c in enumerate(data.class_labels)}
        x, lengths = pad(data.series, 29)
        y = torch.tensor([index[c] for c in data.labels], dtype=torch.int64)
        splits[k] = Sequences(x, lengths, y)
    return SequenceDataset(NAME, splits["train"], splits["test"], source=str(
        paths["train"].parent), num_classes=9)

"""Where MNIST and Fashion-MNIST live on disk, how to find them, verify them and download them.

Discovery order (the first directory holding all four files wins): ``--data-dir``,
``$BNLAB_DATA``, the per-user cache (``$XDG_CACHE_HOME/bnlab``, default ``~/.cache/bnlab``),
then the Debian locations (``/usr/share/datasets/<name>/``). Each directory may hold the files
directly or in a ``<name>/`` subdirectory, gzip-compressed (``.gz``) or raw.

Checksums are SHA-256 of the *decompressed* content: Debian recompresses the ``.gz`` files, so
their bytes differ from upstream's while their content is the same.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .idx import IDXError, decompressed_bytes, read_idx_bytes, sha256

__all__ = [
    "IdxFile",
    "DatasetSpec",
    "SPECS",
    "DataNotFoundError",
    "DownloadError",
    "search_dirs",
    "check_data_dir",
    "find_files",
    "verify",
    "download",
    "cache_dir",
]

KEYS = ("train_images", "train_labels", "test_images", "test_labels")


@dataclass(frozen=True)
class IdxFile:
    """One of a dataset's four files: its name, shape and checksum."""

    name: str
    shape: tuple[int, ...]
    #: SHA-256 of the decompressed content, or None where no trusted value is recorded
    sha256: str | None
    #: MD5 of the upstream ``.gz`` as published by the dataset's authors (checked on download)
    gz_md5: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: dict[str, IdxFile]
    mirrors: tuple[str, ...]
    debian_dirs: tuple[str, ...]
    debian_package: str | None


def _files(train: int, test: int, sums: dict[str, tuple[str | None, str | None]]) -> dict:
    names = {
        "train_images": ("train-images-idx3-ubyte", (train, 28, 28)),
        "train_labels": ("train-labels-idx1-ubyte", (train,)),
        "test_images": ("t10k-images-idx3-ubyte", (test, 28, 28)),
        "test_labels": ("t10k-labels-idx1-ubyte", (test,)),
    }
    return {k: IdxFile(n, s, *sums[k]) for k, (n, s) in names.items()}


SPECS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        # Decompressed SHA-256 measured on Debian's dataset-fashion-mnist (bookworm); the .gz
        # MD5s are the ones the Fashion-MNIST repository publishes.
        files=_files(60000, 10000, {
            "train_images": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                             "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            "train_labels": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                             "25c81989df183df01b3e8a0aad5dffbe"),
            "test_images": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                            "bef4ecab320f06d8554ea6380940ec79"),
            "test_labels": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                            "bb300cfdad3c16e7a12a480ee83cd310"),
        }),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        debian_dirs=("/usr/share/datasets/fashion-mnist",),
        debian_package="dataset-fashion-mnist",
    ),
    "mnist": DatasetSpec(
        name="mnist",
        # No copy of MNIST was on the machines bnlab was built on and no authoritative
        # publication of its decompressed SHA-256s could be checked, so none is recorded (a
        # wrong value would refuse the real files). MNIST is recognised instead by its IDX
        # structure (magic, unsigned bytes, shapes 60000/10000 x 28 x 28, labels 0..9) and by
        # *not* having Fashion-MNIST's recorded content, which carries the same file names:
        # find_files passes over and verify marks BAD any file with Fashion-MNIST's SHA-256.
        # Downloads are checked against the .gz MD5s MNIST's publishers list.
        files=_files(60000, 10000, {
            "train_images": (None, "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            "train_labels": (None, "d53e105ee54ea40749a09fcbcd1e9432"),
            "test_images": (None, "9fb629c4189551a2d022fa330f9573f3"),
            "test_labels": (None, "ec29112dd5afa0611ce80d1b7f02629c"),
        }),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        debian_dirs=("/usr/share/datasets/mnist",),
        debian_package=None,
    ),
}


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are in none of the searched directories."""


class DownloadError(RuntimeError):
    """A download failed (no network, every mirror failed, or a checksum did not match)."""


def _spec(name: str) -> DatasetSpec:
    if name not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; IDX datasets: {', '.join(sorted(SPECS))}")
    return SPECS[name]


def cache_dir() -> Path:
    """The per-user data cache: ``$XDG_CACHE_HOME/bnlab`` or ``~/.cache/bnlab``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bnlab"


def data_roots(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where every dataset is looked for, in order: ``data_dir``, ``$BNLAB_DATA``, the cache;
    each root as ``root/name`` and then ``root`` itself."""
    roots: list[Path] = []
    if data_dir:
        roots.append(Path(data_dir))
    if os.environ.get("BNLAB_DATA"):
        roots.append(Path(os.environ["BNLAB_DATA"]))
    roots.append(cache_dir())
    return [d for root in roots for d in (root / name, root)]


def search_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The directories searched for dataset ``name``, in order."""
    spec = _spec(name)
    return data_roots(name, data_dir) + [Path(d) for d in spec.debian_dirs]


def _file_in(directory: Path, f: IdxFile) -> Path | None:
    for candidate in (directory / (f.name + ".gz"), directory / f.name):
        if candidate.is_file():
            return candidate
    return None


def _why_missing(directory: Path, f: IdxFile) -> str:
    """``lacks NAME``, and what stands under its name instead (a directory, a broken link)."""
    odd = []
    for candidate in (directory / (f.name + ".gz"), directory / f.name):
        if candidate.is_symlink() and not candidate.exists():
            odd.append(f"{candidate.name} is a broken link to {os.readlink(candidate)}")
        elif candidate.is_dir():
            odd.append(f"{candidate.name} is a directory, not a file")
        elif candidate.exists():
            odd.append(f"{candidate.name} is not a regular file")
    return f"lacks {f.name}" + (f" ({'; '.join(odd)})" if odd else "")


def _instructions(spec: DatasetSpec, dirs: list[Path]) -> str:
    names = ", ".join(f.name + "[.gz]" for f in spec.files.values())
    lines = [
        f"dataset {spec.name!r} not found. Put its four IDX files ({names}) in one of:",
        *(f"  {d}" for d in dirs),
        f"or pass --data-dir DIR / set BNLAB_DATA=DIR, or run `bnlab data download {spec.name}` "
        "on a machine with a network.",
    ]
    if spec.debian_package:
        lines.append(f"On Debian/Ubuntu: sudo apt-get install {spec.debian_package}")
    else:
        lines.append("No Debian package ships it.")
    return "\n".join(lines)


def _belongs_to(name: str, found: dict[str, Path]) -> str | None:
    """The other dataset whose recorded content these files have (MNIST and Fashion-MNIST
    share file names), or ``None``. Reads only the test labels (10 KB)."""
    try:
        digest = sha256(decompressed_bytes(found["test_labels"]))
    except (OSError, IDXError):
        return None  # unreadable: verify() and the loader report it
    for other, spec in SPECS.items():
        if other != name and spec.files["test_labels"].sha256 == digest:
            return other
    return None


def check_data_dir(data_dir: str | os.PathLike | None) -> None:
    """Raise :class:`DataNotFoundError` naming ``--data-dir`` unless it is empty (not given) or
    an existing directory."""
    if data_dir and not Path(data_dir).is_dir():
        what = "is not a directory" if Path(data_dir).exists() else "does not exist"
        raise DataNotFoundError(f"--data-dir {data_dir} {what}; give a directory holding "
                                "the dataset's IDX files (see bnlab data list)")


def find_files(name: str, data_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Paths of the four files of ``name`` from the first directory that has all of them.

    Files are recognised by content as well as by name: a directory holding another known
    dataset's files (Fashion-MNIST's carry MNIST's names) is passed over. An explicit
    ``data_dir`` is used or refused, never silently replaced by another directory: one that
    does not exist, holds none of the files, some but not all, or another dataset's, is an
    error.
    """
    spec = _spec(name)
    wanted = ", ".join(f.name + "[.gz]" for f in spec.files.values())
    check_data_dir(data_dir)
    dirs = search_dirs(name, data_dir)
    problems: list[str] = []
    for i, d in enumerate(dirs):
        if data_dir and i == 2:  # the user's two directories held none of the files
            raise DataNotFoundError(f"--data-dir {data_dir} holds none of {name}'s files "
                                    f"(looked in {dirs[0]} and {dirs[1]} for {wanted})")
        found = {k: _file_in(d, f) for k, f in spec.files.items()}
        if not all(found.values()):
            if not any(found.values()):
                continue
            missing = [_why_missing(d, f) for k, f in spec.files.items() if not found[k]]
            problems.append(f"{d} {', '.join(missing)}")
        else:
            other = _belongs_to(name, found)  # type: ignore[arg-type]
            if other is None:
                return found  # type: ignore[return-value]
            problems.append(f"{d} holds {other}'s files, not {name}'s")
        if data_dir and i < 2:  # the user's own directory: refuse, do not fall back
            raise DataNotFoundError(f"--data-dir {data_dir}: {problems[-1]}; {name} needs "
                                    f"{wanted}")
    raise DataNotFoundError(_instructions(spec, dirs) + "".join(f"\n({p})" for p in problems))


def _owner(name: str, key: str, digest: str) -> str | None:
    """The other dataset whose ``key`` file has content SHA-256 ``digest``, or None."""
    for other, spec in SPECS.items():
        if other != name and spec.files[key].sha256 == digest:
            return other
    return None


def verify(name: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Check each file of ``name``: IDX structure, shape and decompressed SHA-256.

    Returns one record per file with ``path``, ``ok``, ``sha256`` and ``message``.
    """
    spec = _spec(name)
    out = []
    for key, path in find_files(name, data_dir).items():
        f = spec.files[key]
        rec = {"file": f.name, "path": str(path), "ok": False, "sha256": None, "message": ""}
        try:
            raw = decompressed_bytes(path)
            rec["sha256"] = sha256(raw)
            arr = read_idx_bytes(raw, str(path))
            other = _owner(name, key, rec["sha256"])
            if arr.shape != f.shape:
                rec["message"] = f"shape {arr.shape}, expected {f.shape}"
            elif arr.dtype != np.uint8:
                rec["message"] = (f"IDX elements of type {arr.dtype}; {name}'s files hold "
                                  "unsigned bytes (IDX type 0x08)")
            elif key.endswith("labels") and arr.size and int(arr.max()) >= 10:
                rec["message"] = f"labels outside 0..9 (largest {int(arr.max())})"
            elif other is not None:
                rec["message"] = f"this is {other}'s {f.name}, not {name}'s (same SHA-256)"
            elif f.sha256 is not None and rec["sha256"] != f.sha256:
                rec["message"] = f"SHA-256 mismatch: expected {f.sha256}"
            else:
                rec["ok"] = True
                rec["message"] = "ok (SHA-256 of the content matches)" if f.sha256 else (
                    "ok (IDX structure, shape and labels; not another known dataset's content; "
                    f"no SHA-256 of {name}'s content is recorded)")
        except IDXError as e:
            rec["message"] = str(e)
        out.append(rec)
    return out


def _fetch(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _check_download(f: IdxFile, gz: bytes, url: str) -> bytes:
    try:
        raw = gzip.decompress(gz)
    except (EOFError, OSError, zlib.error) as e:
        raise DownloadError(f"{url}: not a valid gzip file ({e})") from e
    if f.sha256 is not None and sha256(raw) != f.sha256:
        raise DownloadError(f"{url}: SHA-256 of the content {sha256(raw)} != {f.sha256}")
    if f.sha256 is None and f.gz_md5 is not None:
        got = hashlib.md5(gz, usedforsecurity=False).hexdigest()
        if got != f.gz_md5:
            raise DownloadError(f"{url}: MD5 {got} != published {f.gz_md5}")
    arr = read_idx_bytes(raw, url)
    if arr.shape != f.shape:
        raise DownloadError(f"{url}: shape {arr.shape}, expected {f.shape}")
    return gz


def download(
    name: str, dest: str | os.PathLike | None = None, *, timeout: float = 10.0, fetch=_fetch
) -> Path:
    """Download the four files of ``name`` into ``dest`` (default: the per-user cache).

    Each file is checked (checksum and IDX structure) before it is moved into place with an
    atomic rename, so an interrupted download never leaves a partial file under the final name.
    Without a network it fails at the first file with :class:`DownloadError` explaining where
    to put the files instead. ``fetch(url, timeout) -> bytes`` is replaceable for tests.
    """
    spec = _spec(name)
    target = Path(dest) if dest else cache_dir() / name
    target.mkdir(parents=True, exist_ok=True)
    for f in spec.files.values():
        final = target / (f.name + ".gz")
        if final.is_file():
            continue
        errors = []
        for mirror in spec.mirrors:
            url = mirror + f.name + ".gz"
            try:
                gz = _check_download(f, fetch(url, timeout), url)
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                errors.append(f"{url}: {e}")
                continue
            except DownloadError as e:
                errors.append(str(e))
                continue
            tmp = final.with_name(final.name + f".tmp{os.getpid()}")
            tmp.write_bytes(gz)
            os.replace(tmp, final)
            break
        else:
            raise DownloadError(
                f"could not download {f.name}.gz for {name!r}:\n  "
                + "\n  ".join(errors)
                + "\n"
                + _instructions(spec, search_dirs(name))
            )
    return target

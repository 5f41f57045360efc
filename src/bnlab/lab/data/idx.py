"""Read and write IDX files, the format of MNIST and Fashion-MNIST, gzip-compressed or raw.

An IDX file is a big-endian header ``0x00 0x00 TYPE NDIM``, ``NDIM`` 32-bit sizes, then the
values in C order. :func:`read_idx` checks every part of that and says what is wrong with a
file instead of returning a short or misshapen array.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IDXError", "read_idx", "read_idx_bytes", "decompressed_bytes", "write_idx", "sha256"]

# IDX type codes and their (big-endian) numpy types.
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
#: no IDX file bnlab reads comes near this many data bytes: a header claiming more is corrupt
_ABSURD = 1 << 34


class IDXError(ValueError):
    """A file is not a valid IDX file (wrong magic number, truncated, corrupt or misshapen)."""


def _unpacked_path(path: Path, cache: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return cache / f"{path.name.removesuffix('.gz')}-{key[:16]}"


def decompressed_bytes(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> bytes:
    """The content of ``path``, gunzipped if it is a gzip file (detected by its magic bytes).

    With ``cache`` (a directory), a gzip file's content is kept there once unpacked, under a
    name keyed by the file's path, size and modification time, and read from there the next
    time (Fashion-MNIST: 0.4 s of zlib saved per load); the copy is written atomically, and a
    cache that cannot be written is skipped."""
    path = Path(path)
    if cache is not None:
        unpacked = _unpacked_path(path, Path(cache))
        if unpacked.is_file():
            return unpacked.read_bytes()
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        out = gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise IDXError(
            f"{path}: truncated or corrupt gzip file ({e}); delete it and download it again "
            "(bnlab data download) or reinstall the package that provides it"
        ) from e
    if cache is not None:
        try:
            unpacked.parent.mkdir(parents=True, exist_ok=True)
            tmp = unpacked.with_name(f".{unpacked.name}.{os.getpid()}.tmp")
            tmp.write_bytes(out)
            os.replace(tmp, unpacked)
        except OSError:
            pass  # a read-only cache: unpack every time
    return out


def read_idx_bytes(raw: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse the decompressed content of an IDX file into an array of its shape and type."""
    if len(raw) < 4:
        raise IDXError(f"{source}: {len(raw)} bytes is too short for an IDX header (4 bytes)")
    zero, code, ndim = raw[:2], raw[2], raw[3]
    if zero != b"\x00\x00" or code not in _DTYPES or ndim == 0:
        raise IDXError(
            f"{source}: bad IDX magic number 0x{raw[:4].hex()}; expected 0x0000TTDD with type "
            f"TT in {sorted(f'{c:02x}' for c in _DTYPES)} and DD >= 1 dimensions "
            "(is this an IDX file?)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXError(
            f"{source}: truncated header: {ndim} dimensions need {header} bytes, got {len(raw)}"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize  # Python ints: a huge header cannot wrap
    body = len(raw) - header
    if expected > body and expected > _ABSURD:
        raise IDXError(
            f"{source}: corrupt header: it claims shape {tuple(shape)} of {dtype.name}, more "
            f"than {_ABSURD >> 30} GiB ({expected} bytes), but the file holds {body} data bytes"
        )
    if body != expected:
        what = "truncated" if body < expected else "has trailing bytes"
        raise IDXError(
            f"{source}: {what}: shape {tuple(shape)} of {dtype.name} needs {expected} data "
            f"bytes, got {body}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def read_idx(
    path: str | os.PathLike, expect_shape: tuple[int | None, ...] | None = None,
    cache: str | os.PathLike | None = None,
) -> np.ndarray:
    """Read an IDX file (gzip or raw) and check its shape against ``expect_shape``.

    ``None`` entries of ``expect_shape`` match any size. Raises :class:`IDXError` for a file that
    is not IDX, is truncated, or has another shape, naming the file. ``cache``: see
    :func:`decompressed_bytes`.
    """
    path = Path(path)
    array = read_idx_bytes(decompressed_bytes(path, cache), str(path))
    if expect_shape is not None:
        ok = len(expect_shape) == array.ndim and all(
            e is None or e == s for e, s in zip(expect_shape, array.shape, strict=True)
        )
        if not ok:
            raise IDXError(
                f"{path}: expected shape {tuple(expect_shape)}, got {array.shape} "
                "(is this the right file?)"
            )
    return array


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file; gzip it when ``compress`` (default: the name ends .gz)."""
    path = Path(path)
    array = np.asarray(array)
    codes = {v.newbyteorder("="): k for k, v in _DTYPES.items()}
    dtype = array.dtype.newbyteorder("=")
    if dtype not in codes:
        raise TypeError(f"write_idx: dtype {array.dtype} has no IDX type code")
    code = codes[dtype]
    raw = (
        bytes([0, 0, code, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.astype(_DTYPES[code], copy=False).tobytes()
    )
    if compress is None:
        compress = path.suffix == ".gz"
    path.write_bytes(gzip.compress(raw, mtime=0) if compress else raw)
    return path


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()

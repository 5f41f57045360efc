"""Read the ``.ts`` text format of the UEA/UCR time-series archives (sktime's and aeon's).

A ``.ts`` file is a header of ``#`` comments and ``@key value`` lines ending in ``@data``, then
one series per line: its dimensions separated by ``:``, each a comma-separated list of values,
the class label last (``@classLabel true ...``). Series may differ in length (``@equalLength
false``), but the dimensions of one series share its length. :func:`read_ts` checks each of
those facts and names the line where a file breaks one, instead of returning ragged arrays.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["TSError", "TSData", "read_ts", "parse_ts"]


class TSError(ValueError):
    """A file is not a valid ``.ts`` file (missing header, ragged series, unknown label)."""


@dataclass(frozen=True)
class TSData:
    """The series of one ``.ts`` file: ``series[i]`` is float64 ``(dimensions, length_i)``."""

    series: list[np.ndarray]
    labels: list[str]
    class_labels: list[str]
    header: dict[str, str] = field(default_factory=dict)

    @property
    def dimensions(self) -> int:
        return int(self.header["dimensions"])

    @property
    def lengths(self) -> list[int]:
        return [s.shape[1] for s in self.series]


def read_ts(path: str | os.PathLike) -> TSData:
    """Read a ``.ts`` file (UTF-8 text); see :func:`parse_ts`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TSError(f"{p}: not UTF-8 text ({e})") from e
    return parse_ts(text, str(p))


def _header(lines: list[str], source: str) -> tuple[dict[str, str], int]:
    header: dict[str, str] = {}
    for i, raw in enumerate(lines):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("@"):
            raise TSError(f"{source}:{i + 1}: expected a '@key value' header line before "
                          f"@data, got {line[:40]!r}")
        key, _, value = line[1:].partition(" ")
        key = key.lower()
        if key == "data":
            return header, i + 1
        header[key] = value.strip()
    raise TSError(f"{source}: no @data line (not a .ts file, or truncated in its header)")


def parse_ts(text: str, source: str = "<string>") -> TSData:
    """Parse the text of a ``.ts`` file with class labels.

    Requires ``@dimensions N`` and ``@classLabel true L1 L2 ...`` in the header; every data
    line must have ``N`` dimensions of one length and a label from that list. Missing values
    (``?`` or ``NaN``) are refused unless the header says ``@missing true``.
    """
    lines = text.splitlines()
    header, start = _header(lines, source)
    for key in ("dimensions", "classlabel"):
        if key not in header:
            raise TSError(f"{source}: header lacks @{'classLabel' if key == 'classlabel' else key}")
    try:
        dims = int(header["dimensions"])
    except ValueError:
        raise TSError(f"{source}: @dimensions must be an integer, got "
                      f"{header['dimensions']!r}") from None
    flag, *classes = header["classlabel"].split()
    if flag.lower() != "true" or not classes:
        raise TSError(f"{source}: @classLabel must be 'true' followed by the labels, got "
                      f"{header['classlabel']!r}")
    allow_missing = header.get("missing", "false").lower() == "true"
    series, labels = [], []
    for i in range(start, len(lines)):
        line = lines[i].strip()
        if not line:
            continue
        *parts, label = line.split(":")
        where = f"{source}:{i + 1}"
        if len(parts) != dims:
            raise TSError(f"{where}: expected {dims} dimensions and a label, got {len(parts)} "
                          "dimensions")
        if label.strip() not in classes:
            raise TSError(f"{where}: label {label.strip()!r} is not one of @classLabel "
                          f"{' '.join(classes)}")
        try:
            values = [np.array(p.split(","), dtype=np.float64) for p in parts]
        except ValueError as e:
            raise TSError(f"{where}: a value is not a number ({e})") from None
        lengths = {len(v) for v in values}
        if len(lengths) != 1:
            raise TSError(f"{where}: the dimensions of one series differ in length "
                          f"({sorted(lengths)})")
        arr = np.stack(values)
        if not allow_missing and not np.isfinite(arr).all():
            raise TSError(f"{where}: missing or non-finite values, but the header says "
                          "@missing false")
        series.append(arr)
        labels.append(label.strip())
    if not series:
        raise TSError(f"{source}: no series after @data")
    return TSData(series, labels, classes, header)

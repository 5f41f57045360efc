"""What ``bnlab fold`` and ``bnlab lint`` share: the user's model factory, checkpoint, shape
and source file, each failure of which is a one-line error naming the file or argument.

:mod:`bnlab.tools._factory` builds and loads; a factory is the user's code, so whatever it
raises (a ``SyntaxError`` in its file, an ``AttributeError`` inside it) is the user's mistake
and becomes a ``ValueError`` naming the factory, which ``bnlab.lab.cli.main`` prints as one
line with exit 2.
"""

from __future__ import annotations

import tokenize
from pathlib import Path

from torch import nn

__all__ = ["build", "load", "example_shape", "read_source"]


def build(spec: str) -> nn.Module:
    """The model ``spec`` (``module:callable`` or ``file.py:callable``) builds."""
    from bnlab.tools._factory import build_model

    try:
        return build_model(spec)
    except (ValueError, TypeError):
        raise  # the factory loader's own messages name the spec
    except SyntaxError as e:
        raise ValueError(f"model factory {spec!r}: {e.filename}, line {e.lineno}: "
                         f"{e.msg}") from e
    except Exception as e:  # noqa: BLE001 - the user's code failed: say where, not how deep
        raise ValueError(f"model factory {spec!r} raised {type(e).__name__}: {e}") from e


def load(model: nn.Module, path: str | Path, spec: str) -> nn.Module:
    """Load checkpoint ``path`` into ``model``; torch's nameless OSErrors (``[Errno 22]
    Invalid argument`` from a file cut short) name the file."""
    from bnlab.tools._factory import load_into

    try:
        return load_into(model, path, spec)
    except OSError as e:
        if e.filename:  # missing, a directory, unreadable: the OS's message names the file
            raise
        raise ValueError(f"{path}: not a state-dict checkpoint torch.load(weights_only=True) "
                         f"can read (truncated or damaged: {e.strerror or e})") from e


def example_shape(text: str | None) -> tuple[int, ...] | None:
    """``--example-shape`` as a tuple; a size of 0 is refused (an empty batch checks
    nothing: an error measured on it would read 0)."""
    from bnlab.tools._factory import parse_shape

    shape = parse_shape(text)
    if shape is not None and 0 in shape:
        raise ValueError(f"--example-shape {text}: every size must be >= 1 (an empty batch "
                         "checks nothing), e.g. 1,1,28,28")
    return shape


def read_source(path: Path) -> str:
    """The text of Python file ``path`` in its declared encoding (PEP 263; UTF-8 by default),
    or a ValueError naming the file."""
    fix = "save it as UTF-8 or declare its encoding ('# -*- coding: latin-1 -*-')"
    try:
        with tokenize.open(path) as f:
            return f.read()
    except UnicodeDecodeError as e:  # bytes past the first two lines
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                         f"{e.start}) and no other encoding declared; {fix}") from e
    except SyntaxError as e:  # the first two lines: undecodable, or an unknown encoding
        if "encoding declaration" in str(e.msg):
            raise ValueError(f"{path}: not UTF-8 text and no other encoding declared in its "
                             f"first two lines; {fix}") from e
        raise ValueError(f"{path}: {e.msg}") from e

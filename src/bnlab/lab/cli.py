"""The ``bnlab`` command line. Each subcommand lives in its own module and registers itself."""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import sys
from collections.abc import Sequence
from typing import NoReturn

# Modules that define ``register(subparsers)``. Each adds one or more subcommands.
_COMMAND_MODULES = [
    "bnlab.lab.commands.demo",
    "bnlab.lab.commands.info",
    "bnlab.lab.commands.study",
    "bnlab.lab.commands.fold",
    "bnlab.lab.commands.lint",
    "bnlab.lab.commands.run",
    "bnlab.lab.commands.train",
    "bnlab.lab.commands.report",
    "bnlab.lab.commands.data",
    "bnlab.lab.commands.speedrun",
]


class _Parser(argparse.ArgumentParser):
    """argparse with its mistakes in one line, like every other mistake (usage: --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from bnlab import __version__

    parser = _Parser(
        prog="bnlab",
        description="Batch Normalization for PyTorch: layers, kernels, tools and experiments.",
    )
    parser.add_argument("--version", action="version", version=f"bnlab {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: BNLAB_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _USER_ERRORS as e:
        # The one place where a mistake or an environment fault (a bad option, a missing or
        # damaged file, a full disk, a locked run directory) becomes one line and exit 2.
        if args.debug or os.environ.get("BNLAB_DEBUG"):
            raise
        print(f"bnlab {args.command}: {one_line(e)}", file=sys.stderr)
        return 2


#: what a command may raise for a user's mistake or the environment's fault; anything else
#: is a bug and keeps its traceback
_USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError, EOFError, pickle.UnpicklingError)


def one_line(e: BaseException) -> str:
    """``e`` as one line: its message's lines joined, the type name where it says nothing."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        # "[Errno 21] Is a directory: 'x'" reads better as "x: Is a directory"
        where = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
        text = f"{where}: {e.strerror}"
    else:
        text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    text = text or type(e).__name__
    return text if len(text) <= 1000 else text[:997] + "..."


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

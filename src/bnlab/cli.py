"""The ``bnlab`` command line. Each subcommand lives in its own module and registers itself."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that define ``register(subparsers)``. Each adds one or more subcommands.
_COMMAND_MODULES = [
    "bnlab.commands.demo",
    "bnlab.commands.info",
    "bnlab.commands.study",
    "bnlab.commands.fold",
    "bnlab.commands.lint",
    "bnlab.commands.run",
    "bnlab.commands.train",
    "bnlab.commands.report",
    "bnlab.commands.data",
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="bnlab",
        description="Batch Normalization for PyTorch: layers, kernels, tools and experiments.",
    )
    parser.add_argument("--version", action="version", version=f"bnlab {__version__}")
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``bnlab report RUN_DIR...``: regenerate report.md and report.html from run directories."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from ..report import write_report

    paths = write_report(args.run_dirs, args.out)  # a mistake: cli.main, one line
    print(f"report: {paths.html}\n        {paths.markdown}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="regenerate report.html/.md from run directories")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories, or folders holding them (a bnlab run output)")
    p.add_argument("--out", help="where to write the report (default: the first RUN_DIR)")
    p.set_defaults(func=_run)

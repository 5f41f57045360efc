"""``bnlab lint module:callable``: print BN mistakes in a model; exit code 1 on errors."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    try:
        return _main(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        print(f"bnlab lint: error: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    import torch

    from ..tools import lint
    from ..tools._factory import build_model, load_state_dict, parse_shape

    model = build_model(args.model)
    if args.checkpoint:
        model.load_state_dict(load_state_dict(args.checkpoint))
    if args.eval:
        model.eval()
    shape = parse_shape(args.example_shape)
    example = None if shape is None else torch.randn(*shape)
    findings = lint(model, example)
    if args.json:
        print(json.dumps([f.to_dict() for f in findings], indent=2))
    else:
        for f in findings:
            print(f)
            print(f"    why: {f.why}")
            print(f"    fix: {f.fix}")
        errors = sum(f.severity == "error" for f in findings)
        print(f"{len(findings)} finding(s), {errors} error(s)")
    return 1 if any(f.severity == "error" for f in findings) else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lint", help="check a model for BN mistakes (exit 1 on errors)")
    p.add_argument("model", help="'package.module:callable' or 'file.py:callable' building it")
    p.add_argument("--example-shape", default=None,
                   help="training batch shape such as 2,1,28,28 (enables BN001/BN004 hooks)")
    p.add_argument("--checkpoint", type=Path, default=None, help="state dict to load first")
    p.add_argument("--eval", action="store_true", help="lint the model in evaluation mode")
    p.add_argument("--json", action="store_true", help="print findings as JSON")
    p.set_defaults(func=_run)

"""``bnlab lint module:callable``: print BN mistakes in a model; exit code 1 on errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    # a bad checkpoint, factory or shape raises; cli.main makes it one line and exit 2
    import torch

    from bnlab.tools import lint
    from bnlab.tools._factory import build_model, load_into, parse_shape

    model = build_model(args.model)
    if args.checkpoint:
        load_into(model, args.checkpoint, args.model)
    if args.eval:
        model.eval()
    shape = parse_shape(args.example_shape)
    example = None if shape is None else torch.randn(*shape)
    findings = lint(model, example)
    failed = next((f for f in findings if f.code == "BN000"), None)
    if failed is not None:  # the forward with the user's --example-shape failed: a mistake
        raise ValueError(f"--example-shape {shape} does not fit the model from {args.model}: "
                         f"{failed.message}")
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

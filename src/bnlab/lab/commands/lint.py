"""``bnlab lint module:callable`` or ``bnlab lint script.py``: print BN mistakes; exit 1 on
errors.

A ``module:callable`` is built and its model checked (:func:`bnlab.tools.lint`), and the source
of its module is read for what a model cannot show (:func:`bnlab.tools.lint_source`, BN011,
BN012). A plain ``script.py`` (a training script) is only read, never run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path


def _source_file(spec: str) -> Path | None:
    """The Python file ``spec``'s module lives in (None when it has none, e.g. built-in)."""
    module = spec.split(":")[0]
    if module.endswith(".py"):
        return Path(module)
    found = importlib.util.find_spec(module)
    origin = getattr(found, "origin", None)
    return Path(origin) if origin and origin.endswith(".py") else None


def _run(args: argparse.Namespace) -> int:
    # a bad checkpoint, factory or shape raises; cli.main makes it one line and exit 2
    from bnlab.tools import lint, lint_source

    from ._model import build, load, read_source

    findings = []
    if ":" not in args.model:
        path = Path(args.model)
        if path.suffix != ".py":
            raise ValueError(f"model must look like 'module:callable', 'file.py:callable' or "
                             f"'script.py' (source only), got {args.model!r}")
        if not path.is_file():
            raise ValueError(f"script {args.model!r} does not exist")
        if args.checkpoint or args.example_shape or args.eval:
            raise ValueError(f"--checkpoint, --example-shape and --eval need a model: give "
                             f"'{args.model}:callable', got the script {args.model!r} alone")
        findings = lint_source(read_source(path), str(path))
    else:
        import torch

        from bnlab.tools._factory import parse_shape

        model = build(args.model)
        if args.checkpoint:
            load(model, args.checkpoint, args.model)
        if args.eval:
            model.eval()
        shape = parse_shape(args.example_shape)
        example = None if shape is None else torch.randn(*shape)
        findings = lint(model, example)
        failed = next((f for f in findings if f.code == "BN000"), None)
        if failed is not None:  # the forward with the user's --example-shape failed: a mistake
            raise ValueError(f"--example-shape {shape} does not fit the model from "
                             f"{args.model}: {failed.message}")
        source = _source_file(args.model)
        if source is not None:
            findings += lint_source(read_source(source), str(source))
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
    p = sub.add_parser("lint", help="check a model (or a training script) for BN mistakes "
                                    "(exit 1 on errors)")
    p.add_argument("model", help="'package.module:callable' or 'file.py:callable' building the "
                                 "model (its source is read too), or 'script.py' to read a "
                                 "script only")
    p.add_argument("--example-shape", default=None,
                   help="training batch shape such as 2,1,28,28 (enables BN001/BN004 hooks)")
    p.add_argument("--checkpoint", type=Path, default=None, help="state dict to load first")
    p.add_argument("--eval", action="store_true", help="lint the model in evaluation mode")
    p.add_argument("--json", action="store_true", help="print findings as JSON")
    p.set_defaults(func=_run)

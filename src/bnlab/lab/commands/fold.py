"""``bnlab fold CHECKPOINT --model module:callable``: fold BN layers of a trained model.

Writes a ``bnlab.folded.v1`` file (:func:`bnlab.tools.fold.folded_checkpoint`, readable with
``torch.load(weights_only=True)``); :func:`bnlab.tools.load_folded` rebuilds the module.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch


def _run(args: argparse.Namespace) -> int:
    # a bad checkpoint, factory or shape raises; cli.main makes it one line and exit 2
    import io

    from bnlab.tools import fold
    from bnlab.tools._factory import build_model, load_into, parse_shape
    from bnlab.tools.fold import example_input, folded_checkpoint

    from ..train.rundir import atomic_write_bytes

    shape = parse_shape(args.example_shape)
    out = args.out or Path(args.checkpoint).with_suffix(".folded.pt")
    if Path(out).resolve() == Path(args.checkpoint).resolve():
        raise ValueError(f"--out {out} is the input checkpoint; writing there would destroy "
                         "it: choose another --out")
    model = load_into(build_model(args.model), args.checkpoint, args.model)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report below says what was not folded
        try:
            folded = fold(model, example_input(shape))
        except RuntimeError as e:
            if shape is None:
                raise
            raise ValueError(f"--example-shape {shape} does not fit the model from "
                             f"{args.model}: {e}") from e
    report = folded.fold_report
    buf = io.BytesIO()
    torch.save(folded_checkpoint(folded, args.model, shape), buf)
    atomic_write_bytes(out, buf.getvalue())  # a full disk leaves no partial file
    if args.json:
        print(json.dumps({"out": str(out), **report.to_dict()}, indent=2))
    else:
        print(report.summary())
        print(f"wrote {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fold", help="fold evaluation-mode BN layers into neighbouring layers")
    p.add_argument("checkpoint", help="state dict (or dict with 'state_dict'/'model') file")
    p.add_argument("--model", required=True,
                   help="factory building the architecture: 'package.module:callable' or "
                        "'file.py:callable'")
    p.add_argument("--out", type=Path, default=None,
                   help="output file (default: CHECKPOINT with suffix .folded.pt)")
    p.add_argument("--example-shape", default=None,
                   help="input shape such as 1,1,28,28: checks the outputs agree and allows "
                        "folds next to Linear layers")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_run)

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
    from bnlab.tools.fold import example_input, folded_checkpoint

    from ..train.rundir import atomic_write_bytes
    from ._model import build, example_shape, load

    shape = example_shape(args.example_shape)
    out = args.out or Path(args.checkpoint).with_suffix(".folded.pt")
    if Path(out).resolve() == Path(args.checkpoint).resolve():
        raise ValueError(f"--out {out} is the input checkpoint; writing there would destroy "
                         "it: choose another --out")
    model = load(build(args.model), args.checkpoint, args.model)
    # A NaN or Inf would be folded into the weights and written with exit 0 (the fold's own
    # check then reports an error of nan): refuse, naming the key.
    bad = _nonfinite_key(model)
    if bad is not None:
        raise ValueError(f"{args.checkpoint}: {bad} holds non-finite values (NaN or Inf); "
                         "folding would write them into the folded weights: recalibrate the "
                         "statistics (bnlab.tools.recalibrate) or use another checkpoint")
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
    bad = _nonfinite_key(folded)
    if bad is not None:  # finite statistics can fold to NaN too (a negative running_var)
        raise ValueError(f"folding {args.checkpoint} gives non-finite values (NaN or Inf) in "
                         f"{bad} of the folded model; is a running_var negative? nothing was "
                         "written")
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


def _nonfinite_key(model: torch.nn.Module) -> str | None:
    """The first state-dict key of ``model`` holding a NaN or Inf, or None."""
    return next((k for k, v in model.state_dict().items()
                 if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)


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

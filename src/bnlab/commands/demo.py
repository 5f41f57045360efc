"""``bnlab demo``: the seed's experiment on Fashion-MNIST, sized to finish in minutes.

``make demo`` runs this. Defaults: 3 epochs on all 60,000 training images, normalisers none,
bn, bn-window and bn-running, 2 seeds each. ``--full`` runs the seed's 10 epochs instead (the
same as ``bnlab run seed --dataset fashion-mnist --epochs 10 --seeds 2``).
"""

from __future__ import annotations

import argparse

from .run import add_seed_arguments, run_seed

DEMO_EPOCHS = 3
FULL_EPOCHS = 10


def _run(args: argparse.Namespace) -> int:
    if args.full:
        args.epochs = FULL_EPOCHS
    return run_seed(args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the seed experiment on Fashion-MNIST, a few minutes",
                       description=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    add_seed_arguments(p, epochs=DEMO_EPOCHS, norms="none,bn,bn-window,bn-running", seeds=2)
    p.set_defaults(dataset="fashion-mnist")
    p.add_argument("--full", action="store_true",
                   help=f"the seed's full run: {FULL_EPOCHS} epochs")
    p.set_defaults(func=_run)

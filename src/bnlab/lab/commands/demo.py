"""``bnlab demo``: the small-CNN experiment on Fashion-MNIST, sized to finish in minutes.

``make demo`` runs this. Defaults: 3 epochs on the first 30,000 training images (validation on
all 10,000 test images), normalisers none, bn, bn-window and bn-running, 2 seeds each: eight
trainings of 3 epochs, sized to finish within about 10 minutes on 2 CPU cores. ``--full`` runs the
tutorial's recipe instead: 10 epochs on all 60,000 images (the same as ``bnlab run small-cnn
--dataset fashion-mnist --epochs 10 --seeds 2``).
"""

from __future__ import annotations

import argparse

from .run import add_small_cnn_arguments, run_small_cnn

DEMO_EPOCHS = 3
DEMO_TRAIN_SUBSET = 30000
FULL_EPOCHS = 10


def _run(args: argparse.Namespace) -> int:
    if args.full:
        args.epochs = FULL_EPOCHS
        args.train_subset = 0
    return run_small_cnn(args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the small-CNN experiment on Fashion-MNIST, a few minutes",
                       description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_small_cnn_arguments(p, epochs=DEMO_EPOCHS, norms="none,bn,bn-window,bn-running", seeds=2,
                       train_subset=DEMO_TRAIN_SUBSET)
    p.set_defaults(dataset="fashion-mnist")
    p.add_argument("--full", action="store_true",
                   help=f"the tutorial's full run: {FULL_EPOCHS} epochs on all training images")
    p.set_defaults(func=_run)

"""``bnlab run small-cnn``: a small CNN once per normaliser and seed, then the report.

The small CNN is the network of the Keras tutorial this project started from (see
:func:`bnlab.lab.models.small_cnn`). ``bnlab run seed``, the experiment's old name, still runs it.
"""

from __future__ import annotations

import argparse
import sys


def add_small_cnn_arguments(p: argparse.ArgumentParser, *, epochs: int, norms: str, seeds: int,
                       train_subset: int = 0) -> None:
    """The options of ``bnlab run small-cnn`` (``bnlab demo`` shares them, other defaults)."""
    p.add_argument("--dataset", default="auto", choices=["auto", "mnist", "fashion-mnist"],
                   help="auto: MNIST when present, else Fashion-MNIST (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=epochs, help="default: %(default)s")
    p.add_argument("--norms", default=norms,
                   help="comma-separated normaliser names (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=seeds,
                   help="seeds 0..N-1 per normaliser (default: %(default)s)")
    p.add_argument("--train-subset", type=int, default=train_subset, metavar="N",
                   help="train on the first N examples, 0 = all (default: %(default)s)")
    p.add_argument("--test-subset", type=int, default=0, metavar="N",
                   help="validate on the first N test examples, 0 = all")
    p.add_argument("--placement", default="after", choices=["after", "before"],
                   help="norm after the ReLU (the tutorial's order) or before it")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--threads", type=int, default=0, help="torch threads, 0 = torch's default")
    p.add_argument("--data-dir", default="", help="searched first for the dataset files")
    p.add_argument("--out", default=None, help="study directory (default: runs/small-cnn-...)")
    p.add_argument("--resume", action="store_true",
                   help="continue the study in --out: skip finished runs, resume interrupted ones")
    p.add_argument("--monitor", action="store_true",
                   help="record every BN layer's statistics (monitor.jsonl per run) and draw "
                        "them in the report")
    p.add_argument("--monitor-every", type=int, default=50, metavar="K",
                   help="with --monitor: record every K-th optimisation step (default 50)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def run_small_cnn(args: argparse.Namespace) -> int:
    from ..train import make_progress
    from ..train.study import SmallCNNStudy, run_small_cnn_study

    norms = tuple(n.strip() for n in args.norms.split(",") if n.strip())
    study = SmallCNNStudy(dataset=args.dataset, epochs=args.epochs, norms=norms, seeds=args.seeds,
                      placement=args.placement, batch_size=args.batch_size, lr=args.lr,
                      train_subset=args.train_subset, test_subset=args.test_subset,
                      threads=args.threads, data_dir=args.data_dir, monitor=args.monitor,
                      monitor_every=args.monitor_every)
    progress = make_progress(args.quiet)
    try:  # a mistake or a fault is cli.main's: one line, exit 2
        result = run_small_cnn_study(study, args.out, resume=args.resume, progress=progress)
    except KeyboardInterrupt:
        out = args.out or "<the study directory printed above>"
        print(f"interrupted; continue with: bnlab run small-cnn ... --out {out} --resume",
              file=sys.stderr)
        return 130
    from ..report.page import md_table

    print(f"\n{md_table(result['table'])}\n\n{' '.join(result['answer'])}")
    print(f"\nreport: {result['report'].html}\n        {result['report'].markdown}")
    return 0


def _run_old_name(args: argparse.Namespace) -> int:
    print("bnlab: note: `bnlab run seed` is now `bnlab run small-cnn`; the old name still works",
          file=sys.stderr)
    return run_small_cnn(args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run an experiment (small-cnn: a small CNN per normaliser)")
    kinds = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    description = ("Train a small CNN (Conv 32, ReLU, norm, MaxPool, Conv 64, ReLU, norm, "
                   "MaxPool, Linear; the Keras tutorial's network with two separate BN layers) "
                   "once per normaliser and seed on MNIST or Fashion-MNIST (Adam, batch 128, "
                   "validation on the test set) and write report.html and report.md into the "
                   "study directory.")
    cnn = kinds.add_parser(
        "small-cnn", help="a small CNN with each normaliser and seed, then report.html/.md",
        description=description)
    # the old name: no help line, so `bnlab run --help` lists only the name now
    old = kinds.add_parser("seed", description=description + " (Old name of small-cnn.)")
    for parser, func in ((cnn, run_small_cnn), (old, _run_old_name)):
        add_small_cnn_arguments(parser, epochs=10, norms="none,bn,bn-window,bn-running", seeds=1)
        parser.set_defaults(func=func)

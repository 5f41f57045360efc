"""``bnlab run seed``: the seed's CNN once per normaliser and seed, then the report."""

from __future__ import annotations

import argparse
import sys


def add_seed_arguments(p: argparse.ArgumentParser, *, epochs: int, norms: str, seeds: int,
                       train_subset: int = 0) -> None:
    """The options of ``bnlab run seed`` (``bnlab demo`` shares them with other defaults)."""
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
                   help="norm after the ReLU (the seed's order) or before it")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--threads", type=int, default=0, help="torch threads, 0 = torch's default")
    p.add_argument("--data-dir", default="", help="searched first for the dataset files")
    p.add_argument("--out", default=None, help="study directory (default: runs/seed-...)")
    p.add_argument("--resume", action="store_true",
                   help="continue the study in --out: skip finished runs, resume interrupted ones")
    p.add_argument("--monitor", action="store_true",
                   help="record every BN layer's statistics (monitor.jsonl per run) and draw "
                        "them in the report")
    p.add_argument("--monitor-every", type=int, default=50, metavar="K",
                   help="with --monitor: record every K-th optimisation step (default 50)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def run_seed(args: argparse.Namespace, title_note: str = "") -> int:
    from ..train import make_progress
    from ..train.study import SeedStudy, run_seed_study

    norms = tuple(n.strip() for n in args.norms.split(",") if n.strip())
    study = SeedStudy(dataset=args.dataset, epochs=args.epochs, norms=norms, seeds=args.seeds,
                      placement=args.placement, batch_size=args.batch_size, lr=args.lr,
                      train_subset=args.train_subset, test_subset=args.test_subset,
                      threads=args.threads, data_dir=args.data_dir, monitor=args.monitor,
                      monitor_every=args.monitor_every)
    progress = make_progress(args.quiet)
    try:  # a mistake or a fault is cli.main's: one line, exit 2
        result = run_seed_study(study, args.out, resume=args.resume, progress=progress)
    except KeyboardInterrupt:
        out = args.out or "<the study directory printed above>"
        print(f"interrupted; continue with: bnlab run seed ... --out {out} --resume",
              file=sys.stderr)
        return 130
    md = result["report_md"].read_text()
    table = md.split("## Accuracy", 1)[1].split("\n## ", 1)[0].strip()
    answer = next((line for line in md.splitlines() if line.startswith("**Answer.**")), "")
    print()
    print(table)
    print()
    print(answer.replace("**Answer.** ", ""))
    print(f"\nreport: {result['report_html']}\n        {result['report_md']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run an experiment (seed: the seed's CNN, per normaliser)")
    kinds = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    seed = kinds.add_parser(
        "seed", help="the seed's CNN with each normaliser and seed, then report.html/.md",
        description="Train the seed's Keras CNN (fixed: two separate BN layers) in PyTorch once "
                    "per normaliser and seed (Adam, batch 128, validation on the test set) and "
                    "write report.html and report.md into the study directory.")
    add_seed_arguments(seed, epochs=10, norms="none,bn,bn-window,bn-running", seeds=1)
    seed.set_defaults(func=run_seed)

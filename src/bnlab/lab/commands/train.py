"""``bnlab train``: one model, one config (TOML file plus overrides)."""

from __future__ import annotations

import argparse
import json
import math
import sys


def _run(args: argparse.Namespace) -> int:
    # A mistake in the settings, the files or the environment raises; cli.main turns it into
    # one line and exit 2, before anything is created where the settings are at fault.
    from ..train import TrainConfig, make_progress, parse_overrides, train

    if not (args.dist_timeout > 0 and math.isfinite(args.dist_timeout)):
        raise ValueError(f"--dist-timeout must be a positive number of seconds, got "
                         f"{args.dist_timeout:g}")
    config = TrainConfig.from_toml(args.config) if args.config else TrainConfig()
    changes = {k: getattr(args, k) for k in ("model", "norm", "dataset", "epochs", "seed",
                                             "data_dir") if getattr(args, k) is not None}
    if args.monitor:
        changes["monitor"] = True
    if args.monitor_every is not None:
        changes["monitor_every"] = args.monitor_every
    if args.nproc_per_node is not None:
        changes["nproc_per_node"] = args.nproc_per_node
    if args.sync_bn:
        changes["sync_bn"] = True
    changes.update(parse_overrides(args.set))
    config = config.replace(**changes)
    out = args.out or f"runs/train-{config.model}-{config.norm}-s{config.seed}"
    if config.nproc_per_node > 1:
        return _run_distributed(config, out, args)
    progress = make_progress(args.quiet)
    try:
        summary = train(config, out, resume=args.resume, progress=progress)
    except KeyboardInterrupt:
        print(f"interrupted; continue with: bnlab train --out {out} --resume ...",
              file=sys.stderr)
        return 130
    finally:
        progress.close()
    print(json.dumps(summary, indent=2))
    print(f"run directory: {out}")
    return 0


def _run_distributed(config, out: str, args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..train.ddp import launch_train

    try:
        rc = launch_train(config, out, resume=args.resume, timeout_s=args.dist_timeout,
                          quiet=args.quiet)
    except KeyboardInterrupt:
        print(f"interrupted; continue with: bnlab train --out {out} --resume ...",
              file=sys.stderr)
        return 130
    if rc != 0:
        print(f"bnlab train: {config.nproc_per_node} workers failed (exit status {rc}); "
              "see the ranks' messages above", file=sys.stderr)
        return 2
    print((Path(out) / "summary.json").read_text().rstrip())
    print(f"run directory: {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one model from one config",
                       description="Train one model. Settings come from --config (TOML, keys "
                                   "of bnlab.lab.train.TrainConfig), then the flags, then --set.")
    p.add_argument("--config", help="TOML file of TrainConfig keys")
    p.add_argument("--model", help="small_cnn, ioffe_mlp, mnist1d_mlp, mnist1d_cnn, small_resnet")
    p.add_argument("--norm", help="normaliser name, e.g. none, bn, bn-window")
    p.add_argument("--dataset", help="mnist, fashion-mnist or mnist1d")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--monitor", action="store_true",
                   help="record every BN layer's statistics into monitor.jsonl (see README)")
    p.add_argument("--monitor-every", type=int, metavar="K",
                   help="with --monitor: record every K-th optimisation step (default 50)")
    p.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="data-parallel worker processes started with torchrun (gloo on CPU, "
                        "NCCL on GPU); the batch size stays global")
    p.add_argument("--sync-bn", action="store_true",
                   help="with --nproc-per-node > 1: BN statistics over all ranks "
                        "(bnlab.SyncBatchNorm)")
    p.add_argument("--dist-timeout", type=float, default=120.0, metavar="S",
                   help="seconds any collective may wait before a rank gives up "
                        "(default %(default)s)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any config key, e.g. --set lr=0.01 (repeatable)")
    p.add_argument("--out", help="run directory (default: runs/train-MODEL-NORM-sSEED)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)

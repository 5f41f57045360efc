"""``bnlab speedrun``: Fashion-MNIST time to accuracy against a wall-clock budget."""

from __future__ import annotations

import argparse
import math


def _check(args: argparse.Namespace) -> list[str]:
    if not (0 < args.target < 1):
        raise ValueError(f"--target must be an accuracy in (0, 1), got {args.target:g}")
    if not (args.budget_s > 0 and math.isfinite(args.budget_s)):
        raise ValueError(f"--budget-s must be a positive number of seconds, got "
                         f"{args.budget_s:g}")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    for name in ("train_subset", "eval_subset"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    norms = [n.strip() for n in args.norm.split(",") if n.strip()]
    bad = [n for n in norms if n not in ("bn", "none")]
    if bad or not norms or len(set(norms)) != len(norms):
        raise ValueError(f"--norm must be bn, none or bn,none, got {args.norm!r}")
    return norms


def _value(key: str, text: str):
    if key == "stages":  # "32x1,64x2": (width, convolutions) per stage
        try:
            stages = tuple(tuple(int(v) for v in s.split("x")) for s in text.split(","))
        except ValueError:
            stages = ()
        if not stages or any(len(s) != 2 for s in stages):
            raise ValueError(f"--set stages= takes WIDTHxCONVS,... (e.g. 32x1,64x2), got "
                             f"{text!r}")
        return stages
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def recipes_with(norms: list[str], settings: list[str]) -> dict:
    """The recipes of ``norms`` with ``--set [NORM.]KEY=VALUE`` changes (no NORM: every one)."""
    import dataclasses

    from ..speedrun import RECIPES

    fields = {f.name for f in dataclasses.fields(RECIPES["bn"])} - {"norm"}
    recipes = {n: RECIPES[n] for n in norms}
    for item in settings:
        key, eq, text = item.partition("=")
        if not eq:
            raise ValueError(f"--set takes KEY=VALUE or NORM.KEY=VALUE, got {item!r}")
        norm, dot, name = key.rpartition(".")
        if name not in fields:
            raise ValueError(f"--set {key}: no recipe setting {name!r}; the settings are "
                             f"{', '.join(sorted(fields))}")
        if dot and norm not in recipes:
            raise ValueError(f"--set {key}: {norm!r} is not a recipe of this run "
                             f"({', '.join(recipes)})")
        for n in ([norm] if dot else list(recipes)):
            recipes[n] = recipes[n].replace(**{name: _value(name, text)})
    return recipes


def _run(args: argparse.Namespace) -> int:
    norms = _check(args)
    from ..speedrun import speedrun

    recipes = recipes_with(norms, args.set)

    out = args.out or f"runs/speedrun-{'-'.join(norms)}"
    speedrun(out, norms=norms, seeds=args.seeds, budget_s=args.budget_s, target=args.target,
             split="holdout" if args.holdout else "test", threads=args.threads,
             data_dir=args.data_dir, train_subset=args.train_subset,
             eval_subset=args.eval_subset, recipes=recipes)
    print(f"run directory: {out} (report: {out}/report.html)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "speedrun", help="Fashion-MNIST time to accuracy, with BN and without",
        description="Train a speedrun recipe on Fashion-MNIST against a wall-clock budget, "
                    "each seed in a fresh process, and print when each of 0.90/0.91/0.92/0.93 "
                    "(and --target) was first reached. Seconds count from the process start "
                    "(imports, data loading, every step); accuracy is measured at fixed "
                    "steps, outside the timed region. With --norm bn,none the two recipes "
                    "alternate seed by seed and the run ends with the verdict.")
    p.add_argument("--target", type=float, default=0.93, help="accuracy to reach (0.93)")
    p.add_argument("--budget-s", dest="budget_s", type=float, default=60.0,
                   help="wall-clock budget per seed in seconds (60)")
    p.add_argument("--norm", default="bn", help="bn, none, or bn,none (default bn)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--holdout", action="store_true",
                   help="train on the first 50,000 training images and measure on the last "
                        "10,000 (how the recipes were tuned); the test set is not read")
    p.add_argument("--data-dir", dest="data_dir", help="where Fashion-MNIST's IDX files are")
    p.add_argument("--train-subset", dest="train_subset", type=int,
                   help="train on the first N images only (tests)")
    p.add_argument("--eval-subset", dest="eval_subset", type=int,
                   help="measure on the first N images of the split only (tests)")
    p.add_argument("--set", action="append", default=[], metavar="[NORM.]KEY=VALUE",
                   help="change a recipe setting (e.g. lr=0.1, bn.stages=32x1,64x2, "
                        "bf16=false); repeatable; see bnlab.lab.speedrun.Recipe")
    p.add_argument("--out", help="run directory (default runs/speedrun-NORMS)")
    p.set_defaults(func=_run)

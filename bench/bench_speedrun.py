"""What each speed idea of the speedrun recipe buys: seconds per training epoch of the
recipe's network (``bnlab.lab.speedrun``) with one idea changed at a time, as ratios against
the recipe itself, measured in one run with interleaved rounds (median of many steps).

Ideas: float32 instead of bfloat16 autocast, NCHW instead of channels-last, torch's BN or
bnlab's fused BN+ReLU instead of bnlab's BN, bnlab's BN on torch's kernels
(``BNLAB_KERNELS=torch`` for that contender), no weight average, torch.compile (its compile
time is reported apart: in a 60 s budget it counts), another batch size, and the recipe
without BN. A step is the worker's: ``train_step`` and, with ``ema``, the average's update.
Contenders alternate call by call (``_timing.rounds_of``); each figure is the median over
rounds of the per-round median step, the spread the range of per-round ratios.

    .venv/bin/python bench/bench_speedrun.py [--rounds 9] [--steps 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine, rounds_of, write_json  # noqa: E402
from bnlab.kernels import use_backend  # noqa: E402
from bnlab.lab.speedrun import RECIPES, build_model, lr_at  # noqa: E402
from bnlab.lab.speedrun.worker import _Averaged  # noqa: E402
from bnlab.lab.train.step import train_step  # noqa: E402


def contenders(base):
    c = {
        "recipe": (base, False),
        "float32": (base.replace(bf16=False), False),
        "NCHW": (base.replace(channels_last=False), False),
        "torch BN": (base.replace(bn_layer="torch"), False),
        "fused BN+ReLU": (base.replace(bn_layer="fused"), False),
        "bnlab BN, torch kernels": (base, "torch kernels"),
        "no weight average": (base.replace(ema=0.0), False),
        "batch 128": (base.replace(batch_size=128), False),
        "batch 512": (base.replace(batch_size=512), False),
        "no BN (recipe 'none')": (RECIPES["none"], False),
        "compiled": (base, True),
    }
    return c


def make_step(recipe, how):
    """One training step of ``recipe``'s network; ``how``: ``True`` compiled, ``"torch
    kernels"`` with bnlab's layers forced onto torch's kernels, else eager."""
    torch.manual_seed(0)
    net = build_model(recipe)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    model = torch.compile(net) if how is True else net
    averaged = _Averaged(net, recipe.ema) if recipe.ema > 0 else None
    fmt = torch.channels_last if recipe.channels_last else torch.contiguous_format
    x = torch.randn(recipe.batch_size, 1, 28, 28).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (recipe.batch_size,))
    count = [0]

    def step():
        train_step(model, opt, x, y, lr=lr_at(recipe, 0.5),
                   label_smoothing=recipe.label_smoothing)
        if averaged is not None:
            averaged.update(count[0])
            count[0] += 1

    if how == "torch kernels":
        plain = step

        def step():
            with use_backend("torch"):
                plain()

    t0 = time.perf_counter()
    step()  # compiles when compiled
    return step, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 512
    base = RECIPES["bn"]
    steps, first = {}, {}
    for name, (recipe, compiled) in contenders(base).items():
        steps[name], first[name] = make_step(recipe, compiled)
        steps[name]()
    samples = rounds_of(steps, args.rounds, args.steps, warmup=1)
    recipes = contenders(base)
    epoch = {k: statistics.median(v) * 60_000 / recipes[k][0].batch_size
             for k, v in samples.items()}
    ref = epoch["recipe"]
    print(f"{'idea':<24} {'s/epoch':>8} {'x recipe':>9} {'spread':>15} {'first step s':>13}")
    rows = {}
    for k, v in epoch.items():
        per = [s * recipes["recipe"][0].batch_size / (r * recipes[k][0].batch_size)
               for s, r in zip(samples[k], samples["recipe"], strict=True)]
        rows[k] = {"epoch_s": v, "ratio": v / ref, "min": min(per), "max": max(per),
                   "first_step_s": first[k]}
        print(f"{k:<24} {v:>8.2f} {v / ref:>9.3f} [{min(per):.3f}, {max(per):.3f}] "
              f"{first[k]:>13.2f}")
    write_json("bench_speedrun", {"machine": machine(), "rounds": args.rounds,
                                       "steps": args.steps, "recipe": base.as_dict(),
                                       "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

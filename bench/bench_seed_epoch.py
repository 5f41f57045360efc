"""Epoch time of the small CNN on Fashion-MNIST: no BN vs torch's BN vs bnlab's BN.

Claim checked: with bnlab's BN the BN overhead, (epoch time with BN - without) / without, is at
most 10% (torch's BN: about 30% on 2 cores, see ``../shared/ANCHORS.md``).

The tutorial's network (PyTorch port): Conv(1,32,3) ReLU BN MaxPool Conv(32,64,3) ReLU BN MaxPool
Flatten Linear(1600,10); Adam, batch 128, the 60000 training images, ``--threads`` threads.
The three variants take turns epoch by epoch (``--epochs`` each); medians are reported.
The images are read by ``bnlab.lab.data.load_dataset`` (``--data-dir``, else bnlab's search path,
which includes Debian's ``dataset-fashion-mnist``); the network is ``bnlab.lab.models.small_cnn``.

    python bench/bench_seed_epoch.py [--epochs 3] [--threads 2] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import _timing
import bnlab
from bnlab.lab.commands.info import environment
from bnlab.lab.data import load_dataset
from bnlab.lab.models import small_cnn

NORMS = {"none": "none", "torch": "torch-bn", "bnlab": "bn"}  # variant -> bnlab.norms name


def epoch(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        idx = perm[i : i + batch]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=_timing.RESULTS / "bench_seed_epoch.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist", args.data_dir)
    x, y = data.x_train, data.y_train
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    variants = ("none", "torch", "bnlab")
    runs = {}
    for v in variants:
        torch.manual_seed(0)
        model = small_cnn(NORMS[v])
        runs[v] = (model, torch.optim.Adam(model.parameters(), 1e-3))
    times: dict[str, list[float]] = {v: [] for v in variants}
    for e in range(args.epochs + 1):  # the first epoch of each variant is a warm-up
        for v in variants:
            t = epoch(*runs[v], x, y, args.batch)
            if e > 0:
                times[v].append(t)
            print(f"epoch {e} {v:6s} {t:7.2f} s", flush=True)
    med = {v: statistics.median(times[v]) for v in variants}
    over = {v: (med[v] - med["none"]) / med["none"] for v in ("torch", "bnlab")}
    print(f"median epoch: none {med['none']:.2f} s, torch BN {med['torch']:.2f} s, "
          f"bnlab BN {med['bnlab']:.2f} s (backend {bnlab.kernels.backend()})")  # fmt: skip
    print(f"BN overhead: torch {over['torch']:+.1%}, bnlab {over['bnlab']:+.1%} (target <= 10%)")
    payload = {
        "environment": environment(),
        "images": len(x), "batch": args.batch, "epoch_s": times, "median_s": med,
        "bn_overhead": over,
    }  # fmt: skip
    _timing.write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

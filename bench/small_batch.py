"""Small-batch check on Fashion-MNIST: BN, Batch Renorm, Ghost BN and GroupNorm.

Claim checked: BN's validation accuracy degrades at tiny per-step batches, while GroupNorm
(batch-independent) and Batch Renorm (corrected towards the running statistics) degrade
less (Wu & He 2018; Ioffe 2017). Evidence: one small CNN per normaliser and batch size,
trained on the same subset for the same number of samples (one pass over
``--train-samples``), Adam lr 1e-3, evaluated in eval mode (running statistics) on
``--val-samples`` test images. Machine: whatever runs it (CPU); the table is printed.

Settings: Batch Renorm r_max=3, d_max=5, warm-up 10% of the steps, limits relaxed linearly
over the next 40%; Ghost BN with virtual batches of max(2, B // 4) samples (at B <= 8 that is
2, at B = 32 it is 8); GroupNorm with 8 groups.

    python bench/small_batch.py [--train-samples 4000] [--val-samples 2000] [--seeds 1]
        [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import bnlab
from bnlab.lab.data import Dataset, load_dataset

BATCHES = (2, 4, 8, 32)
NORMS = ("bn", "renorm", "ghost", "gn")


def load(data: Dataset, split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` seeded-random images of ``split``, standardised with Fashion-MNIST's mean/std."""
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    return (x[idx] - 0.286) / 0.353, y[idx]


def norm_layer(name: str, c: int, batch: int, steps: int) -> nn.Module:
    if name == "renorm":
        warm = steps // 10
        return bnlab.BatchRenorm2d(
            c, warmup_steps=warm, relax_steps=max(1, (4 * steps) // 10)
        )
    if name == "ghost":
        return bnlab.GhostBatchNorm2d(c, virtual_batch_size=max(2, batch // 4))
    return bnlab.make_norm(name, c, 2)


def cnn(name: str, batch: int, steps: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, bias=False), norm_layer(name, 16, batch, steps), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, bias=False), norm_layer(name, 32, batch, steps), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 5 * 5, 10),
    )


def run(name: str, batch: int, train, val, seed: int) -> float:
    x, y = train
    steps = len(y) // batch
    torch.manual_seed(seed)
    model = cnn(name, batch, steps)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    model.train()
    for s in range(steps):
        idx = perm[s * batch : (s + 1) * batch]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return (model(val[0]).argmax(1) == val[1]).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train-samples", type=int, default=4000)
    p.add_argument("--val-samples", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the Fashion-MNIST IDX files (default: bnlab's search path)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny batches: 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist", args.data_dir)
    train = load(data, "train", args.train_samples, seed=0)
    val = load(data, "test", args.val_samples, seed=1)
    t0 = time.perf_counter()
    print(f"Fashion-MNIST: {args.train_samples} training images (one pass), "
          f"{args.val_samples} test images; {args.seeds} seed(s); torch {torch.__version__}")
    print("validation accuracy (eval mode), mean over seeds [min-max]")
    print(f"{'norm':>8} " + " ".join(f"{'B=' + str(b):>19}" for b in BATCHES))
    for name in NORMS:
        cells = []
        for b in BATCHES:
            accs = [run(name, b, train, val, seed) for seed in range(args.seeds)]
            cell = f"{statistics.mean(accs):.3f}"
            if len(accs) > 1:
                cell += f" [{min(accs):.3f}-{max(accs):.3f}]"
            cells.append(f"{cell:>19}")
        print(f"{name:>8} " + " ".join(cells), flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

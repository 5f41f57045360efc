"""A small real training run for the fault-injection tests: ``python -m tests._fault_run OUT``.

Two epochs of 3 steps on synthetic 1x28x28 images (no data files, so a run costs little more
than importing torch), with BN monitoring on, so every file of a run directory is written.
``BNLAB_KILL_AT=N`` kills it at its N-th write (see ``bnlab.lab.train.rundir.fault_point``).
"""

from __future__ import annotations

import sys

import torch

from bnlab.lab.data import Dataset
from bnlab.lab.train import TrainConfig, train

CONFIG = TrainConfig(norm="bn-window", epochs=2, batch_size=32, schedule="cosine", seed=3,
                     threads=1, monitor=True, monitor_every=2)


def synthetic(n_train: int = 96, n_test: int = 32, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    x = torch.rand(n_train + n_test, 1, 28, 28, generator=g) * 0.5
    for c in range(10):
        x[y == c, :, 2 * c : 2 * c + 6, 4:20] += 0.5
    return Dataset("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:], "test")


if __name__ == "__main__":
    train(CONFIG, sys.argv[1], dataset=synthetic(), resume="--resume" in sys.argv[2:])

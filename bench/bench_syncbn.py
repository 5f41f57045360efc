"""SyncBatchNorm forward+backward overhead against local BN with 2 gloo processes (CPU).

Claim measured: the cost of synchronising BN statistics over 2 ranks on one machine.
Each rank times ``repeats`` forward+backward passes of a bnlab.SyncBatchNorm (one all_gather
forward, one all_reduce backward) and of a local bnlab.BatchNorm2d on the same tensor,
interleaved, after a warm-up; rank 0 prints medians and the ratio sync/local per shape.
The ranks run with OMP_NUM_THREADS=1 (2 cores, 2 processes).

    python bench/bench_syncbn.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bnlab

SHAPES = [(32, 16, 16, 16), (64, 32, 8, 8), (16, 64, 28, 28)]


def _time(layer, x, gy) -> float:
    xr = x.clone().requires_grad_(True)
    t0 = time.perf_counter()
    (layer(xr) * gy).sum().backward()
    return time.perf_counter() - t0


def _rank(rank: int, world: int, init: str, repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    rows = []
    for shape in SHAPES:
        torch.manual_seed(rank)
        x, gy = torch.randn(shape), torch.randn(shape)
        sync, local = bnlab.SyncBatchNorm(shape[1]), bnlab.BatchNorm2d(shape[1])
        for _ in range(5):
            _time(sync, x, gy)
            _time(local, x, gy)
        ts, tl = [], []
        for _ in range(repeats):
            dist.barrier()
            ts.append(_time(sync, x, gy))
            dist.barrier()
            tl.append(_time(local, x, gy))
        rows.append((shape, statistics.median(tl), statistics.median(ts)))
    if rank == 0:
        print(f"torch {torch.__version__}, {world} gloo ranks on one machine, "
              f"{repeats} repeats, medians per rank")
        print(f"{'shape per rank':>22} {'local BN ms':>12} {'SyncBN ms':>10} {'ratio':>6}")
        for shape, tl, ts in rows:
            print(f"{str(shape):>22} {tl * 1e3:12.3f} {ts * 1e3:10.3f} {ts / tl:6.2f}")
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--world", type=int, default=2)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(args.world, f"{tmp}/init", args.repeats), nprocs=args.world)
    return 0


if __name__ == "__main__":
    sys.exit(main())

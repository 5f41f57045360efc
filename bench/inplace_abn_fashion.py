"""A network a user would train: small_resnet with leaky ReLU on Fashion-MNIST, eager BN
against in-place activated BN, several seeds.

Both nets are ``bnlab.lab.models.small_resnet(act="leaky_relu")``: one with torch's
``nn.BatchNorm2d`` followed by ``nn.LeakyReLU`` (``norm="torch-bn"``), one with
``bnlab.BatchNormAct2d(inplace=True)`` (``bn_act="inplace"``). Same initial weights per seed
(the state dicts have the same keys), same batches (Adam, lr 1e-3, batch 128). Each run is a
fresh subprocess, so its peak resident memory is its own; reported per net: test accuracy
(mean and sd over seeds), the peak RSS growth over one training epoch, and the median epoch
time. The claim checked: the same accuracy within the seed spread, with less memory.

    python bench/inplace_abn_fashion.py [--seeds 3] [--epochs 2] [--train 60000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import _timing
from bnlab.lab.data.datasets import batch_order, load_dataset
from bnlab.lab.models import small_resnet

NETS = {"eager": {"norm": "torch-bn"}, "inplace": {"bn_act": "inplace"}}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def run_one(net: str, seed: int, epochs: int, train: int) -> dict:
    data = load_dataset("fashion-mnist").subset(train=train)
    mean, std = 0.2860, 0.3530  # Fashion-MNIST's pixel mean and std
    x_train, x_test = (data.x_train - mean) / std, (data.x_test - mean) / std
    torch.manual_seed(seed)
    model = small_resnet(act="leaky_relu", **NETS[net])
    # the same initial weights for both nets of a seed
    torch.manual_seed(seed)
    model.load_state_dict(small_resnet(act="leaky_relu").state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    epoch_times, peaks = [], []
    for epoch in range(epochs):
        model.train()
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM)
        before = _rss_kib("VmRSS")
        t0 = time.perf_counter()
        for idx in batch_order(len(x_train), 128, seed, epoch):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x_train[idx]), data.y_train[idx])
            loss.backward()
            opt.step()
        epoch_times.append(time.perf_counter() - t0)
        peaks.append((_rss_kib("VmHWM") - before) * 1024)
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x_test[i:i + 1000]).argmax(1) == data.y_test[i:i + 1000]).sum())
                      for i in range(0, len(x_test), 1000))  # fmt: skip
    return {"net": net, "seed": seed, "accuracy": correct / len(x_test),
            "epoch_seconds": epoch_times, "peak_rss_growth_bytes": peaks}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train", type=int, default=60000, help="training examples used")
    p.add_argument("--child", nargs=2, metavar=("NET", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=_timing.RESULTS / "inplace_abn_fashion.json")
    args = p.parse_args(argv)
    if args.child:
        res = run_one(args.child[0], int(args.child[1]), args.epochs, args.train)
        print(json.dumps(res))
        return 0
    runs = []
    for seed in range(args.seeds):
        for net in NETS:
            out = subprocess.run(
                [sys.executable, __file__, "--child", net, str(seed), "--epochs",
                 str(args.epochs), "--train", str(args.train)],
                check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            runs.append(json.loads(out.strip().splitlines()[-1]))
            r = runs[-1]
            print(f"seed {seed} {net:8} accuracy {r['accuracy']:.4f} "
                  f"epoch {statistics.median(r['epoch_seconds']):.1f} s "
                  f"peak +{max(r['peak_rss_growth_bytes']) / 2**20:.0f} MiB", flush=True)
    summary = {}
    for net in NETS:
        rs = [r for r in runs if r["net"] == net]
        acc = [r["accuracy"] for r in rs]
        summary[net] = {
            "accuracy_mean": statistics.mean(acc),
            "accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "epoch_seconds_median": statistics.median(t for r in rs for t in r["epoch_seconds"]),
            "peak_rss_growth_bytes_median": statistics.median(
                max(r["peak_rss_growth_bytes"]) for r in rs),
        }  # fmt: skip
    e, i = summary["eager"], summary["inplace"]
    print(f"\nsmall_resnet(leaky_relu), Fashion-MNIST ({args.train} train, 10000 test), "
          f"{args.epochs} epochs, {args.seeds} seeds")  # fmt: skip
    for net, s in summary.items():
        print(f"{net:8} accuracy {s['accuracy_mean']:.4f} +- {s['accuracy_sd']:.4f}  "
              f"epoch {s['epoch_seconds_median']:.1f} s  "
              f"peak RSS growth {s['peak_rss_growth_bytes_median'] / 2**20:.0f} MiB")
    time_ratio = i["epoch_seconds_median"] / e["epoch_seconds_median"]
    peak_ratio = i["peak_rss_growth_bytes_median"] / e["peak_rss_growth_bytes_median"]
    print(f"in-place / eager: epoch time {time_ratio:.3f}, peak RSS growth {peak_ratio:.3f}; "
          f"accuracy difference {i['accuracy_mean'] - e['accuracy_mean']:+.4f}")
    _timing.write_json(args.out, {"environment": _timing.machine(),
                                  "args": vars(args) | {"out": str(args.out)},
                                  "runs": runs, "summary": summary})  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

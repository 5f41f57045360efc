"""Inference latency: BN folded by bnlab vs unfolded eager vs torch.fx.experimental fuse.

Claim: folding an evaluation-mode BN into the neighbouring convolution removes the BN's
elementwise pass, so the folded model is faster at the same output. Measured on the small CNN
(BN after ReLU, as in the tutorial, and BN before ReLU), and a small ResNet for 28x28 inputs, at
batch 1 and 64 (``bnlab.lab.models.small_cnn`` and ``small_resnet``, with torch's BN layers).
Every variant runs in the same process, interleaved in rounds; the numbers are medians of
per-call times and ratios against the unfolded model of the same run.

Usage: python bench/bench_fold.py [--rounds 30] [--threads 1] [--json runs/bench_fold.json]

At batch 64 glibc returns the freed 5 MB activation buffers to the OS and every forward pays
page faults that depend on the allocation pattern, not on the arithmetic (measured: eager
21-29 ms vs 15 ms). For stable numbers run with
``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from bnlab.lab.commands.info import environment
from bnlab.lab.models import small_cnn, small_resnet
from bnlab.tools import fold


def _prepare(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():  # realistic, non-trivial running statistics
        for _ in range(5):
            model(torch.rand(64, 1, 28, 28))
    return model.eval()


def _time(fn, x, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t)
    return out


def bench(models: dict[str, nn.Module], batches: list[int], rounds: int) -> list[dict]:
    rows = []
    for mname, model in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x0 = torch.rand(2, 1, 28, 28)
            folded = fold(model, x0)
        fused = fuse(model)
        report = folded.fold_report
        with torch.inference_mode():
            fx_err = float((fused(x0) - model(x0)).abs().max())
        variants = {"eager": model, "bnlab.fold": folded, "fx fuse": fused}
        for bs in batches:
            x = torch.rand(bs, 1, 28, 28)
            reps = 20 if bs == 1 else 3
            times: dict[str, list[float]] = {k: [] for k in variants}
            with torch.inference_mode():
                for fn in variants.values():
                    _time(fn, x, 5)  # warm-up
                for _ in range(rounds):
                    for k, fn in variants.items():
                        times[k] += _time(fn, x, reps)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({
                "model": mname, "batch": bs,
                "bn_layers": len(report.folded) + len(report.not_folded),
                "folded": len(report.folded),
                "fold_max_abs_error": report.max_abs_error, "fx_fuse_max_abs_error": fx_err,
                **{f"median_ms_{k}": 1e3 * v for k, v in med.items()},
                "ratio_fold_vs_eager": med["bnlab.fold"] / med["eager"],
                "ratio_fxfuse_vs_eager": med["fx fuse"] / med["eager"],
                "ratio_fold_vs_fxfuse": med["bnlab.fold"] / med["fx fuse"],
            })
            r = rows[-1]
            print(f"{mname:22s} b={bs:<3d} BN {r['folded']}/{r['bn_layers']} folded  "
                  f"eager {r['median_ms_eager']:.3f} ms  fold {r['median_ms_bnlab.fold']:.3f} ms "
                  f"({r['ratio_fold_vs_eager']:.3f}x)  fx.fuse {r['median_ms_fx fuse']:.3f} ms "
                  f"({r['ratio_fxfuse_vs_eager']:.3f}x)", flush=True)
        if report.not_folded:
            print(f"  not folded in {mname}: " +
                  "; ".join(f"{n}: {w}" for n, w in report.not_folded))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 avoids oversubscription on a busy 2-core machine)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    models = {
        # torch's BN layers, so that torch.fx's fuse (which knows only those) is a fair peer
        "small CNN (BN after ReLU)": _prepare(small_cnn("torch-bn", "after")),
        "small CNN (BN before ReLU)": _prepare(small_cnn("torch-bn", "before")),
        "small ResNet": _prepare(small_resnet("torch-bn")),
    }
    rows = bench(models, [int(b) for b in args.batches.split(",")], args.rounds)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"env": environment(), "rows": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""bnlab BatchNorm2d vs torch.nn.BatchNorm2d vs a copy_ of the same tensor.

Forward and forward+backward in training mode, NCHW and channels-last, on the shapes of the
seed's CNN and two larger ones. Each number is a median over many repeats, measured in
alternating rounds in one run; the table prints ratios against torch and against copy_.

    python bench/bench_bn.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402
import bnlab  # noqa: E402

SHAPES = [(128, 32, 26, 26), (128, 64, 11, 11), (64, 64, 56, 56), (256, 256, 14, 14)]


def _contenders(shape, fmt, backward):
    x = torch.randn(shape).contiguous(memory_format=fmt)
    dy = torch.randn(shape).contiguous(memory_format=fmt)
    ours = bnlab.BatchNorm2d(shape[1])
    theirs = torch.nn.BatchNorm2d(shape[1])
    out = torch.empty_like(x)
    xg = x.clone().requires_grad_(backward)

    def run(layer):
        def f():
            y = layer(xg)
            if backward:
                y.backward(dy)
                xg.grad = None
        return f

    def copy():
        out.copy_(x)

    return {"torch": run(theirs), "bnlab": run(ours), "copy_": copy}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    args = p.parse_args(argv)
    rounds, repeats = (2, 2) if args.quick else (args.rounds, args.repeats)
    rows = []
    print(f"bnlab {bnlab.__version__}, kernel backend: {_backend()}, {_timing.machine()}")
    header = (f"{'shape':>18} {'layout':>13} {'pass':>8} {'torch ms':>9} {'bnlab ms':>9} "
              f"{'copy_ ms':>9} {'bnlab/torch':>11} {'torch/copy':>10} {'bnlab/copy':>10}")
    print(header)
    for shape in SHAPES:
        for fmt_name, fmt in (("NCHW", torch.contiguous_format),
                              ("channels_last", torch.channels_last)):
            for backward in (False, True):
                with torch.set_grad_enabled(backward):
                    t = _timing.interleaved_medians(_contenders(shape, fmt, backward),
                                                    rounds=rounds, repeats=repeats)
                row = {
                    "shape": list(shape), "layout": fmt_name,
                    "pass": "fwd+bwd" if backward else "fwd",
                    "torch_s": t["torch"], "bnlab_s": t["bnlab"], "copy_s": t["copy_"],
                    "bnlab_over_torch": t["bnlab"] / t["torch"],
                    "torch_over_copy": t["torch"] / t["copy_"],
                    "bnlab_over_copy": t["bnlab"] / t["copy_"],
                }
                rows.append(row)
                print(f"{str(shape):>18} {fmt_name:>13} {row['pass']:>8} "
                      f"{t['torch'] * 1e3:9.2f} {t['bnlab'] * 1e3:9.2f} {t['copy_'] * 1e3:9.2f} "
                      f"{row['bnlab_over_torch']:11.2f} {row['torch_over_copy']:10.1f} "
                      f"{row['bnlab_over_copy']:10.1f}", flush=True)
    path = _timing.write_json("bench_bn", {"machine": _timing.machine(),
                                           "backend": _backend(), "rows": rows})
    print(f"wrote {path}")
    return 0


def _backend() -> str:
    try:
        from bnlab.kernels import backend
    except ImportError:
        return "torch"
    return backend()


if __name__ == "__main__":
    sys.exit(main())

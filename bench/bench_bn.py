"""bnlab BatchNorm2d vs torch.nn.BatchNorm2d vs a copy_ of the same tensor.

Forward and forward+backward in training mode and the evaluation forward, NCHW and
channels-last, on the shapes of the seed's CNN and two larger ones (and, reported without a
target: the fused BatchNormAct2d against BatchNorm2d + ReLU on those shapes, small late-stage
feature maps, and BatchNorm1d on (N, C) inputs). Each number is a median
over many repeats, measured in alternating rounds in one run; the table prints ratios against
torch and against copy_, and the last lines whether the targets hold: training
forward+backward at most 0.33x torch on NCHW and 1.0x on channels-last, evaluation forward at
most 1.0x (``bench/bench_kernels.py`` checks the same targets with the two libraries
alternating call by call, which leaves each one's caches cold for the other).

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
# reported, no target: late feature maps of a ResNet, and BatchNorm1d on (N, C) inputs
EXTRA_SHAPES = [(64, 512, 7, 7), (256, 1024, 2, 2), (128, 256), (512, 1024), (256, 4096),
                (4096, 256)]  # fmt: skip


PASSES = ("fwd", "fwd+bwd", "eval")
# on the target shapes, also reported: bnlab.BatchNormAct2d(act="relu") against torch's
# BatchNorm2d followed by ReLU, forward+backward
FUSED = "bn+relu"
# the worst bnlab/torch ratio allowed per (pass, layout); the training forward alone has none
TARGETS = {("fwd+bwd", "NCHW"): 0.33, ("fwd+bwd", "channels_last"): 1.0,
           ("eval", "NCHW"): 1.0, ("eval", "channels_last"): 1.0}  # fmt: skip


def _contenders(shape, fmt, pass_):
    backward = pass_ in ("fwd+bwd", FUSED)
    x = torch.randn(shape).contiguous(memory_format=fmt)
    dy = torch.randn(shape).contiguous(memory_format=fmt)
    two_d = len(shape) == 2
    ours = (bnlab.BatchNorm1d if two_d else bnlab.BatchNorm2d)(shape[1])
    theirs = (torch.nn.BatchNorm1d if two_d else torch.nn.BatchNorm2d)(shape[1])
    if pass_ == FUSED:
        ours = bnlab.BatchNormAct2d(shape[1], act="relu")
        theirs = torch.nn.Sequential(theirs, torch.nn.ReLU())
    if pass_ == "eval":
        ours.eval()
        theirs.eval()
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
    layouts = {4: (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)),
               2: (("(N, C)", torch.contiguous_format),)}  # fmt: skip
    for shape in SHAPES + EXTRA_SHAPES:
        for fmt_name, fmt in layouts[len(shape)]:
            for pass_ in PASSES + ((FUSED,) if shape in SHAPES else ()):
                with torch.set_grad_enabled(pass_ in ("fwd+bwd", FUSED)):
                    t = _timing.interleaved_medians(_contenders(shape, fmt, pass_),
                                                    rounds=rounds, repeats=repeats)
                row = {
                    "shape": list(shape), "layout": fmt_name, "pass": pass_,
                    "has_target": shape in SHAPES,
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
    verdicts = []
    for (pass_, layout), target in TARGETS.items():
        judged = [r for r in rows if r["has_target"] and r["pass"] == pass_]
        worst = max(r["bnlab_over_torch"] for r in judged if r["layout"] == layout)
        verdicts.append({"pass": pass_, "layout": layout, "worst_ratio": worst,
                         "target": target, "met": worst <= target})  # fmt: skip
        print(f"{pass_:>8} {layout:>13}: worst bnlab/torch {worst:.2f} (target <= {target}): "
              f"{'met' if worst <= target else 'NOT met'}")
    path = _timing.write_json("bench_bn", {"machine": _timing.machine(), "backend": _backend(),
                                           "rounds": rounds, "repeats": repeats, "rows": rows,
                                           "targets": verdicts})  # fmt: skip
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

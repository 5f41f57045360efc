"""Print how far bnlab's layers are from torch's, configuration by configuration.

For BatchNorm1d/2d/3d and every torch configuration (momentum 0.1 / None / 0.7, affine on/off,
track_running_stats on/off, bias off), five training steps with random inputs and random
upstream gradients, then evaluation: the largest absolute difference in outputs, input
gradients and running statistics, and the largest relative difference in parameter
gradients, on the active kernel backend.

    python bench/parity_torch.py        # BNLAB_KERNELS=torch for the pure-PyTorch path
"""

from __future__ import annotations

import itertools

import torch

import bnlab

SHAPES = {
    "1d (32,16)": (bnlab.BatchNorm1d, torch.nn.BatchNorm1d, (32, 16)),
    "1d (16,16,20)": (bnlab.BatchNorm1d, torch.nn.BatchNorm1d, (16, 16, 20)),
    "2d (16,16,12,12)": (bnlab.BatchNorm2d, torch.nn.BatchNorm2d, (16, 16, 12, 12)),
    "3d (8,16,4,6,6)": (bnlab.BatchNorm3d, torch.nn.BatchNorm3d, (8, 16, 4, 6, 6)),
}
CONFIGS = [dict(momentum=m, affine=a, track_running_stats=t)
           for m, a, t in itertools.product([0.1, None, 0.7], [True, False], [True, False])]
CONFIGS.append(dict(momentum=0.1, affine=True, track_running_stats=True, bias=False))


def worst_differences(ours_cls, torch_cls, shape, kw, steps: int = 5) -> dict[str, float]:
    torch.manual_seed(0)
    ours, theirs = ours_cls(shape[1], **kw), torch_cls(shape[1], **kw)
    if ours.weight is not None:
        with torch.no_grad():
            w = torch.rand(shape[1]) + 0.5
            ours.weight.copy_(w)
            theirs.weight.copy_(w)
    worst = dict.fromkeys(["output", "input grad", "param grad", "running stats"], 0.0)
    for step in range(steps):
        x = torch.randn(shape) * 3 + step
        dy = torch.randn(shape)
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yt = ours(xo), theirs(xt)
        yo.backward(dy)
        yt.backward(dy)
        worst["output"] = max(worst["output"], (yo - yt).abs().max().item())
        worst["input grad"] = max(worst["input grad"], (xo.grad - xt.grad).abs().max().item())
        for name in ("weight", "bias"):
            po, pt = getattr(ours, name), getattr(theirs, name)
            if po is not None:
                # relative: a parameter gradient sums N*H*W terms, so its size grows with them
                rel = ((po.grad - pt.grad).abs().max() / pt.grad.abs().max().clamp_min(1e-12))
                worst["param grad"] = max(worst["param grad"], rel.item())
        if ours.track_running_stats:
            for name in ("running_mean", "running_var"):
                d = (getattr(ours, name) - getattr(theirs, name)).abs().max().item()
                worst["running stats"] = max(worst["running stats"], d)
    ours.eval()
    theirs.eval()
    x = torch.randn(shape) * 3
    worst["output"] = max(worst["output"], (ours(x) - theirs(x)).abs().max().item())
    return worst


def main() -> int:
    print(f"kernel backend: {bnlab.kernels.backend()}, torch {torch.__version__}")
    overall = dict.fromkeys(["output", "input grad", "param grad", "running stats"], 0.0)
    print(f"{'layer':>18} {'config':>44} {'output':>9} {'in grad':>9} {'par rel':>9} "
          f"{'run stats':>9}")
    for label, (oc, tc, shape) in SHAPES.items():
        for kw in CONFIGS:
            w = worst_differences(oc, tc, shape, kw)
            for k in overall:
                overall[k] = max(overall[k], w[k])
            cfg = ",".join(f"{k[:5]}={v}" for k, v in kw.items())
            print(f"{label:>18} {cfg:>44} {w['output']:9.1e} {w['input grad']:9.1e} "
                  f"{w['param grad']:9.1e} {w['running stats']:9.1e}")
    print("worst over all: " + ", ".join(f"{k} {v:.1e}" for k, v in overall.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

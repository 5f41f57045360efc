"""Study ``depth``: does BN tame vanishing/exploding gradients in deep plain MLPs?"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..norms import make_norm
from . import _data
from ._base import Study, StudyContext, StudyResult, Table, fmt_ms, mean_std
from ._fit import FitConfig, fit
from ._plots import line_plot

ACTS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}


def deep_mlp(depth: int, act: str, bn: bool, width: int = 64) -> nn.Sequential:
    """``depth`` hidden layers of ``width`` (Linear, optional BN, activation), PyTorch init."""
    layers: list[nn.Module] = [nn.Flatten()]
    cin = 784
    for _ in range(depth):
        layers += [nn.Linear(cin, width), make_norm("bn" if bn else "none", width, dim=1),
                   ACTS[act]()]
        cin = width
    layers.append(nn.Linear(cin, 10))
    return nn.Sequential(*layers)


def layer_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Gradient norm of each hidden Linear weight for one batch, first layer first."""
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]
    return [m.weight.grad.norm().item() for m in linears]


def run(ctx: StudyContext) -> StudyResult:
    s = ctx.settings
    data = _data.images(ctx)
    depths = [int(d) for d in str(s["depths"]).split(",")]
    xb, yb = data.x_train[:256], data.y_train[:256]
    rows, ratios, accs, curves = [], {}, {}, {}
    for depth in depths:
        for act in ACTS:
            for bn in (False, True):
                key = (depth, act, bn)
                ratios[key], accs[key] = [], []
                for seed in ctx.seeds:
                    torch.manual_seed(seed)
                    model = deep_mlp(depth, act, bn)
                    g0 = layer_grad_norms(model, xb, yb)
                    cfg = FitConfig(steps=s["steps"], batch_size=128, lr=s["lr"],
                                    optimizer="sgd", momentum=0.9, seed=seed)
                    res = fit(model, data.x_train, data.y_train, data.x_test, data.y_test, cfg)
                    g1 = layer_grad_norms(model, xb, yb)
                    # first/last hidden layer gradient ratio: << 1 vanishing, >> 1 exploding
                    ratios[key].append(math.log10(max(g0[0], 1e-30) / max(g0[-1], 1e-30)))
                    accs[key].append(res.final_test_acc)
                    if seed == ctx.seeds[0]:
                        curves[key] = (g0, g1)
                ctx.log(f"depth {depth} {act} bn={bn}: log10 ratio "
                        f"{mean_std(ratios[key])[0]:+.1f}, acc {mean_std(accs[key])[0]:.3f}")
                rows.append([depth, act, "BN" if bn else "-", fmt_ms(ratios[key], 1),
                             fmt_ms(accs[key], 3)])
    # Claim holds where BN brings the ratio towards 1 (|log| smaller) and trains better.
    better_grad = better_acc = total = 0
    for depth in depths:
        for act in ACTS:
            total += 1
            a = abs(mean_std(ratios[(depth, act, True)])[0])
            b = abs(mean_std(ratios[(depth, act, False)])[0])
            better_grad += a < b - 0.3
            better_acc += mean_std(accs[(depth, act, True)])[0] > \
                mean_std(accs[(depth, act, False)])[0] + 0.02
    verdict = "supported" if better_grad >= total * 2 / 3 and better_acc >= total / 2 else (
        "contradicted" if better_grad <= total / 3 and better_acc <= total / 3 else "not shown")
    worst = max(depths)
    evidence = (
        f"BN brought the first/last-layer gradient ratio closer to 1 in {better_grad}/{total} "
        f"settings and raised accuracy by >2 points in {better_acc}/{total}; at depth {worst} "
        f"with sigmoid: log10 ratio {mean_std(ratios[(worst, 'sigmoid', False)])[0]:+.1f} "
        f"without vs {mean_std(ratios[(worst, 'sigmoid', True)])[0]:+.1f} with BN, accuracy "
        f"{mean_std(accs[(worst, 'sigmoid', False)])[0]:.3f} vs "
        f"{mean_std(accs[(worst, 'sigmoid', True)])[0]:.3f}"
    )
    figs = []
    for act in ACTS:
        series = {}
        for bn in (False, True):
            g0, g1 = curves[(worst, act, bn)]
            tag = "BN" if bn else "no BN"
            series[f"{tag}, init"] = (list(range(1, len(g0) + 1)), g0, None)
            series[f"{tag}, trained"] = (list(range(1, len(g1) + 1)), g1, None)
        figs.append((f"Gradient norm per layer, depth {worst}, {act}",
                     line_plot(ctx.figure_path(f"grads_{act}"), series,
                               title=f"depth {worst}, {act}", xlabel="hidden layer",
                               ylabel="weight gradient norm", logy=True)))
    return StudyResult(
        verdict=verdict, evidence=evidence,
        measured=f"Per-layer gradient norms at initialisation and after training, and accuracy, "
                 f"of plain MLPs (depths {depths}) on {data.name}.",
        tables=[Table("Gradient ratio (log10 first/last hidden layer at init) and accuracy",
                      ["depth", "activation", "norm", "log10 grad ratio", "test acc"], rows)],
        figures=figs,
        numbers={"ratios": {str(k): v for k, v in ratios.items()},
                 "accs": {str(k): v for k, v in accs.items()}},
    )


STUDY = Study(
    name="depth",
    claim="BN reduces vanishing and exploding gradients, so deep networks train.",
    method="Plain MLPs of width 64 with 10/20/50 hidden layers, sigmoid, tanh and ReLU, PyTorch "
           "default init, with and without BN after each Linear; SGD momentum 0.9, batch 128.",
    presets={
        "quick": {"depths": "10,20,50", "steps": 300, "lr": 0.05, "train": 10000, "test": 2000},
        "full": {"depths": "10,20,50", "steps": 3000, "lr": 0.05, "train": 0, "test": 0},
    },
    run=run,
)

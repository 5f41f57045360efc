"""Study ``depth``: does BN tame vanishing/exploding gradients in deep plain MLPs?"""

from __future__ import annotations

import math

import torch
from torch import nn

from bnlab.norms import make_norm

from ..report.plots import line_plot
from . import _data
from ._base import Comparison, Study, StudyContext, StudyResult, Table, fmt_ms, judge, mean_std
from ._fit import FitConfig, fit_seeds

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


def decide(numbers: dict) -> list[Comparison]:
    """Headline: per seed, |log10 first/last hidden-layer gradient ratio| at initialisation
    averaged over depths and activations, BN vs none (0: no vanishing or exploding)."""
    ratios, accs, depths = numbers["ratios"], numbers["accs"], numbers["depths"]
    settings = [(d, a) for d in depths for a in ACTS]
    n = len(ratios[str((depths[0], "relu", True))])

    def mean_abs(bn: bool, k: int) -> float:
        return sum(abs(ratios[str((d, a, bn))][k]) for d, a in settings) / len(settings)

    deepest = max(depths)

    def deep_acc(bn: bool, k: int) -> float:
        return sum(accs[str((deepest, a, bn))][k] for a in ACTS) / len(ACTS)

    return [
        judge("|log10 gradient ratio| at init, mean over depths and activations",
              [mean_abs(True, k) for k in range(n)], [mean_abs(False, k) for k in range(n)],
              with_label="BN", without_label="no BN", higher_is_better=False,
              min_effect=0.3),
        judge(f"test accuracy at depth {deepest}, mean over activations",
              [deep_acc(True, k) for k in range(n)], [deep_acc(False, k) for k in range(n)],
              with_label="BN", without_label="no BN"),
    ]


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
                g0s: list[list[float]] = []

                def build(depth=depth, act=act, bn=bn, g0s=g0s) -> nn.Module:
                    model = deep_mlp(depth, act, bn)
                    g0s.append(layer_grad_norms(model, xb, yb))  # at initialisation
                    return model

                cfg = FitConfig(steps=s["steps"], batch_size=128, lr=s["lr"], optimizer="sgd",
                                momentum=0.9)
                trained = fit_seeds(build, ctx.seeds, data.x_train, data.y_train, data.x_test,
                                    data.y_test, cfg)
                # first/last hidden layer gradient ratio: << 1 vanishing, >> 1 exploding
                ratios[key] = [math.log10(max(g0[0], 1e-30) / max(g0[-1], 1e-30)) for g0 in g0s]
                accs[key] = [res.final_test_acc for _, res in trained]
                curves[key] = (g0s[0], layer_grad_norms(trained[0][0], xb, yb))
                ctx.log(f"depth {depth} {act} bn={bn}: log10 ratio "
                        f"{mean_std(ratios[key])[0]:+.1f}, acc {mean_std(accs[key])[0]:.3f}")
                rows.append([depth, act, "BN" if bn else "-", fmt_ms(ratios[key], 1),
                             fmt_ms(accs[key], 3)])
    numbers = {"depths": depths, "ratios": {str(k): v for k, v in ratios.items()},
               "accs": {str(k): v for k, v in accs.items()}}
    comparisons = decide(numbers)
    worst = max(depths)
    evidence = (
        f"{comparisons[0].sentence(2)}; {comparisons[1].sentence()}; at depth {worst} with "
        f"sigmoid: log10 ratio {mean_std(ratios[(worst, 'sigmoid', False)])[0]:+.1f} without "
        f"vs {mean_std(ratios[(worst, 'sigmoid', True)])[0]:+.1f} with BN"
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
        verdict=comparisons[0].verdict, evidence=evidence, comparisons=comparisons,
        measured=f"Per-layer gradient norms at initialisation and after training, and accuracy, "
                 f"of plain MLPs (depths {depths}) on {data.name}.",
        tables=[Table("Gradient ratio (log10 first/last hidden layer at init) and accuracy",
                      ["depth", "activation", "norm", "log10 grad ratio", "test acc"], rows)],
        figures=figs,
        numbers=numbers,
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
    decide=decide,
)

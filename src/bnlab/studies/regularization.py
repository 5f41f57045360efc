"""Study ``regularization``: BN vs dropout vs L2, their combinations, and dropout before BN."""

from __future__ import annotations

import torch
from torch import nn

from ..norms import make_norm
from . import _data
from ._base import Study, StudyContext, StudyResult, Table, compare, fmt_ms, mean_std
from ._fit import FitConfig, fit

# name -> (BN, dropout placement, weight decay)
CONFIGS = {
    "none": (False, None, 0.0),
    "bn": (True, None, 0.0),
    "dropout": (False, "head", 0.0),
    "l2": (False, None, 5e-4),
    "bn+dropout": (True, "head", 0.0),
    "bn+l2": (True, None, 5e-4),
    "dropout-before-bn": (True, "before-bn", 0.0),
}


def make_model(bn: bool, dropout: str | None, p: float = 0.5) -> nn.Sequential:
    """The seed CNN with optional BN (after ReLU, the seed's order) and dropout.

    ``dropout="head"`` drops before the classifier (after the last BN: no variance shift);
    ``"before-bn"`` drops right before each BN, the placement that shifts the variance BN
    sees between training and evaluation (Li et al. 2019).
    """
    layers: list[nn.Module] = []
    cin = 1
    for cout in (32, 64):
        layers += [nn.Conv2d(cin, cout, 3), nn.ReLU()]
        if dropout == "before-bn":
            layers.append(nn.Dropout(p))
        layers += [make_norm("bn" if bn else "none", cout, dim=2), nn.MaxPool2d(2)]
        cin = cout
    layers.append(nn.Flatten())
    if dropout == "head":
        layers.append(nn.Dropout(p))
    layers.append(nn.Linear(64 * 5 * 5, 10))
    return nn.Sequential(*layers)


def run(ctx: StudyContext) -> StudyResult:
    s = ctx.settings
    data = _data.images(ctx)
    acc, gap = {}, {}
    for name, (bn, drop, wd) in CONFIGS.items():
        acc[name], gap[name] = [], []
        for seed in ctx.seeds:
            torch.manual_seed(seed)
            cfg = FitConfig(steps=s["steps"], batch_size=128, lr=1e-3, optimizer="adam",
                            weight_decay=wd, seed=seed)
            res = fit(make_model(bn, drop), data.x_train, data.y_train, data.x_test,
                      data.y_test, cfg, eval_train=len(data.x_train))
            acc[name].append(res.final_test_acc)
            gap[name].append(res.final_train_acc - res.final_test_acc)
            ctx.log(f"regularization {name} seed {seed}: test {res.final_test_acc:.4f} "
                    f"gap {gap[name][-1]:+.4f}")
    v_reg, d_reg = compare(gap["bn"], gap["none"], higher_is_better=False)
    v_acc, d_acc = compare(acc["bn"], acc["none"])
    v_comb, d_comb = compare(acc["bn+dropout"], [max(a, b) for a, b in
                                                 zip(acc["bn"], acc["dropout"], strict=True)])
    v_shift, d_shift = compare(acc["bn+dropout"], acc["dropout-before-bn"])
    verdict = v_reg
    evidence = (
        f"train-test gap {mean_std(gap['bn'])[0]:+.3f} with BN vs "
        f"{mean_std(gap['none'])[0]:+.3f} without ({v_reg} as a regulariser; dropout "
        f"{mean_std(gap['dropout'])[0]:+.3f}, L2 {mean_std(gap['l2'])[0]:+.3f}); test accuracy "
        f"{mean_std(acc['bn'])[0]:.3f} vs {mean_std(acc['none'])[0]:.3f}; BN+dropout vs the "
        f"better of the two alone: {d_comb:+.3f} ({v_comb}); dropout right before BN costs "
        f"{d_shift:+.3f} against dropout after BN ({v_shift} that the variance shift hurts)"
    )
    rows = [[n, fmt_ms(acc[n], 4), fmt_ms(gap[n], 4)] for n in CONFIGS]
    return StudyResult(
        verdict=verdict, evidence=evidence,
        measured=f"Test accuracy and train-test gap of the seed CNN with BN, dropout, L2 and "
                 f"combinations, {data.name} subset of {len(data.x_train)} (overfitting regime).",
        tables=[Table("Accuracy and generalisation gap", ["config", "test acc",
                                                          "train acc - test acc"], rows)],
        numbers={"acc": acc, "gap": gap, "combined": [v_comb, d_comb],
                 "dropout_before_bn": [v_shift, d_shift], "acc_verdict": [v_acc, d_acc]},
    )


STUDY = Study(
    name="regularization",
    claim="BN is a kind of regulariser that improves generalisation, and BN and dropout "
          "complement each other (the seed's FAQ).",
    method="Seed CNN (Adam 1e-3, batch 128) on a small training subset so that it overfits; "
           "none, BN, dropout 0.5 before the classifier, L2 5e-4, BN+dropout, BN+L2, and "
           "dropout placed right before each BN; train (full subset) and test accuracy.",
    presets={
        "quick": {"steps": 400, "train": 4000, "test": 3000},
        "full": {"steps": 3000, "train": 10000, "test": 0},
    },
    run=run,
)

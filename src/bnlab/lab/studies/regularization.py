"""Study ``regularization``: BN vs dropout vs L2, their combinations, and dropout before BN."""

from __future__ import annotations

from torch import nn

from bnlab.norms import make_norm

from . import _data
from ._base import Comparison, Study, StudyContext, StudyResult, Table, fmt_ms, judge
from ._fit import FitConfig, fit_seeds

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
    """The small CNN with optional BN (after ReLU, the tutorial's order) and dropout.

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


def decide(numbers: dict) -> list[Comparison]:
    """Headline: the train-test accuracy gap, BN vs none (a regulariser narrows it)."""
    acc, gap = numbers["acc"], numbers["gap"]
    better_alone = [max(a, b) for a, b in zip(acc["bn"], acc["dropout"], strict=True)]
    return [
        judge("train accuracy - test accuracy", gap["bn"], gap["none"], with_label="BN",
              without_label="none", higher_is_better=False),
        judge("test accuracy", acc["bn"], acc["none"], with_label="BN", without_label="none"),
        judge("test accuracy, BN+dropout vs the better of BN and dropout alone (per seed)",
              acc["bn+dropout"], better_alone, with_label="BN+dropout",
              without_label="better alone"),
        judge("test accuracy, dropout after the last BN vs right before each BN",
              acc["bn+dropout"], acc["dropout-before-bn"], with_label="after",
              without_label="before"),
    ]


def run(ctx: StudyContext) -> StudyResult:
    s = ctx.settings
    data = _data.images(ctx)
    acc, gap = {}, {}
    for name, (bn, drop, wd) in CONFIGS.items():
        cfg = FitConfig(steps=s["steps"], batch_size=128, lr=1e-3, optimizer="adam",
                        weight_decay=wd)
        # dropout draws its masks from one random stream: those configurations train seed by
        # seed, the others together (bnlab.lab.studies._fit.fit_seeds)
        trained = fit_seeds(lambda bn=bn, drop=drop: make_model(bn, drop), ctx.seeds,
                            data.x_train, data.y_train, data.x_test, data.y_test, cfg,
                            eval_train=len(data.x_train))
        acc[name] = [res.final_test_acc for _, res in trained]
        gap[name] = [res.final_train_acc - res.final_test_acc for _, res in trained]
        for seed, a, g in zip(ctx.seeds, acc[name], gap[name], strict=True):
            ctx.log(f"regularization {name} seed {seed}: test {a:.4f} gap {g:+.4f}")
    numbers = {"acc": acc, "gap": gap}
    comparisons = decide(numbers)
    head, on_acc, comb, shift = comparisons
    numbers.update(combined=[comb.verdict, comb.diff],
                   dropout_before_bn=[shift.verdict, shift.diff],
                   acc_verdict=[on_acc.verdict, on_acc.diff])
    evidence = "; ".join(c.sentence() for c in comparisons)
    rows = [[n, fmt_ms(acc[n], 4), fmt_ms(gap[n], 4)] for n in CONFIGS]
    return StudyResult(
        verdict=head.verdict, evidence=evidence, comparisons=comparisons,
        measured=f"Test accuracy and train-test gap of the small CNN with BN, dropout, L2 and "
                 f"combinations, {data.name} subset of {len(data.x_train)} (overfitting regime).",
        tables=[Table("Accuracy and generalisation gap", ["config", "test acc",
                                                          "train acc - test acc"], rows)],
        numbers=numbers,
    )


STUDY = Study(
    name="regularization",
    claim="BN is a kind of regulariser that improves generalisation, and BN and dropout "
          "complement each other (the tutorial's FAQ).",
    method="Small CNN (Adam 1e-3, batch 128) on a small training subset so that it overfits; "
           "none, BN, dropout 0.5 before the classifier, L2 5e-4, BN+dropout, BN+L2, and "
           "dropout placed right before each BN; train (full subset) and test accuracy.",
    presets={
        "quick": {"steps": 400, "train": 4000, "test": 3000},
        # full was 3000 steps: 7 configurations x 5 seeds, about 1.5 h on 2 cores (CNN seeds
        # gain nothing from training together). 1000 steps are 12.8 epochs over the 10k-image
        # subset, as many passes as quick makes over its 4k: the same overfitting regime the
        # claim is about, with 2.5x the training data and all 10k test images.
        "full": {"steps": 1000, "train": 10000, "test": 0},
    },
    run=run,
    decide=decide,
)

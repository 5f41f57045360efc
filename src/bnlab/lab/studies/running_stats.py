"""Study ``running-stats``: how the running statistics are kept decides evaluation accuracy."""

from __future__ import annotations

import copy

import torch

from ..models import seed_cnn
from . import _data
from ._base import Comparison, Study, StudyContext, StudyResult, Table, fmt_ms, judge, mean_std
from ._fit import FitConfig, evaluate, fit_seeds

# name -> (normaliser, layer keywords)
CONFIGS = {
    "ema m=0.01": ("bn", {"momentum": 0.01}),
    "ema m=0.1": ("bn", {"momentum": 0.1}),
    "ema m=0.5": ("bn", {"momentum": 0.5}),
    "window k=1": ("bn-window", {"window_size": 1}),
    "window k=10": ("bn-window", {"window_size": 10}),
    "window k=100": ("bn-window", {"window_size": 100}),
    "cumulative": ("bn", {"running": "cumulative"}),
    "normalise with running (seed step 5)": ("bn-running", {}),
    "precise (recalibrated ema 0.1)": ("bn", {"momentum": 0.1}),
}


@torch.no_grad()
def batch_stat_accuracy(model: torch.nn.Module, x, y, batch_size: int = 128) -> float:
    """Accuracy when each test batch is normalised with its own statistics (train-mode BN)."""
    m = copy.deepcopy(model).train()
    correct = 0
    for i in range(0, len(x) - batch_size + 1, batch_size):
        correct += (m(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
    return correct / (len(x) // batch_size * batch_size)


def decide(numbers: dict) -> list[Comparison]:
    """Headline: per seed, the range of evaluation accuracy (running statistics) over the ways
    of keeping them, against the range of the same models' accuracy with test-batch statistics
    (how much the trained models differ anyway). Keeping the statistics matters when the first
    exceeds the second."""
    ev, bs = numbers["eval"], numbers["batch_stats"]
    names = list(ev)
    n = len(ev[names[0]])

    def spread(values: dict, k: int) -> float:
        return max(values[c][k] for c in names) - min(values[c][k] for c in names)

    return [
        judge("range of accuracy over the ways of keeping running statistics",
              [spread(ev, k) for k in range(n)], [spread(bs, k) for k in range(n)],
              with_label="running statistics", without_label="test-batch statistics",
              min_effect=0.01),
        judge("evaluation accuracy, exact population statistics vs EMA 0.1",
              ev["precise (recalibrated ema 0.1)"], ev["ema m=0.1"], with_label="precise",
              without_label="EMA 0.1"),
        judge("evaluation accuracy, the tutorial's window k=10 vs EMA 0.1", ev["window k=10"],
              ev["ema m=0.1"], with_label="window k=10", without_label="EMA 0.1"),
    ]


def run(ctx: StudyContext) -> StudyResult:
    from bnlab.tools import recalibrate

    s = ctx.settings
    data = _data.images(ctx)
    ev, bs = {}, {}
    for name, (norm, kw) in CONFIGS.items():
        ev[name], bs[name] = [], []
        cfg = FitConfig(steps=s["steps"], batch_size=128, lr=1e-3, optimizer="adam")
        trained = fit_seeds(lambda norm=norm, kw=kw: seed_cnn(norm, norm_kwargs=kw), ctx.seeds,
                            data.x_train, data.y_train, data.x_test, data.y_test, cfg)
        for model, _ in trained:
            if name.startswith("precise"):
                loader = (data.x_train[i : i + 500] for i in range(0, len(data.x_train), 500))
                recalibrate(model, loader)
            ev[name].append(evaluate(model, data.x_test, data.y_test).accuracy)
            bs[name].append(batch_stat_accuracy(model, data.x_test, data.y_test))
        ctx.log(f"running-stats {name}: eval {fmt_ms(ev[name], 4)} batch-stats "
                f"{fmt_ms(bs[name], 4)}")
    numbers = {"eval": ev, "batch_stats": bs}
    comparisons = decide(numbers)
    rows = [[n, fmt_ms(ev[n], 4), fmt_ms(bs[n], 4),
             fmt_ms([a - b for a, b in zip(ev[n], bs[n], strict=True)], 4)] for n in CONFIGS]
    best = max(CONFIGS, key=lambda n: mean_std(ev[n])[0])
    worst = min(CONFIGS, key=lambda n: mean_std(ev[n])[0])
    step5 = mean_std(ev["normalise with running (seed step 5)"])[0]
    evidence = (
        f"{comparisons[0].sentence()}; evaluation accuracy ranges from "
        f"{mean_std(ev[worst])[0]:.3f} ({worst}) to {mean_std(ev[best])[0]:.3f} ({best}); "
        f"{comparisons[1].sentence()}; {comparisons[2].sentence()}; the tutorial's step 5 "
        f"(normalising training batches with running statistics) {step5:.3f}"
    )
    return StudyResult(
        verdict=comparisons[0].verdict, evidence=evidence, comparisons=comparisons,
        measured=f"Evaluation accuracy (running statistics) and batch-statistics accuracy of the "
                 f"small CNN on {data.name} for each way of keeping running statistics.",
        tables=[Table("Evaluation with running statistics vs with test-batch statistics",
                      ["running statistics", "eval acc", "batch-stat acc", "eval - batch"],
                      rows)],
        numbers=numbers,
    )


STUDY = Study(
    name="running-stats",
    claim="Running statistics kept as a moving average, or as a sliding window of the last k "
          "batches, are what normalises later passes; how they are kept matters.",
    method="Small CNN (BN after ReLU, Adam 1e-3, batch 128); EMA momentum 0.01/0.1/0.5, "
           "window k=1/10/100, cumulative average, the tutorial's literal step 5, and exact "
           "population statistics after training (bnlab.tools.recalibrate).",
    presets={
        "quick": {"steps": 300, "train": 12000, "test": 2000},
        "full": {"steps": 4000, "train": 0, "test": 0},
    },
    run=run,
    decide=decide,
)

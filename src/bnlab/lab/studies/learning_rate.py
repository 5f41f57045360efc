"""Study ``learning-rate``: does BN allow larger learning rates and fewer steps?"""

from __future__ import annotations

import math

from ..models import small_cnn
from ..report.plots import line_plot
from . import _data
from ._base import Comparison, Study, StudyContext, StudyResult, Table, fmt_ms, judge, mean_std
from ._fit import FitConfig, fit_seeds

NORMS = ("none", "bn")


def _stable(run: dict, k: int) -> bool:
    """Seed ``k`` trained at this rate: no divergence and well above chance."""
    return not run["diverged"][k] and run["acc"][k] > 0.5


def _censored_steps(run: dict, k: int, numbers: dict) -> float:
    """Steps to the target; a run that never reached it counts one evaluation past its end."""
    st = run["steps_to"][k]
    return float(st) if st is not None else float(numbers["steps"] + numbers["eval_every"])


def decide(numbers: dict) -> list[Comparison]:
    """Headline: steps to the target accuracy at each model's best rate, BN vs none."""
    lrs, runs = numbers["lrs"], numbers["runs"]
    n = len(runs["bn"][str(lrs[0])]["acc"])
    steps, best = {}, {}
    for norm in NORMS:
        per_lr = {lr: [_censored_steps(runs[norm][str(lr)], k, numbers) for k in range(n)]
                  for lr in lrs}
        best[norm] = min(lrs, key=lambda lr, p=per_lr: (sum(p[lr]) / n, lr))
        steps[norm] = per_lr[best[norm]]
    below = math.log10(min(lrs)) - 1  # no stable rate in the grid: a decade below it

    def largest(norm: str, k: int) -> float:
        ok = [lr for lr in lrs if _stable(runs[norm][str(lr)], k)]
        return math.log10(max(ok)) if ok else below

    return [
        judge(f"steps to {numbers['target']:.0%} test accuracy at the best rate (lr "
              f"{best['bn']:g} with BN, {best['none']:g} without)", steps["bn"], steps["none"],
              with_label="BN", without_label="no BN", higher_is_better=False,
              min_effect=numbers["eval_every"]),
        judge("log10 of the largest rate at which the seed trains", [largest("bn", k)
              for k in range(n)], [largest("none", k) for k in range(n)], with_label="BN",
              without_label="no BN", min_effect=math.log10(2)),
    ]


def run(ctx: StudyContext) -> StudyResult:
    s = ctx.settings
    data = _data.images(ctx)
    lrs = [float(v) for v in str(s["lrs"]).split(",")]
    target = s["target"]
    results: dict[str, dict[float, list]] = {n: {} for n in NORMS}
    for norm in NORMS:
        for lr in lrs:
            cfg = FitConfig(steps=s["steps"], batch_size=s["batch_size"], lr=lr,
                            optimizer="sgd", momentum=0.9, eval_every=s["eval_every"])
            trained = fit_seeds(lambda norm=norm: small_cnn(norm, placement="before"),
                                ctx.seeds, data.x_train, data.y_train, data.x_test,
                                data.y_test, cfg)
            results[norm][lr] = [res for _, res in trained]
            for seed, res in zip(ctx.seeds, results[norm][lr], strict=True):
                ctx.log(f"learning-rate {norm} lr={lr:g} seed {seed}: "
                        f"acc {res.final_test_acc:.4f}{' (diverged)' if res.diverged else ''}")
    numbers = {
        "lrs": lrs, "target": target, "steps": s["steps"], "eval_every": s["eval_every"],
        "runs": {n: {str(lr): {"acc": [r.final_test_acc for r in results[n][lr]],
                               "diverged": [r.diverged for r in results[n][lr]],
                               "steps_to": [r.steps_to(target) for r in results[n][lr]]}
                     for lr in lrs} for n in NORMS},
    }
    comparisons = decide(numbers)
    head, rate = comparisons

    def steps_to(norm, lr):
        vals = [r.steps_to(target) for r in results[norm][lr]]
        return None if any(v is None for v in vals) else sum(vals) / len(vals)

    rows = []
    for lr in lrs:
        row = [f"{lr:g}"]
        for n in NORMS:
            accs = [r.final_test_acc for r in results[n][lr]]
            st = steps_to(n, lr)
            row += [fmt_ms(accs, 3) + (" (diverged)" if any(r.diverged for r in results[n][lr])
                                       else ""), "-" if st is None else f"{st:.0f}"]
        rows.append(row)
    evidence = (f"{head.sentence(0)} (never reached: counted as {s['steps'] + s['eval_every']}); "
                f"{rate.sentence(2)}; paper: 14x fewer steps on ImageNet")
    series = {}
    for n in NORMS:
        ms = [mean_std([r.final_test_acc for r in results[n][lr]]) for lr in lrs]
        series[n] = (lrs, [m for m, _ in ms], [sd for _, sd in ms])
    fig = line_plot(ctx.figure_path("accuracy_vs_lr"), series, title="Final test accuracy",
                    xlabel="learning rate (SGD, momentum 0.9)", ylabel="accuracy", logx=True)
    return StudyResult(
        verdict=head.verdict, evidence=evidence, comparisons=comparisons,
        measured=f"Final accuracy and steps to {target:.0%} over a learning-rate grid, small CNN "
                 f"(BN before ReLU), {data.name}.",
        tables=[Table("Accuracy and steps to target per learning rate (steps: mean over seeds, "
                      "- when a seed never reached it)",
                      ["lr", "no BN acc", "no BN steps", "BN acc", "BN steps"], rows)],
        figures=[("Final test accuracy against learning rate (mean ± std)", fig)],
        numbers=numbers,
    )


STUDY = Study(
    name="learning-rate",
    claim="BN speeds up training: it allows much larger learning rates and reaches a given "
          "accuracy in fewer steps (Ioffe & Szegedy: 5x/30x rates, 14x fewer steps).",
    method="Small CNN with BN before ReLU vs without BN, SGD momentum 0.9, a log grid of "
           "learning rates; the largest rate at which every seed trains, and the fewest "
           "steps to a target test accuracy at each model's best rate.",
    presets={
        "quick": {"lrs": "0.01,0.1,0.5,2.0", "steps": 300, "eval_every": 25,
                  "batch_size": 64, "target": 0.8, "train": 12000, "test": 1000},
        # full was 7 rates x 3000 steps, evaluated on all 10k test images every 50 steps:
        # about 2.5 h on 2 cores (5 seeds of a CNN gain nothing from training together).
        # Six rates a half-decade apart still bracket both models' largest stable rate, and
        # 1200 steps (1.3 epochs) are enough for BN to reach 85% at its best rate.
        "full": {"lrs": "0.01,0.03,0.1,0.3,1.0,3.0", "steps": 1200, "eval_every": 50,
                 "batch_size": 64, "target": 0.85, "train": 0, "test": 2000},
    },
    run=run,
    decide=decide,
)

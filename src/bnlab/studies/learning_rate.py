"""Study ``learning-rate``: does BN allow larger learning rates and fewer steps?"""

from __future__ import annotations

import torch

from ..models import seed_cnn
from . import _data
from ._base import Study, StudyContext, StudyResult, Table, fmt_ms, mean_std
from ._fit import FitConfig, fit
from ._plots import line_plot


def run(ctx: StudyContext) -> StudyResult:
    s = ctx.settings
    data = _data.images(ctx)
    lrs = [float(v) for v in str(s["lrs"]).split(",")]
    results: dict[str, dict[float, list]] = {"none": {}, "bn": {}}
    for norm in results:
        for lr in lrs:
            for seed in ctx.seeds:
                torch.manual_seed(seed)
                model = seed_cnn(norm, placement="before")
                cfg = FitConfig(steps=s["steps"], batch_size=s["batch_size"], lr=lr,
                                optimizer="sgd", momentum=0.9, eval_every=s["eval_every"],
                                seed=seed)
                res = fit(model, data.x_train, data.y_train, data.x_test, data.y_test, cfg)
                results[norm].setdefault(lr, []).append(res)
                ctx.log(f"learning-rate {norm} lr={lr:g} seed {seed}: "
                        f"acc {res.final_test_acc:.4f}{' (diverged)' if res.diverged else ''}")
    target = s["target"]

    def stable(norm, lr):  # every seed trained: no divergence and well above chance
        return all(not r.diverged and r.final_test_acc > 0.5 for r in results[norm][lr])

    def steps_to(norm, lr):
        vals = [r.steps_to(target) for r in results[norm][lr]]
        return None if any(v is None for v in vals) else sum(vals) / len(vals)

    largest = {n: max([lr for lr in lrs if stable(n, lr)], default=None) for n in results}
    fastest = {}
    for n in results:
        cands = [(steps_to(n, lr), lr) for lr in lrs if stable(n, lr) and steps_to(n, lr)]
        fastest[n] = min(cands) if cands else (None, None)
    rows = []
    for lr in lrs:
        row = [f"{lr:g}"]
        for n in results:
            accs = [r.final_test_acc for r in results[n][lr]]
            st = steps_to(n, lr)
            row += [fmt_ms(accs, 3) + (" (diverged)" if any(r.diverged for r in results[n][lr])
                                       else ""), "-" if st is None else f"{st:.0f}"]
        rows.append(row)
    ratio_lr = (largest["bn"] / largest["none"]) if largest["bn"] and largest["none"] else None
    ratio_steps = None
    if fastest["bn"][0] and fastest["none"][0]:
        ratio_steps = fastest["none"][0] / fastest["bn"][0]
    bn_faster = ratio_steps is not None and ratio_steps > 1.0
    bn_reaches_alone = fastest["bn"][0] is not None and fastest["none"][0] is None
    bn_larger = largest["bn"] is not None and (
        largest["none"] is None or largest["bn"] > largest["none"])
    verdict = "supported" if (bn_larger or bn_faster or bn_reaches_alone) else (
        "contradicted" if (ratio_steps is not None and ratio_steps < 0.8 and not bn_larger)
        else "not shown")
    evidence = (
        f"largest stable learning rate {largest['bn']} with BN vs {largest['none']} without"
        + (f" ({ratio_lr:g}x)" if ratio_lr else "")
        + f"; best steps to {target:.0%} test accuracy: {fastest['bn'][0]} with BN "
          f"(lr {fastest['bn'][1]}) vs {fastest['none'][0]} without (lr {fastest['none'][1]})"
        + (f", {ratio_steps:.1f}x fewer steps (paper: 14x on ImageNet)" if ratio_steps else "")
    )
    series = {}
    for n in results:
        ms = [mean_std([r.final_test_acc for r in results[n][lr]]) for lr in lrs]
        series[n] = (lrs, [m for m, _ in ms], [sd for _, sd in ms])
    fig = line_plot(ctx.figure_path("accuracy_vs_lr"), series, title="Final test accuracy",
                    xlabel="learning rate (SGD, momentum 0.9)", ylabel="accuracy", logx=True)
    return StudyResult(
        verdict=verdict, evidence=evidence,
        measured=f"Final accuracy and steps to {target:.0%} over a learning-rate grid, seed CNN "
                 f"(BN before ReLU), {data.name}.",
        tables=[Table("Accuracy and steps to target per learning rate",
                      ["lr", "no BN acc", "no BN steps", "BN acc", "BN steps"], rows)],
        figures=[("Final test accuracy against learning rate (mean ± std)", fig)],
        numbers={"largest_stable": largest, "fastest": fastest, "ratio_steps": ratio_steps,
                 "ratio_lr": ratio_lr},
    )


STUDY = Study(
    name="learning-rate",
    claim="BN speeds up training: it allows much larger learning rates and reaches a given "
          "accuracy in fewer steps (Ioffe & Szegedy: 5x/30x rates, 14x fewer steps).",
    method="Seed CNN with BN before ReLU vs without BN, SGD momentum 0.9, a log grid of "
           "learning rates; the largest rate at which every seed trains, and the fewest "
           "steps to a target test accuracy at each model's best rate.",
    presets={
        "quick": {"lrs": "0.01,0.1,0.5,2.0", "steps": 300, "eval_every": 25,
                  "batch_size": 64, "target": 0.8, "train": 12000, "test": 1000},
        "full": {"lrs": "0.003,0.01,0.03,0.1,0.3,1.0,3.0", "steps": 3000, "eval_every": 50,
                 "batch_size": 64, "target": 0.85, "train": 0, "test": 0},
    },
    run=run,
)

"""Study ``ioffe-mnist``: Ioffe & Szegedy's Figure 1 on MNIST (Fashion-MNIST when absent)."""

from __future__ import annotations

import math

import torch

from ..models import ioffe_mlp
from ..report.plots import line_plot
from . import _data
from ._base import Comparison, Study, StudyContext, StudyResult, Table, fmt_ms, judge
from ._fit import FitConfig, fit_seeds

PERCENTILES = (0.15, 0.5, 0.85)


def _probe_step(step: int) -> bool:
    return step == 1 or step % 50 == 0


class _Probes:
    """Percentiles of one unit's input to the last hidden sigmoid on a fixed probe batch, per
    member, at the steps :func:`_probe_step` picks."""

    def __init__(self, probe_x: torch.Tensor, members: int) -> None:
        self.probe_x = probe_x
        self.history: list[list[tuple[int, list[float]]]] = [[] for _ in range(members)]

    def __call__(self, k: int, step: int, model: torch.nn.Module) -> None:
        sigmoids = [m for m in model.modules() if isinstance(m, torch.nn.Sigmoid)]
        captured = {}
        handle = sigmoids[-1].register_forward_hook(
            lambda mod, inp, out: captured.__setitem__("x", inp[0].detach()))
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(self.probe_x)
        finally:
            model.train(was)
            handle.remove()
        unit = captured["x"][:, 0]
        self.history[k].append((step, torch.quantile(unit, torch.tensor(PERCENTILES)).tolist()))


def decide(numbers: dict) -> list[Comparison]:
    """Headline: test accuracy early in training (BN trains faster), BN vs none."""
    early, last = numbers["early_step"], numbers["steps"][-1]
    acc, early_acc, drift = numbers["acc"], numbers["early_acc"], numbers["drift"]
    return [
        judge(f"test accuracy at step {early}", early_acc["bn"], early_acc["none"],
              with_label="BN", without_label="no BN"),
        judge(f"test accuracy at step {last}", acc["bn"], acc["none"], with_label="BN",
              without_label="no BN"),
        judge("drift of the median sigmoid input (spreads)", drift["bn"], drift["none"],
              with_label="BN", without_label="no BN", higher_is_better=False, min_effect=0.05),
    ]


def run(ctx: StudyContext) -> StudyResult:
    s = ctx.settings
    data = _data.images(ctx, prefer_mnist=True)
    probe_x = data.x_test[:500]
    runs: dict[str, list] = {"none": [], "bn": []}
    drift: dict[str, list[float]] = {"none": [], "bn": []}
    pct: dict[str, list] = {}
    for norm in runs:
        probes = _Probes(probe_x, len(ctx.seeds))
        cfg = FitConfig(steps=s["steps"], batch_size=60, lr=s["lr"], optimizer="sgd",
                        momentum=0.0, eval_every=s["eval_every"])
        trained = fit_seeds(lambda norm=norm: ioffe_mlp(norm), ctx.seeds, data.x_train,
                            data.y_train, data.x_test, data.y_test, cfg, on_step=probes,
                            probe_at=_probe_step)
        for k, (seed, (_, res)) in enumerate(zip(ctx.seeds, trained, strict=True)):
            hist = probes.history[k]
            runs[norm].append(res)
            med = [h[1][1] for h in hist]
            # drift of the median after the first tenth of training, relative to its spread
            tail = med[len(med) // 10:]
            spread = sum(h[1][2] - h[1][0] for h in hist) / len(hist)
            drift[norm].append((max(tail) - min(tail)) / max(spread, 1e-8))
            pct.setdefault(norm, hist)
            ctx.log(f"ioffe-mnist {norm} seed {seed}: acc {res.final_test_acc:.4f}")
    steps = runs["bn"][0].steps
    early = max(1, len(steps) // 10) - 1
    acc = {k: [r.final_test_acc for r in v] for k, v in runs.items()}
    early_acc = {k: [r.test_acc[early] for r in v] for k, v in runs.items()}
    numbers = {"acc": acc, "early_acc": early_acc, "drift": drift, "steps": steps,
               "early_step": steps[early], "dataset": data.name}
    comparisons = decide(numbers)
    head, final, steady = comparisons
    numbers.update(d_final=final.diff, d_early=head.diff)
    series = {}
    for k, v in runs.items():
        curves = torch.tensor([r.test_acc for r in v if len(r.test_acc) == len(steps)])
        sd = curves.std(0) if len(curves) > 1 else torch.full((len(steps),), math.nan)
        series[f"{k}"] = (steps, curves.mean(0).tolist(), sd.tolist())
    figs = [("Test accuracy against training steps (mean ± std over seeds)",
             line_plot(ctx.figure_path("accuracy"), series, title="Test accuracy",
                       xlabel="step", ylabel="accuracy"))]
    for k, hist in pct.items():
        xs = [h[0] for h in hist]
        ser = {f"{int(p * 100)}th percentile": (xs, [h[1][i] for h in hist], None)
               for i, p in enumerate(PERCENTILES)}
        figs.append((f"Input to the last hidden sigmoid, one unit, {k} (paper's Fig. 1b/c)",
                     line_plot(ctx.figure_path(f"percentiles_{k}"), ser,
                               title=f"sigmoid input percentiles ({k})", xlabel="step",
                               ylabel="value")))
    rows = [[k, fmt_ms(early_acc[k], 4), fmt_ms(acc[k], 4), fmt_ms(drift[k], 2)] for k in runs]
    evidence = (f"{head.sentence()}; {final.sentence()}; {steady.sentence(2)} (that BN keeps "
                f"the sigmoid input steadier)")
    return StudyResult(
        verdict=head.verdict, evidence=evidence, comparisons=comparisons,
        measured=f"Test accuracy against steps and sigmoid-input percentiles, {data.name}.",
        tables=[Table("Accuracy and drift", ["model", f"acc @ step {steps[early]}",
                                              f"acc @ step {steps[-1]}",
                                              "median drift / spread"], rows)],
        figures=figs,
        numbers=numbers,
    )


STUDY = Study(
    name="ioffe-mnist",
    claim="BN makes training faster and accuracy higher, and keeps the distribution of "
          "layer inputs stable during training (Ioffe & Szegedy 2015, Figure 1).",
    method="784-100-100-100-10 sigmoid MLP, N(0, 0.1) init, batch 60, plain SGD, with and "
           "without BN before each sigmoid; test accuracy every few steps; 15/50/85th "
           "percentiles of one last-hidden-layer sigmoid input on a fixed probe batch.",
    presets={
        "quick": {"steps": 1500, "eval_every": 100, "lr": 0.5, "train": 0, "test": 2000},
        "full": {"steps": 50000, "eval_every": 1000, "lr": 0.5, "train": 0, "test": 0},
    },
    run=run,
    decide=decide,
)

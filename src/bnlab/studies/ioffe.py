"""Study ``ioffe-mnist``: Ioffe & Szegedy's Figure 1 on MNIST (Fashion-MNIST when absent)."""

from __future__ import annotations

import torch

from ..models import ioffe_mlp
from . import _data
from ._base import Study, StudyContext, StudyResult, Table, compare, fmt_ms, mean_std
from ._fit import FitConfig, fit
from ._plots import line_plot

PERCENTILES = (0.15, 0.5, 0.85)


def _sigmoid_input_probe(model: torch.nn.Module, probe_x: torch.Tensor):
    """Percentiles of one unit's input to the last hidden sigmoid on a fixed probe batch."""
    sigmoids = [m for m in model.modules() if isinstance(m, torch.nn.Sigmoid)]
    captured = {}
    handle = sigmoids[-1].register_forward_hook(
        lambda mod, inp, out: captured.__setitem__("x", inp[0].detach()))
    history: list[tuple[int, list[float]]] = []

    def on_step(step: int, m: torch.nn.Module) -> None:
        if step % 50 and step != 1:
            return
        was = m.training
        m.eval()
        with torch.no_grad():
            m(probe_x)
        m.train(was)
        unit = captured["x"][:, 0]
        history.append((step, torch.quantile(unit, torch.tensor(PERCENTILES)).tolist()))

    return on_step, history, handle


def run(ctx: StudyContext) -> StudyResult:
    s = ctx.settings
    data = _data.images(ctx, prefer_mnist=True)
    probe_x = data.x_test[:500]
    runs: dict[str, list] = {"none": [], "bn": []}
    drift: dict[str, list[float]] = {"none": [], "bn": []}
    pct: dict[str, list] = {}
    for norm in runs:
        for seed in ctx.seeds:
            torch.manual_seed(seed)
            model = ioffe_mlp(norm)
            on_step, hist, handle = _sigmoid_input_probe(model, probe_x)
            cfg = FitConfig(steps=s["steps"], batch_size=60, lr=s["lr"], optimizer="sgd",
                            momentum=0.0, eval_every=s["eval_every"], seed=seed)
            res = fit(model, data.x_train, data.y_train, data.x_test, data.y_test, cfg,
                      on_step=on_step)
            handle.remove()
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
    v_final, d_final = compare(acc["bn"], acc["none"])
    v_early, d_early = compare(early_acc["bn"], early_acc["none"])
    v_drift, _ = compare(drift["bn"], drift["none"], higher_is_better=False,
                          min_effect=0.05)
    verdict = v_early if v_early != "not shown" else v_final
    series = {}
    for k, v in runs.items():
        curves = torch.tensor([r.test_acc for r in v if len(r.test_acc) == len(steps)])
        series[f"{k}"] = (steps, curves.mean(0).tolist(),
                          (curves.std(0) if len(curves) > 1 else torch.zeros(len(steps))).tolist())
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
    evidence = (
        f"at step {steps[early]} BN {mean_std(early_acc['bn'])[0]:.3f} vs "
        f"{mean_std(early_acc['none'])[0]:.3f} without ({v_early}); at step {steps[-1]} "
        f"{mean_std(acc['bn'])[0]:.3f} vs {mean_std(acc['none'])[0]:.3f} ({v_final}); "
        f"median drift of the sigmoid input {mean_std(drift['bn'])[0]:.2f} vs "
        f"{mean_std(drift['none'])[0]:.2f} spreads ({v_drift} that BN keeps it steadier)"
    )
    return StudyResult(
        verdict=verdict, evidence=evidence,
        measured=f"Test accuracy against steps and sigmoid-input percentiles, {data.name}.",
        tables=[Table("Accuracy and drift", ["model", f"acc @ step {steps[early]}",
                                              f"acc @ step {steps[-1]}",
                                              "median drift / spread"], rows)],
        figures=figs,
        numbers={"acc": acc, "early_acc": early_acc, "drift": drift, "steps": steps,
                 "dataset": data.name, "d_final": d_final, "d_early": d_early},
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
)

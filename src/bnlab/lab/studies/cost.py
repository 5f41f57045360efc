"""Study ``cost``: what BN costs in training and inference time, and what bnlab gets back."""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
from torch import nn

from ..models import small_cnn
from ..train.step import train_step
from . import _data
from ._base import Comparison, Study, StudyContext, StudyResult, Table, judge

TRAIN_BATCH, EVAL_BATCH = 128, 500


def fuse_bn_relu(model: nn.Sequential) -> nn.Sequential:
    """Replace each ``BatchNorm2d, ReLU`` pair with one ``bnlab.BatchNormAct2d``."""
    from bnlab import BatchNormAct2d
    from bnlab._base import _NormBase

    layers, mods, i = [], list(model), 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, (nn.BatchNorm2d, _NormBase)) and i + 1 < len(mods) \
                and isinstance(mods[i + 1], nn.ReLU):
            fused = BatchNormAct2d(m.num_features, act="relu")
            fused.load_state_dict(m.state_dict())
            layers.append(fused)
            i += 2
            continue
        layers.append(m)
        i += 1
    return nn.Sequential(*layers)


def _variants():
    """name -> (model factory, backend context, folded for inference)."""
    from bnlab.kernels import use_backend

    def none():
        return small_cnn("none", placement="before")

    def torch_bn():
        return small_cnn("torch-bn", placement="before")

    def bnlab_bn():
        return small_cnn("bn", placement="before")

    return {
        "no BN": (none, contextlib.nullcontext, False),
        "torch BN": (torch_bn, contextlib.nullcontext, False),
        "bnlab BN (torch backend)": (bnlab_bn, lambda: use_backend("torch"), False),
        "bnlab BN (native)": (bnlab_bn, lambda: use_backend("native"), False),
        "bnlab fused BN+ReLU (native)": (lambda: fuse_bn_relu(bnlab_bn()),
                                         lambda: use_backend("native"), False),
        "folded BN (inference)": (bnlab_bn, contextlib.nullcontext, True),
    }


def _train_time(model, x, y, batches: int) -> float:
    """Seconds per optimisation step of ``model`` (Adam, batch ``TRAIN_BATCH``): the lab's one
    :func:`~bnlab.lab.train.step.train_step`, whose results are never read here, so no step
    waits on a copy of its loss."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    t0 = time.perf_counter()
    for i in range(batches):
        batch = slice(i * TRAIN_BATCH, (i + 1) * TRAIN_BATCH)
        train_step(model, opt, x[batch], y[batch])
    return (time.perf_counter() - t0) / batches


@torch.no_grad()
def _eval_time(model, x, batches: int) -> float:
    model.eval()
    t0 = time.perf_counter()
    for i in range(batches):
        model(x[i * EVAL_BATCH:(i + 1) * EVAL_BATCH])
    return (time.perf_counter() - t0) / batches


def decide(numbers: dict) -> list[Comparison]:
    """Headline: training time per batch with torch's BN vs without BN, each timed round as a
    fraction of the median time without BN (the claim: BN costs more)."""
    train, ev = numbers["train_s"], numbers["eval_s"]

    def rel(times: dict, name: str) -> list[float]:
        base = statistics.median(times["no BN"])
        return [t / base for t in times[name]]

    return [
        judge("training time per batch / median without BN", rel(train, "torch BN"),
              rel(train, "no BN"), with_label="torch BN", without_label="no BN",
              min_effect=0.05),
        judge("inference time per batch / median without BN", rel(ev, "torch BN"),
              rel(ev, "no BN"), with_label="torch BN", without_label="no BN", min_effect=0.05),
        judge("training time per batch / median without BN (what bnlab gets back)",
              rel(train, "bnlab BN (native)"), rel(train, "torch BN"),
              with_label="bnlab native", without_label="torch BN", higher_is_better=False,
              min_effect=0.05),
        judge("inference time per batch / median without BN (folding)",
              rel(ev, "folded BN (inference)"), rel(ev, "torch BN"), with_label="folded",
              without_label="torch BN", higher_is_better=False, min_effect=0.05),
    ]


def run(ctx: StudyContext) -> StudyResult:
    from bnlab.tools import fold

    s = ctx.settings
    data = _data.images(ctx)
    torch.set_num_threads(s["threads"])
    variants = _variants()
    train_t: dict[str, list[float]] = {k: [] for k in variants}
    eval_t: dict[str, list[float]] = {k: [] for k in variants}
    for seed in ctx.seeds:
        for _ in range(s["rounds"]):  # interleave the contenders: drift hits all alike
            for name, (factory, backend, folded) in variants.items():
                torch.manual_seed(seed)
                model = factory()
                with backend():
                    if not folded:
                        train_t[name].append(_train_time(model, data.x_train, data.y_train,
                                                         s["train_batches"]))
                    if folded:
                        _train_time(model, data.x_train, data.y_train, 5)
                        model = fold(model.eval())
                    eval_t[name].append(_eval_time(model, data.x_test, s["eval_batches"]))
    med_train = {k: statistics.median(v) for k, v in train_t.items() if v}
    med_eval = {k: statistics.median(v) for k, v in eval_t.items()}
    n_train, n_test = 60000, 10000
    base_t, base_e = med_train["no BN"], med_eval["no BN"]
    rows = []
    for name in variants:
        tr = med_train.get(name)
        rows.append([
            name,
            "-" if tr is None else f"{tr * n_train / TRAIN_BATCH:.1f}",
            "-" if tr is None else f"{(tr - base_t) / base_t:+.0%}",
            f"{med_eval[name] * n_test / EVAL_BATCH:.2f}",
            f"{(med_eval[name] - base_e) / base_e:+.0%}",
        ])
    numbers = {"train_s_per_batch": med_train, "eval_s_per_batch": med_eval,
               "train_s": train_t, "eval_s": eval_t}
    comparisons = decide(numbers)
    over_native = (med_train["bnlab BN (native)"] - base_t) / base_t
    over_fold = (med_eval["folded BN (inference)"] - base_e) / base_e
    evidence = (f"{comparisons[0].sentence()}; {comparisons[1].sentence()}; bnlab's native "
                f"kernels cost {over_native:+.0%} over no BN in training, folded BN "
                f"{over_fold:+.0%} at inference; {comparisons[2].sentence()}")
    return StudyResult(
        verdict=comparisons[0].verdict, evidence=evidence, comparisons=comparisons,
        measured=f"Seconds per epoch (60k training images at batch {TRAIN_BATCH}, 10k test at "
                 f"batch {EVAL_BATCH}) of the small CNN, {s['threads']} threads, extrapolated "
                 f"from medians of interleaved timed rounds.",
        tables=[Table("Time per epoch", ["variant", "train s/epoch", "train overhead",
                                         "inference s/epoch", "inference overhead"], rows)],
        numbers=numbers,
    )


STUDY = Study(
    name="cost",
    claim="BN costs computation in training and inference (the tutorial's first drawback); more "
          "efficient BN layers are the first future direction.",
    method="The small CNN (BN before ReLU) trained and evaluated without BN, with torch's BN, "
           "bnlab's BN on both kernel backends, bnlab's fused BN+ReLU, and with BN folded "
           "into the convolutions for inference; medians over interleaved rounds.",
    presets={
        "quick": {"threads": 2, "rounds": 3, "train_batches": 20, "eval_batches": 4,
                  "train": 0, "test": 0},
        "full": {"threads": 2, "rounds": 7, "train_batches": 100, "eval_batches": 20,
                 "train": 0, "test": 0},
    },
    run=run,
    decide=decide,
)

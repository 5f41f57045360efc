"""Study ``sequences``: which normaliser for padded variable-length sequences.

Two datasets of variable length: Japanese Vowels (real utterances, 12 channels, 7 to 29
frames; :mod:`bnlab.lab.data.vowels`) and MNIST-1D randomly cropped to lengths in
``[crop_min, 40]`` and zero-padded (:func:`bnlab.lab.data.sequences.cropped_mnist1d`). Two
models (:mod:`bnlab.lab.models.sequence`): a 1-D CNN and a small pre-norm transformer
encoder. Five normalisers: none, LayerNorm, BN on the padded batch (the zeros counted), BN
given the mask (:class:`bnlab.MaskedBatchNorm1d`) and PowerNorm.

Protocol, per (dataset, model, normaliser): the training set is split once into a fitting
part and a validation part (``val_fraction``, stratified by class, split seed 0); inputs are
standardised per channel with the fitting part's valid frames. Seed 0 trains at each rate of
``lrs`` on the fitting part; the rate with the best validation accuracy (ties: lower validation
loss) is chosen, and seeds 1.. train at that rate. The test set is evaluated once, on the
models of the chosen rate, and only those numbers reach the verdicts.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from ..data.sequences import SequenceDataset, Sequences, load_sequences
from ..models.sequence import (
    SEQUENCE_NORMS,
    MaskChannel,
    SequenceCNN,
    SequenceTransformer,
    with_mask_channel,
)
from ..train.loop import evaluate
from ._base import Comparison, Study, StudyContext, StudyResult, Table, fmt_ms, judge
from ._fit import FitConfig, fit_seeds

DATASETS = ("japanese-vowels", "mnist1d-crop")
MODELS = ("cnn", "transformer")
NORMS = ",".join(SEQUENCE_NORMS)
LABEL = {"none": "none", "layernorm": "LayerNorm", "bn-padded": "BN (padded)",
         "bn-masked": "BN (masked)", "powernorm": "PowerNorm"}


def _cells(numbers: dict) -> list[str]:
    return [f"{d}/{m}" for d in numbers["datasets"] for m in numbers["models"]]


def _mean_over(acc: dict, cells: list[str], norm: str) -> list[float]:
    n = len(acc[f"{cells[0]}/{norm}"])
    return [sum(acc[f"{c}/{norm}"][k] for c in cells) / len(cells) for k in range(n)]


def decide(numbers: dict) -> list[Comparison]:
    """Headline: per seed, test accuracy averaged over every (dataset, model), BN given the
    mask vs BN on the padded batch; then BN (masked) vs LayerNorm, PowerNorm vs LayerNorm in
    the transformer (when PowerNorm ran), and each (dataset, model) on its own."""
    acc, cells = numbers["test"], _cells(numbers)
    tr = [c for c in cells if c.endswith("/transformer")]
    what = f"test accuracy, mean over the {len(cells)} (dataset, model) pairs"
    out = [
        judge(what, _mean_over(acc, cells, "bn-masked"), _mean_over(acc, cells, "bn-padded"),
              with_label="BN (masked)", without_label="BN (padded)"),
        judge(what, _mean_over(acc, cells, "bn-masked"), _mean_over(acc, cells, "layernorm"),
              with_label="BN (masked)", without_label="LayerNorm"),
    ]
    if "powernorm" in numbers["norms"] and tr:
        out.append(judge(f"transformer test accuracy, mean over the {len(tr)} datasets",
                         _mean_over(acc, tr, "powernorm"), _mean_over(acc, tr, "layernorm"),
                         with_label="PowerNorm", without_label="LayerNorm"))
    for c in cells:
        out.append(judge(f"{c} test accuracy", acc[f"{c}/bn-masked"], acc[f"{c}/bn-padded"],
                         with_label="BN (masked)", without_label="BN (padded)"))
    for c in cells:
        out.append(judge(f"{c} test accuracy", acc[f"{c}/bn-masked"], acc[f"{c}/layernorm"],
                         with_label="BN (masked)", without_label="LayerNorm"))
    return out


def readme_block(results: dict) -> str:
    """Markdown from a run's ``results.json``: mean test accuracy (± sd over seeds) per
    (dataset, model) and normaliser, then each comparison of the evidence with its verdict.
    The README's "Which layer for sequence data" quotes it; a test holds the two equal."""
    numbers = results["numbers"]
    norms = numbers["norms"]
    lines = ["| dataset | model | " + " | ".join(LABEL[n] for n in norms) + " |",
             "|---|---|" + "---|" * len(norms)]
    for c in _cells(numbers):
        d, m = c.split("/")
        cells = [fmt_ms(numbers["test"][f"{c}/{n}"], 3) for n in norms]
        lines.append(f"| {d} | {m} | " + " | ".join(cells) + " |")
    lines.append("")
    for c in results["comparisons"]:
        lines.append(f"- {c['with_label']} vs {c['without_label']}, {c['measure']}: "
                     f"{c['diff']:+.3f} (±2 SE [{c['low']:+.3f}, {c['high']:+.3f}]): "
                     f"**{c['verdict']}**")
    return "\n".join(lines)


def stratified_split(y: Tensor, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices ``(fit, val)``: ``round(fraction * n_c)`` examples of each class ``c`` (at
    least one) go to ``val``, drawn with a generator seeded ``seed``."""
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    fit, val = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = max(1, round(fraction * len(idx)))
        val.append(idx[:k])
        fit.append(idx[k:])
    return torch.cat(fit).sort().values, torch.cat(val).sort().values


def _standardise(parts: list[Sequences], ref: Sequences) -> list[Tensor]:
    """Each part as ``(N, C + 1, L)`` model input: channels standardised with ``ref``'s valid
    frames (padding stays 0), the mask as the last channel."""
    m = ref.mask()[:, None, :].to(ref.x.dtype)
    count = m.sum((0, 2))
    mean = (ref.x * m).sum((0, 2)) / count
    sd = ((((ref.x - mean[None, :, None]) ** 2) * m).sum((0, 2)) / count).sqrt().clamp(min=1e-6)
    out = []
    for p in parts:
        x = (p.x - mean[None, :, None]) / sd[None, :, None] * p.mask()[:, None, :]
        out.append(with_mask_channel(x, p.lengths))
    return out


HEADS = 4


def _builder(model: str, norm: str, data: SequenceDataset, s: dict, steps: int):
    channels, length = data.train.x.shape[1], data.train.x.shape[2]
    kw = {}
    if norm == "powernorm":
        # as the authors' transformers: the warm-up a fraction of training (theirs is the
        # learning-rate warm-up), one group per attention head
        kw = {"warmup_iters": round(s["powernorm_warmup"] * steps),
              "group_num": HEADS if model == "transformer" else 1}
    if model == "cnn":
        return lambda: MaskChannel(SequenceCNN(channels, data.num_classes, norm,
                                               channels=s["width"], norm_kwargs=kw))
    return lambda: MaskChannel(SequenceTransformer(channels, data.num_classes, norm,
                                                   dim=s["width"], heads=HEADS,
                                                   max_length=length, norm_kwargs=kw))


def _run_cell(ctx: StudyContext, data: SequenceDataset, model: str, norm: str, split,
              lrs: list[float]) -> dict:
    """Seed 0 at every rate, the rest at the chosen one; test accuracy of the chosen only."""
    s, (x_fit, y_fit, x_val, y_val, x_test, y_test) = ctx.settings, split
    short = "vowels" if data.name == "japanese-vowels" else "mnist1d"
    cfg = FitConfig(steps=s[f"{short}_steps"], batch_size=s[f"{short}_batch"], lr=lrs[0],
                    optimizer="adam")
    build = _builder(model, norm, data, s, cfg.steps)
    first = {}
    for lr in lrs:
        (m0, r0), = fit_seeds(build, ctx.seeds[:1], x_fit, y_fit, x_val, y_val,
                              replace(cfg, lr=lr), together=False, eval_train=0)
        loss = r0.test_loss[-1] if r0.test_loss else math.inf
        first[lr] = (m0, r0.final_test_acc, loss if math.isfinite(loss) else math.inf)
    best = max(lrs, key=lambda lr: (first[lr][1], -first[lr][2], -lr))
    trained = [(first[best][0], first[best][1])]
    if len(ctx.seeds) > 1:
        trained += [(m, r.final_test_acc) for m, r in fit_seeds(
            build, ctx.seeds[1:], x_fit, y_fit, x_val, y_val, replace(cfg, lr=best),
            together=False, eval_train=0)]
    test = [evaluate(m, x_test, y_test).accuracy for m, _ in trained]
    return {"lr": best, "val_by_lr": {str(lr): first[lr][1] for lr in lrs},
            "val": [v for _, v in trained], "test": test}


def run(ctx: StudyContext) -> StudyResult:
    s = ctx.settings
    lrs = [float(v) for v in str(s["lrs"]).split(",")]
    norms = [n.strip() for n in str(s["norms"]).split(",")]
    for n in norms:
        if n not in SEQUENCE_NORMS:
            raise ValueError(f"study sequences: setting 'norms' has unknown normaliser {n!r}; "
                             f"valid names: {', '.join(sorted(SEQUENCE_NORMS))}")
    missing = {"bn-masked", "bn-padded", "layernorm"} - set(norms)
    if missing:
        raise ValueError(f"study sequences: setting 'norms' must include {sorted(missing)} "
                         f"(the verdicts compare them), got {s['norms']!r}")
    numbers: dict = {"datasets": list(DATASETS), "models": list(MODELS), "norms": norms,
                     "lrs": lrs, "test": {}, "val": {}, "lr": {}, "val_by_lr": {}, "data": {}}
    rows = []
    for name in DATASETS:
        data = load_sequences(name, ctx.data_dir, **(
            {"min_length": s["crop_min"]} if name == "mnist1d-crop" else {}))
        fit_idx, val_idx = stratified_split(data.train.y, s["val_fraction"])
        fit, val = data.train.take(fit_idx), data.train.take(val_idx)
        x_fit, x_val, x_test = _standardise([fit, val, data.test], fit)
        split = (x_fit, fit.y, x_val, val.y, x_test, data.test.y)
        lengths = torch.cat([data.train.lengths, data.test.lengths])
        numbers["data"][name] = {"fit": len(fit), "val": len(val), "test": len(data.test),
                                 "channels": data.train.x.shape[1],
                                 "lengths": [int(lengths.min()), int(lengths.max())],
                                 "source": data.source}
        for model in MODELS:
            for norm in norms:
                key = f"{name}/{model}/{norm}"
                cell = _run_cell(ctx, data, model, norm, split, lrs)
                for k in ("test", "val", "lr", "val_by_lr"):
                    numbers[k][key] = cell[k]
                ctx.log(f"sequences {key}: lr {cell['lr']:g}, val {fmt_ms(cell['val'])}, "
                        f"test {fmt_ms(cell['test'])}")
                rows.append([name, model, LABEL[norm], f"{cell['lr']:g}",
                             fmt_ms(cell["val"], 4), fmt_ms(cell["test"], 4)])
    comparisons = decide(numbers)
    n_summary = 3 if "powernorm" in norms else 2
    d = numbers["data"]
    return StudyResult(
        verdict=comparisons[0].verdict, comparisons=comparisons,
        evidence="; ".join(c.sentence() for c in comparisons[:n_summary]),
        measured=(f"Test accuracy of a 1-D CNN and a small transformer on Japanese Vowels "
                  f"({d['japanese-vowels']['fit']}+{d['japanese-vowels']['val']} train/val, "
                  f"{d['japanese-vowels']['test']} test, lengths "
                  f"{d['japanese-vowels']['lengths'][0]}-{d['japanese-vowels']['lengths'][1]}) "
                  f"and MNIST-1D cropped to lengths {s['crop_min']}-40, with "
                  f"{', '.join(LABEL[n] for n in norms)}; rate chosen on validation."),
        tables=[Table("Test accuracy (rate chosen per row on the validation split)",
                      ["dataset", "model", "norm", "lr", "val acc", "test acc"], rows)],
        numbers=numbers,
    )


STUDY = Study(
    name="sequences",
    claim="On padded variable-length sequences, BN should count only the valid positions "
          "(masked BN beats BN on the padded batch); and BN is an alternative to LayerNorm "
          "there.",
    method="Japanese Vowels (aeon's .ts files, read by bnlab) and MNIST-1D cropped to random "
           "lengths and zero-padded; a 3-block 1-D CNN and a 2-block pre-norm transformer with "
           "a key-padding mask, padding zeroed after every layer, masked mean pooling; "
           "normalisers none, LayerNorm, BN on the padded batch, masked BN, PowerNorm; Adam; "
           "a stratified validation split of the training set chooses the rate (seed 0 over "
           "the grid), the test set is evaluated once on the chosen models.",
    presets={
        # quick: one rate (3e-3); 300 steps of 32 are 44 epochs of Japanese Vowels' 216
        # fitting utterances, 500 of 64 are 10 epochs of MNIST-1D's 3200 fitting signals
        "quick": {"lrs": "0.003", "norms": NORMS, "vowels_steps": 300, "vowels_batch": 32,
                  "mnist1d_steps": 500, "mnist1d_batch": 64, "crop_min": 20,
                  "val_fraction": 0.2, "width": 32, "powernorm_warmup": 0.1},
        # full: a grid of three rates (seven runs per row, not five) and 400/800 steps; 600 and
        # 1000 steps were measured at about 55 min on 2 busy cores, over the 45 min budget
        "full": {"lrs": "0.001,0.003,0.01", "norms": NORMS, "vowels_steps": 400,
                 "vowels_batch": 32, "mnist1d_steps": 800, "mnist1d_batch": 64,
                 "crop_min": 20, "val_fraction": 0.2, "width": 32, "powernorm_warmup": 0.1},
    },
    run=run,
    decide=decide,
)

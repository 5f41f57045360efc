"""Corruption benchmark on Fashion-MNIST: source model vs AdaBN vs TENT, severities 1-5.

Claim tested: re-estimating BN statistics on shifted test data (AdaBN) and adapting the BN
affine parameters by entropy minimisation (TENT) recover accuracy lost to input corruptions,
as Schneider et al. 2020 and Wang et al. 2021 report for CIFAR-10-C and ImageNet-C.

Protocol: train the small CNN (:func:`bnlab.lab.models.small_cnn`, Conv-ReLU-BN-MaxPool x2, Linear;
torch's BN after the ReLU unless ``norm``/``placement`` say otherwise) on Fashion-MNIST's
training set (:func:`bnlab.lab.data.load_dataset`); for each corruption and severity, corrupt
the test set (seeded), and measure

* ``source``: the trained model in evaluation mode (training-set running statistics);
* ``adabn``: a copy whose BN statistics are the exact statistics of the corrupted test set;
* ``tent``: a fresh TENT wrapper (Adam, lr 1e-3, one step per batch) passed once over the
  shuffled corrupted test set; accuracy of its online predictions.

Results go to ``OUT/shift.json``; the report, derived from it only, to ``OUT/report.md``,
``OUT/report.html`` (self-contained) and ``OUT/report-files/shift.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from bnlab.tools.adapt import Tent, adapt
from bnlab.tools.corruptions import CORRUPTIONS, corrupt

from ..data import load_dataset
from ..models import small_cnn
from ..report.page import ReportPaths

__all__ = ["ShiftConfig", "run", "table_rows", "format_table", "write_shift_report", "main"]

@dataclass(frozen=True)
class ShiftConfig:
    train_size: int = 60000
    test_size: int = 10000
    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    tent_lr: float = 1e-3
    seed: int = 0
    norm: str = "torch-bn"
    placement: str = "after"
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    corruptions: tuple[str, ...] = tuple(CORRUPTIONS)


def _batches(x: Tensor, size: int) -> list[Tensor]:
    return list(x.split(size))


def train_source(x: Tensor, y: Tensor, cfg: ShiftConfig) -> nn.Module:
    """The source model: the studies' training loop (:func:`._fit.fit`), ``cfg.epochs`` passes
    over ``x`` in seeded order; returned in evaluation mode."""
    from ._fit import FitConfig, fit

    torch.manual_seed(cfg.seed)
    model = small_cnn(cfg.norm, cfg.placement)
    steps = cfg.epochs * max(1, len(x) // cfg.batch_size)
    fit(model, x, y, None, None, FitConfig(steps=steps, batch_size=min(cfg.batch_size, len(x)),
                                           lr=cfg.lr, optimizer="adam", seed=cfg.seed),
        eval_train=0)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    correct = sum(int((model(xb).argmax(1) == yb).sum())
                  for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True))
    return correct / len(x)


def _tent_accuracy(source: nn.Module, x: Tensor, y: Tensor, cfg: ShiftConfig) -> float:
    tent = Tent(copy.deepcopy(source), lambda p: torch.optim.Adam(p, lr=cfg.tent_lr))
    correct = 0
    for xb, yb in zip(x.split(cfg.batch_size), y.split(cfg.batch_size), strict=True):
        correct += int((tent(xb).argmax(1) == yb).sum())
    return correct / len(x)


def evaluate_all(source: nn.Module, x: Tensor, y: Tensor, cfg: ShiftConfig) -> dict[str, float]:
    adabn = adapt(source, _batches(x, cfg.batch_size), "adabn")
    return {
        "source": accuracy(source, x, y),
        "adabn": accuracy(adabn, x, y),
        "tent": _tent_accuracy(source, x, y, cfg),
    }


def run(cfg: ShiftConfig, data_dir: str | os.PathLike | None = None, log=print) -> dict:
    """Train the source model and measure every corruption and severity; returns the results."""
    t0 = time.perf_counter()
    data = load_dataset("fashion-mnist", data_dir)
    xtr, ytr, xte, yte = data.x_train, data.y_train, data.x_test, data.y_test
    g = torch.Generator().manual_seed(cfg.seed)
    tr = torch.randperm(len(xtr), generator=g)[: cfg.train_size]
    te = torch.randperm(len(xte), generator=g)[: cfg.test_size]  # also TENT's stream order
    source = train_source(xtr[tr], ytr[tr], cfg)
    log(f"trained source model in {time.perf_counter() - t0:.0f} s")
    xte, yte = xte[te], yte[te]
    rows = [{"corruption": "clean", "severity": 0, **evaluate_all(source, xte, yte, cfg)}]
    for name in cfg.corruptions:
        for s in cfg.severities:
            xc = corrupt(xte, name, s, seed=cfg.seed + s)
            rows.append({"corruption": name, "severity": s, **evaluate_all(source, xc, yte, cfg)})
            r = rows[-1]
            log(f"{name:15s} {s}  source {r['source']:.4f}  adabn {r['adabn']:.4f}  "
                f"tent {r['tent']:.4f}")
    shifted = [r for r in rows if r["severity"] > 0]
    mean = {k: float(np.mean([r[k] for r in shifted])) for k in ("source", "adabn", "tent")}
    return {"config": asdict(cfg), "rows": rows, "mean_over_corruptions": mean,
            "seconds": time.perf_counter() - t0, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def table_rows(result: dict) -> list[dict[str, str]]:
    """Accuracies per corruption and severity, plus the mean over the corrupted rows."""
    rows = [{"corruption": r["corruption"], "severity": str(r["severity"]),
             "source": f"{r['source']:.4f}", "AdaBN": f"{r['adabn']:.4f}",
             "TENT": f"{r['tent']:.4f}"} for r in result["rows"]]
    m = result["mean_over_corruptions"]
    rows.append({"corruption": "mean (corrupted)", "severity": "1-5",
                 "source": f"{m['source']:.4f}", "AdaBN": f"{m['adabn']:.4f}",
                 "TENT": f"{m['tent']:.4f}"})
    return rows


def format_table(result: dict) -> str:
    """A markdown table of accuracies, one row per corruption and severity, plus the mean."""
    from ..report.page import Table, md_table

    return md_table(Table.from_dicts(table_rows(result)))


def plot(result: dict) -> bytes:
    """Accuracy against severity, one panel per corruption; PNG bytes."""
    from ..report.plots import plt, png

    names = list(dict.fromkeys(r["corruption"] for r in result["rows"] if r["severity"] > 0))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), sharey=True,
                             squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        rows = [r for r in result["rows"] if r["corruption"] == name]
        sev = [r["severity"] for r in rows]
        for key, label in (("source", "source"), ("adabn", "AdaBN"), ("tent", "TENT")):
            ax.plot(sev, [r[key] for r in rows], marker="o", label=label)
        ax.set_title(name)
        ax.set_xlabel("severity")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][0].legend()
    fig.tight_layout()
    return png(fig)


def write_shift_report(result: dict, out: Path) -> ReportPaths:
    """``OUT/report.md`` and a self-contained ``OUT/report.html`` (table and figure), from
    ``result`` only (as :func:`run` returns it or ``shift.json`` holds it)."""
    from ..report.page import Figure, Heading, Table, Text, write_page

    cfg, m = result["config"], result["mean_over_corruptions"]
    clean = result["rows"][0]
    best = max(("adabn", "tent"), key=lambda k: m[k])
    paragraphs = [
        "Question: do AdaBN (BN statistics re-estimated on the shifted test data) and TENT "
        "(BN affine parameters adapted by entropy minimisation) recover the accuracy a "
        "Fashion-MNIST model loses to input corruptions?",
        f"**Answer.** Mean accuracy over the corrupted test sets: source {m['source']:.4f}, "
        f"AdaBN {m['adabn']:.4f} ({m['adabn'] - m['source']:+.4f}), TENT {m['tent']:.4f} "
        f"({m['tent'] - m['source']:+.4f}); the better adaptation here is "
        f"{'AdaBN' if best == 'adabn' else 'TENT'}. On clean data: source "
        f"{clean['source']:.4f}, AdaBN {clean['adabn']:.4f}, TENT {clean['tent']:.4f}.",
        f"**Evidence.** small CNN (`{cfg['norm']}`, norm {cfg['placement']} the ReLU), "
        f"{cfg['epochs']} epoch(s) on {cfg['train_size']} training images, batch "
        f"{cfg['batch_size']}, seed {cfg['seed']}; {cfg['test_size']} test images per "
        f"corruption and severity; TENT learning rate {cfg['tent_lr']}.",
        f"**Machine.** torch {result['torch']} with {result['threads']} threads; "
        f"{result['seconds']:.0f} s in all.",
    ]
    return write_page(out, "Fashion-MNIST corruptions: source vs AdaBN vs TENT", [
        *(Text(p) for p in paragraphs),
        Heading("Accuracy"), Table.from_dicts(table_rows(result)),
        Figure("Test accuracy against corruption severity", "report-files/shift.png",
               plot(result)),
        Text("Regenerate from shift.json with "
             "`python bench/bench_shift.py --report-from OUT/shift.json`.", "note"),
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/shift"))
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the Fashion-MNIST IDX files (default: bnlab's search path)")
    p.add_argument("--norm", default=ShiftConfig.norm,
                   help="normaliser of the small CNN (a bnlab.norms name; default torch's BN)")
    p.add_argument("--placement", choices=("after", "before"), default=ShiftConfig.placement,
                   help="BN after the ReLU (the tutorial's order) or before it")
    for f in ("train_size", "test_size", "epochs", "batch_size", "seed"):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(ShiftConfig, f))
    p.add_argument("--tent-lr", type=float, default=ShiftConfig.tent_lr)
    p.add_argument("--report-from", type=Path, default=None, metavar="SHIFT_JSON",
                   help="only regenerate the report from a saved shift.json")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 is fastest on a busy 2-core machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ShiftConfig(train_size=args.train_size, test_size=args.test_size, epochs=args.epochs,
                      batch_size=args.batch_size, seed=args.seed, tent_lr=args.tent_lr,
                      norm=args.norm, placement=args.placement)
    if args.report_from:
        result = json.loads(args.report_from.read_text())
    else:
        result = run(cfg, args.data_dir, log=lambda *a: print(*a, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shift.json").write_text(json.dumps(result, indent=2))
    paths = write_shift_report(result, args.out)
    print(format_table(result))
    print(f"wrote {args.out}/shift.json, {paths.markdown.name}, {paths.html.name}, report-files/")
    return 0

"""The reports' figures, drawn with matplotlib's Agg backend: the run report's
(:func:`figures`, PNG bytes) and the studies' line plots (:func:`line_plot`, a PNG file)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..train.rundir import atomic_write_bytes  # noqa: E402
from .collect import Group, mean_sd  # noqa: E402

__all__ = ["figures", "png", "line_plot"]

_TITLES = {"train_loss": "training loss", "val_loss": "validation loss",
           "train_acc": "training accuracy", "val_acc": "validation accuracy"}


def png(fig, dpi: int = 90) -> bytes:
    """``fig`` as PNG bytes (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def line_plot(path: Path, series: dict[str, tuple[list, list, list | None]], *, title: str,
              xlabel: str, ylabel: str, logx: bool = False, logy: bool = False) -> str:
    """Plot ``{label: (x, mean, std or None)}`` with shaded spread into the PNG file ``path``
    (written atomically); returns the file name."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, (x, m, s) in series.items():
        ax.plot(x, m, marker="o", markersize=3, label=label)
        if s is not None:
            lo = [a - b for a, b in zip(m, s, strict=True)]
            hi = [a + b for a, b in zip(m, s, strict=True)]
            ax.fill_between(x, lo, hi, alpha=0.2)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_bytes(path, png(fig, dpi=100))
    return Path(path).name


_STYLES = ["-", "--", "-.", ":"]
_MARKERS = ["o", "s", "^", "D", "v", "x"]


def _band(ax, x, per_epoch: list[list[float]], label: str, color):
    # Variants that train identically (bn and bn-window differ only in evaluation) overlap:
    # line style and marker keep each visible.
    i = int(color[1:])
    means = [mean_sd(v)[0] for v in per_epoch]
    ax.plot(x, means, _STYLES[i % 4], color=color, label=label, marker=_MARKERS[i % 6],
            markersize=4)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if per_epoch and len(per_epoch[0]) > 1:
        ax.fill_between(x, [min(v) for v in per_epoch], [max(v) for v in per_epoch],
                        color=color, alpha=0.15, linewidth=0)


def _metric_pair(groups: list[Group], a: str, b: str, title: str) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, metric in zip(axes, (a, b), strict=True):
        for i, g in enumerate(groups):
            c = g.curve(metric)
            _band(ax, range(1, len(c) + 1), c, g.name, f"C{i}")
        ax.set_title(_TITLES[metric])
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(title)
    axes[1].legend(fontsize=8)
    return png(fig)


def _gap(groups: list[Group]) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, g in enumerate(groups):
        tr, va = g.curve("train_acc"), g.curve("val_acc")
        acc_gap = [[t - v for t, v in zip(ts, vs, strict=True)] for ts, vs in zip(tr, va,
                                                                                  strict=True)]
        trl, val = g.curve("train_loss"), g.curve("val_loss")
        loss_gap = [[v - t for t, v in zip(ts, vs, strict=True)] for ts, vs in zip(trl, val,
                                                                                   strict=True)]
        _band(axes[0], range(1, len(acc_gap) + 1), acc_gap, g.name, f"C{i}")
        _band(axes[1], range(1, len(loss_gap) + 1), loss_gap, g.name, f"C{i}")
    axes[0].set_title("train accuracy - validation accuracy")
    axes[1].set_title("validation loss - training loss")
    for ax in axes:
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    return png(fig)


def _time(groups: list[Group]) -> bytes:
    fig, ax = plt.subplots(figsize=(10, 3.2))
    names = [g.name for g in groups]
    per_run = [[sum(e["epoch_time"] for e in r.epochs) / len(r.epochs) for r in g.runs]
               for g in groups]
    means = [mean_sd(v)[0] for v in per_run]
    ax.bar(names, means, color=[f"C{i}" for i in range(len(groups))])
    for i, v in enumerate(per_run):
        ax.plot([i] * len(v), v, "k.", markersize=5)
    ax.set_ylabel("seconds per epoch (training)")
    ax.set_title("time per epoch (bars: mean over seeds, dots: each seed)")
    ax.grid(axis="y", alpha=0.3)
    return png(fig)


def _steps(groups: list[Group], window: int = 25) -> bytes:
    fig, ax = plt.subplots(figsize=(10, 3.6))
    for i, g in enumerate(groups):
        run = g.runs[0]
        losses = [s["loss"] for s in run.steps]
        if not losses:
            continue
        w = max(1, min(window, len(losses) // 10 or 1))
        smooth = [sum(losses[max(0, k - w + 1): k + 1]) / len(losses[max(0, k - w + 1): k + 1])
                  for k in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), smooth, _STYLES[i % 4], color=f"C{i}",
                label=f"{g.name} (seed {run.config.seed})", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("optimisation step")
    ax.set_ylabel(f"training loss (mean of {window} steps)")
    ax.set_title("training loss per step, first seed of each normaliser")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return png(fig)


def _monitor(groups: list[Group]) -> bytes | None:
    """Per BN layer (rows): output 15/50/85th percentiles and input-gradient norm over steps,
    for the first monitored run of each normaliser; ``None`` when no run was monitored."""
    runs = [(i, g.name, next((r for r in g.runs if r.monitor), None)) for i, g in enumerate(groups)]
    runs = [(i, name, r) for i, name, r in runs if r is not None]
    if not runs:
        return None
    layers = list(dict.fromkeys(row["layer"] for _, _, r in runs for row in r.monitor))
    fig, axes = plt.subplots(len(layers), 2, figsize=(10, 2.6 * len(layers)), squeeze=False)
    for i, name, run in runs:
        for li, layer in enumerate(layers):
            rows = [row for row in run.monitor if row["layer"] == layer]
            x = [row["step"] for row in rows]
            for p, style in zip((15, 50, 85), (":", "-", "--"), strict=True):
                key = f"out_p{p}"
                axes[li][0].plot(x, [row.get(key, float("nan")) for row in rows], style,
                                 color=f"C{i}", lw=1, label=f"{name} p{p}")
            pts = [(row["step"], row["grad_in_norm"]) for row in rows if "grad_in_norm" in row]
            if pts:
                axes[li][1].plot(*zip(*pts, strict=True), "-", color=f"C{i}", marker=".",
                                 lw=1, label=f"{name} (seed {run.config.seed})")
    for li, layer in enumerate(layers):
        axes[li][0].set_title(f"BN layer {layer}: output 15/50/85th percentiles", fontsize=9)
        axes[li][1].set_title(f"BN layer {layer}: gradient norm at its input", fontsize=9)
        axes[li][1].set_yscale("log")
        for ax in axes[li]:
            ax.grid(alpha=0.3)
            ax.set_xlabel("optimisation step")
    axes[0][0].legend(fontsize=6, ncol=len(runs))
    axes[0][1].legend(fontsize=7)
    fig.tight_layout()
    return png(fig)


def figures(groups: list[Group]) -> dict[str, tuple[str, bytes]]:
    """``{file stem: (caption, PNG bytes)}`` for every figure of the report (``monitor``
    only when some run recorded ``monitor.jsonl``)."""
    out = {
        "accuracy": ("Training and validation accuracy per epoch (line: mean over seeds, "
                     "band: min to max)", _metric_pair(groups, "train_acc", "val_acc",
                                                        "accuracy")),
        "loss": ("Training and validation loss per epoch",
                 _metric_pair(groups, "train_loss", "val_loss", "cross-entropy")),
        "gap": ("Train-validation gap per epoch", _gap(groups)),
        "steps": ("Training loss per optimisation step", _steps(groups)),
        "time": ("Time per epoch", _time(groups)),
    }
    mon = _monitor(groups)
    if mon is not None:
        out["monitor"] = ("BN layers during training (bnlab.tools.Monitor, first monitored "
                          "seed of each normaliser)", mon)
    return out

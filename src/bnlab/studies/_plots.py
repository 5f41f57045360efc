"""Matplotlib helpers for study figures (Agg backend, files only)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")


def line_plot(path: Path, series: dict[str, tuple[list, list, list | None]], *, title: str,
              xlabel: str, ylabel: str, logx: bool = False, logy: bool = False) -> str:
    """Plot ``{label: (x, mean, std or None)}`` with shaded spread; returns the file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
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
    fig.savefig(path)
    plt.close(fig)
    return Path(path).name

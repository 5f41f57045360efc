"""The speedrun's report: time-to-accuracy curves and the per-seed table, from the run
directory's files only (``bnlab report`` style: ``report.md`` and a self-contained
``report.html``)."""

from __future__ import annotations

import json
from pathlib import Path

from ..report.page import Block, Figure, Heading, ReportPaths, Table, Text, write_page
from ..report.plots import png
from ..studies._report import COMPARISON_HEADERS, comparison_rows, machine_line
from ..train.rundir import read_jsonl

__all__ = ["write_report"]

_COLORS = {"bn": "C0", "none": "C3"}


def _figure(rows: list[dict], results: dict) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    seen = set()
    for (norm, seed) in sorted({(r["norm"], r["seed"]) for r in rows}):
        pts = [r for r in rows if r["norm"] == norm and r["seed"] == seed]
        label = None if norm in seen else ("BN" if norm == "bn" else "no BN")
        seen.add(norm)
        ax.plot([p["clock_s"] for p in pts], [p["accuracy"] for p in pts], marker="o",
                markersize=2.5, linewidth=1, alpha=0.8, color=_COLORS.get(norm, "C2"),
                label=label)
    for t in results["targets"]:
        ax.axhline(float(t), color="grey", linewidth=0.6, linestyle=":")
    ax.axvline(results["budget_s"], color="black", linewidth=0.8, linestyle="--")
    low = min(0.85, min((r["accuracy"] for r in rows), default=0.85))
    ax.set_ylim(max(low, 0.8), 0.95)
    ax.set_xlabel("seconds from process start (evaluations left out)")
    ax.set_ylabel(f"{results['split']} accuracy")
    ax.set_title("Fashion-MNIST speedrun: accuracy against time, every seed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png(fig, dpi=100)


def write_report(run_dir: str | Path) -> ReportPaths:
    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    env = json.loads((run_dir / "environment.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    rows = read_jsonl(run_dir / "evaluations.jsonl")
    targets = results["targets"]
    blocks: list[Block] = [
        Text(f"**Claim (from the tutorial):** {results['claim']}"),
    ]
    if "verdict" in results:
        blocks.append(Text(f"**Verdict:** {results['verdict']}. {results['evidence']}",
                           "answer"))
    blocks += [
        Text(f"**Measured:** {results['measured']} Budget {results['budget_s']:g} s per seed; "
             f"{config['clock']}."),
        Figure("accuracy against seconds from process start, one line per seed; dotted: "
               "the targets, dashed: the budget", "time_to_accuracy.png",
               _figure(rows, results)),
        Heading("Per seed"),
        Table(["norm", "seed", f"{results['split']} accuracy", *[f"time to {t} (s)" for t in
                                                                  targets],
               "epochs", "steps", "end (s)", "stopped by"],
              [[r["norm"], str(r["seed"]), f"{r['accuracy']:.4f}",
                *[("-" if r["time_to"][t] is None else f"{r['time_to'][t]:.1f}")
                  for t in targets],
                f"{r['epochs']:.2f}", str(r["steps"]), f"{r['clock_s']:.1f}", r["stopped"]]
               for r in results["runs"]]),
        Heading("Medians over seeds"),
        Table(["norm", "accuracy", *[f"time to {t} (s), seeds reaching it" for t in targets]],
              [[norm, f"{m['accuracy']:.4f}",
                *[("never (median seed)" if m[f"time_to_{t}"] is None else
                   f"{m[f'time_to_{t}']:.1f}") + f", {m[f'reached_{t}']}" for t in targets]]
               for norm, m in results["medians"].items()]),
    ]
    if results.get("comparisons"):
        blocks += [Heading("Comparisons (the studies' verdict rule)"),
                   Table(COMPARISON_HEADERS, comparison_rows(results))]
    blocks += [
        Heading("Recipes"),
        *[Text(f"`{n}`: " + ", ".join(f"{k}={v}" for k, v in r.items()))
          for n, r in config["recipes"].items()],
        Text(f"Machine: {machine_line(env)}; load average at the start "
             f"{env.get('load_average_at_start')}; git {env.get('git_revision')}."),
    ]
    return write_page(run_dir, "Fashion-MNIST speedrun", blocks)

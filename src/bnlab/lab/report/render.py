"""Turn run directories into ``report.md`` and a self-contained ``report.html``.

Every number and sentence is computed from the runs' files; nothing is typed in.
:func:`run_report` gathers them (:class:`RunReport`: the table and the answer as data, for
``bnlab run`` to print); :func:`write_report` writes them with
:func:`bnlab.lab.report.page.write_page`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from .collect import Group, group_runs, load_runs, mean_sd, study_info
from .page import Block, Figure, Heading, ReportPaths, Table, Text, write_page
from .plots import figures

__all__ = ["table_rows", "verdict", "RunReport", "run_report", "write_report"]

BASELINE = "none"
BN_NAMES = ("bn", "torch-bn")


def _pm(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    m, sd = mean_sd(values)
    if math.isnan(sd):
        return f"{m * scale:.{digits}f}"
    return f"{m * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def _epoch_seconds(g: Group) -> float:
    """Mean over seeds of each run's mean training seconds per epoch."""
    return mean_sd([sum(e["epoch_time"] for e in r.epochs) / len(r.epochs) for r in g.runs])[0]


def table_rows(groups: list[Group]) -> list[dict[str, Any]]:
    """One row per normaliser: accuracies in percent as ``mean ± sd`` over seeds."""
    rows = []
    for g in groups:
        times = [sum(e["epoch_time"] for e in r.epochs) / len(r.epochs) for r in g.runs]
        gap = [r.epochs[-1]["train_acc"] - r.epochs[-1]["val_acc"] for r in g.runs]
        rows.append({
            "normaliser": g.name,
            "seeds": len(g.runs),
            "epochs": min(len(r.epochs) for r in g.runs),
            "final val acc %": _pm(g.final("val_acc")),
            "best val acc %": _pm(g.best("val_acc")),
            "final train acc %": _pm(g.final("train_acc")),
            "train-val gap (points)": _pm(gap),
            "final val loss": _pm(g.final("val_loss"), 1.0, 4),
            "s / epoch": _pm(times, 1.0, 1),
        })
    return rows


def _compare(g: Group, base: Group) -> str:
    a, b = mean_sd(g.final("val_acc")), mean_sd(base.final("val_acc"))
    diff = (a[0] - b[0]) * 100
    verb = "helped" if diff > 0 else ("made no difference" if diff == 0 else "did not help")
    text = (
        f"`{g.name}` {verb}: final validation accuracy {a[0] * 100:.2f}% against "
        f"{b[0] * 100:.2f}% without normalisation ({diff:+.2f} points"
    )
    best = (mean_sd(g.best("val_acc"))[0] - mean_sd(base.best("val_acc"))[0]) * 100
    text += f"; best epoch {best:+.2f} points)"
    spreads = [s for s in (a[1], b[1]) if not math.isnan(s)]
    if spreads:
        spread = max(spreads) * 100
        where = "larger than" if abs(diff) > spread else "within"
        text += f", a difference {where} the seed-to-seed spread ({spread:.2f} points sd)"
    else:
        text += ", from one seed each, so the seed-to-seed spread is unknown"
    return text + "."


def verdict(groups: list[Group]) -> list[str]:
    """Plain sentences: did BN help in this run, and by how much; then each other variant."""
    by = {g.name: g for g in groups}
    if BASELINE not in by:
        return ["No run without normalisation (`none`) is in this report, so it cannot say "
                "whether BN helped."]
    base = by[BASELINE]
    bn = next((by[n] for n in BN_NAMES if n in by), None)
    out = []
    if bn is None:
        out.append("No plain BN run (`bn`) is in this report, so it cannot say whether BN "
                   "helped.")
    else:
        out.append("In this run BN " + _compare(bn, base).split(" ", 1)[1])
        tb, tn = _epoch_seconds(bn), _epoch_seconds(base)
        if tn > 0:
            out.append(f"An epoch with `{bn.name}` took {tb / tn:.2f}x the time of one without "
                       "normalisation.")
    for g in groups:
        if g is not base and g is not bn:
            out.append(_compare(g, base))
    return out


def _header(groups: list[Group], info: dict[str, Any]) -> dict[str, str]:
    first = groups[0].runs[0]
    cfg, env = first.config, first.environment
    dataset = info.get("dataset", cfg.dataset)
    n_train = info.get("train_examples", "")
    title = info.get("title") or f"{cfg.model} on {dataset}: with and without normalisation"
    claim = (f"Question: does batch normalisation help the `{cfg.model}` network on {dataset} "
             f"with {cfg.optimizer}, batch {cfg.batch_size}, {cfg.epochs} epochs"
             + (f", {n_train} training examples" if n_train else "") + "?")
    machine = (f"{env.get('cpu_model') or env.get('processor') or env.get('machine', '?')}, "
               f"{env.get('cpu_count', '?')} CPUs, torch {env.get('torch', '?')} with "
               f"{env.get('torch_threads', '?')} threads, bnlab {env.get('bnlab', '?')}, "
               f"git {env.get('git_revision') or 'unknown'}")
    loads = [r.environment.get("load_average_at_start") for g in groups for r in g.runs]
    loads = [x for x in loads if x is not None]
    if loads:
        machine += (f"; load average when the runs started {min(loads):.1f} to "
                    f"{max(loads):.1f} (above the CPU count, other work slowed the timings)"
                    if max(loads) > (env.get("cpu_count") or 1) else
                    f"; load average when the runs started at most {max(loads):.1f}")
    seeds = sorted({s for g in groups for s in g.seeds})
    evidence = (f"{sum(len(g.runs) for g in groups)} runs: normalisers "
                f"{', '.join(g.name for g in groups)}; seeds {seeds}; "
                f"validation on the {dataset} test set; data from {env.get('data_source', '?')}.")
    return {"title": title, "claim": claim, "machine": machine, "evidence": evidence}


_NOTE = ("Training loss and accuracy are averaged over each epoch's mini-batches in training "
         "mode (as Keras reports them); validation uses evaluation mode (running statistics). "
         "Accuracies are in percent, mean ± sample standard deviation over seeds.")


@dataclass(frozen=True)
class RunReport:
    """A report on run directories, as data: ``table`` (one row per normaliser) and
    ``answer`` (the computed sentences) are what ``bnlab run`` prints."""

    title: str
    table: Table
    answer: list[str]
    blocks: list[Block]

    def write(self, out_dir: str | os.PathLike) -> ReportPaths:
        return write_page(out_dir, self.title, self.blocks)


def run_report(paths: list[str | os.PathLike]) -> RunReport:
    """The report on ``paths``: run directories or folders holding them (a ``bnlab run``
    output)."""
    runs = load_runs(paths)
    info = study_info(paths)
    groups = group_runs(runs, info.get("norms"))
    table = Table.from_dicts(table_rows(groups))
    answer = verdict(groups)
    h = _header(groups, info)
    blocks: list[Block] = [
        Text(h["claim"]), Text("**Answer.** " + " ".join(answer), "answer"),
        Text(f"**Evidence.** {h['evidence']}", "meta"),
        Text(f"**Machine.** {h['machine']}", "meta"),
        Heading("Accuracy"), table, Text(_NOTE, "note"),
    ]
    blocks += [Figure(caption, f"report-files/{stem}.png", png)
               for stem, (caption, png) in figures(groups).items()]
    blocks.append(Text("Regenerate with `bnlab report "
                       + " ".join(str(p) for p in paths) + "`.", "note"))
    return RunReport(h["title"], table, answer, blocks)


def write_report(paths: list[str | os.PathLike], out_dir: str | os.PathLike | None = None
                 ) -> ReportPaths:
    """Regenerate ``report.md``, ``report.html`` and ``report-files/*.png`` from run dirs.

    ``paths`` are run directories or folders holding them (a ``bnlab run`` output); the report
    goes to ``out_dir`` (default: the first path).
    """
    return run_report(paths).write(out_dir or paths[0])

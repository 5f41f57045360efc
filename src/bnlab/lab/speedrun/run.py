"""Run the seeds, write the run directory, judge the claim.

::

    OUT/
      config.json        the flags and both recipes as they ran
      environment.json   versions, CPU, threads, load average at the start, git revision
      evaluations.jsonl  one row per measurement: norm, seed, step, epoch, clock_s, accuracy
      results.json       per seed: accuracy at the end and time to each target; the verdict
      report.md, report.html, time_to_accuracy.png
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..studies._base import judge
from ..train.rundir import (
    lock_run_dir,
    new_out_dir,
    run_environment,
    write_json,
    write_jsonl,
)
from .recipe import Recipe, recipe_for

__all__ = ["TARGETS", "speedrun", "time_to", "summarise"]

#: the accuracies whose first-reached time every run reports
TARGETS = (0.90, 0.91, 0.92, 0.93)

CLAIM = ("BN makes training faster and accuracy higher (the tutorial's first benefit), "
         "measured in seconds.")


def _key(t: float) -> str:
    """A target as written in the files: two decimals ("0.90"), more where it has them."""
    return f"{t:.2f}" if round(t, 2) == t else f"{t:g}"


def time_to(evaluations: Sequence[dict[str, Any]], target: float) -> float | None:
    """The clock of the first evaluation at or above ``target`` (``None``: never reached)."""
    for e in evaluations:
        if e["accuracy"] >= target:
            return e["clock_s"]
    return None


def _spawn(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[3])  # the bnlab package's parent directory
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-m", "bnlab.lab.speedrun.worker", "--spec", json.dumps(spec)],
        capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no message)"]
        raise RuntimeError(f"speedrun seed {spec['seed']} ({spec['recipe']['norm']}) failed "
                           f"with exit status {proc.returncode}: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _row(run: dict[str, Any], targets: Sequence[float]) -> str:
    times = " ".join(f"{_fmt_s(run['time_to'][_key(t)]):>7}" for t in targets)
    return (f"{run['norm']:>5} {run['seed']:>4} {run['accuracy']:>9.4f} {times} "
            f"{run['epochs']:>7.2f} {run['clock_s']:>7.1f}  {run['stopped']}")


def header(targets: Sequence[float], split: str) -> str:
    acc = "test acc" if split == "test" else "hold acc"
    cols = " ".join(f"{'t' + _key(t):>7}" for t in targets)
    return f"{'norm':>5} {'seed':>4} {acc:>9} {cols} {'epochs':>7} {'end_s':>7}  stopped"


def summarise(runs: list[dict[str, Any]], targets: Sequence[float], budget_s: float,
              split: str) -> dict[str, Any]:
    """Medians per recipe and, with both recipes, the verdict (a target never reached counts
    as the whole budget)."""
    by_norm: dict[str, list[dict]] = {}
    for r in runs:
        by_norm.setdefault(r["norm"], []).append(r)
    medians = {}
    for norm, rs in by_norm.items():
        med: dict[str, Any] = {"accuracy": statistics.median(r["accuracy"] for r in rs)}
        for t in targets:
            vals = [r["time_to"][_key(t)] for r in rs]
            reached = [v for v in vals if v is not None]
            # the median seed reaches t only if more than half the seeds do
            med[f"time_to_{_key(t)}"] = (statistics.median(reached + [math.inf] *
                                          (len(vals) - len(reached)))
                                         if len(reached) * 2 > len(vals) else None)
            med[f"reached_{_key(t)}"] = f"{len(reached)}/{len(vals)}"
        medians[norm] = med
    out: dict[str, Any] = {"medians": medians}
    if {"bn", "none"} <= by_norm.keys():
        comparisons = []
        for t in (0.90, 0.92, 0.93):
            if t not in targets:
                continue
            bn = [r["time_to"][_key(t)] or budget_s for r in by_norm["bn"]]
            no = [r["time_to"][_key(t)] or budget_s for r in by_norm["none"]]
            comparisons.append(judge(f"seconds to {_key(t)} {split} accuracy", bn, no,
                                     with_label="BN", without_label="no BN",
                                     higher_is_better=False, min_effect=0.05 * budget_s))
        comparisons.append(judge(f"{split} accuracy at the end", [r["accuracy"] for r in
                                                                 by_norm["bn"]],
                                 [r["accuracy"] for r in by_norm["none"]], with_label="BN",
                                 without_label="no BN", min_effect=0.005))
        head = comparisons[0]
        out["comparisons"] = [c.as_dict() for c in comparisons]
        out["verdict"] = head.verdict
        out["evidence"] = "; ".join(
            f"{c.measure}: BN {c.mean_with:.4g} vs no BN {c.mean_without:.4g}, difference "
            f"{c.diff:+.4g} (claim direction; +-2 SE [{c.low:+.4g}, {c.high:+.4g}], minimum "
            f"effect {c.min_effect:.3g}): {c.verdict}" for c in comparisons
        ) + f" (a target never reached counts as the budget, {budget_s:g} s)"
    return out


def speedrun(out: str | os.PathLike, *, norms: Sequence[str] = ("bn",), seeds: int = 5,
             budget_s: float = 60.0, target: float = 0.93, split: str = "test",
             threads: int = 2, data_dir: str | None = None, train_subset: int | None = None,
             eval_subset: int | None = None, recipes: dict[str, Recipe] | None = None,
             say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train each recipe in ``norms`` for ``seeds`` seeds (interleaved: seed 0 of each, then
    seed 1, ...), each in a fresh process, and write the run directory ``out``."""
    recipes = {n: (recipes or {}).get(n) or recipe_for(n) for n in norms}
    targets = tuple(sorted(set(TARGETS) | {round(target, 4)}))
    config = {"command": "speedrun", "norms": list(norms), "seeds": seeds,
              "budget_s": budget_s, "target": target, "targets": list(targets),
              "split": split, "threads": threads, "data_dir": data_dir,
              "train_subset": train_subset, "eval_subset": eval_subset,
              "recipes": {n: r.as_dict() for n, r in recipes.items()},
              "clock": "seconds from each seed's process start (interpreter, imports, data "
                       "loading and every step), with the evaluations left out"}
    out = Path(out)
    if (out / "results.json").exists() or (out / "config.json").exists():
        raise ValueError(f"--out {out} already holds a speedrun; choose a new directory")
    with new_out_dir(out) as d, lock_run_dir(d):
        write_json(d / "config.json", config)
        write_json(d / "environment.json", run_environment())
        say(header(targets, split))
        runs, rows = [], []
        for seed in range(seeds):
            for norm in norms:
                spec = {"recipe": recipes[norm].as_dict(), "seed": seed, "budget_s": budget_s,
                        "split": split, "threads": threads, "data_dir": data_dir,
                        "train_subset": train_subset, "eval_subset": eval_subset}
                r = _spawn(spec)
                r["time_to"] = {_key(t): time_to(r["evaluations"], t) for t in targets}
                if split == "test":
                    r["test_accuracy"] = r["accuracy"]
                rows += [{"norm": norm, "seed": seed, **e} for e in r.pop("evaluations")]
                runs.append(r)
                say(_row(r, targets))
        write_jsonl(d / "evaluations.jsonl", rows)
        results = {
            "study": "speedrun", "claim": CLAIM,
            "preset": f"{budget_s:g} s budget",
            "measured": (f"Seconds from process start to each {split} accuracy in "
                         f"{', '.join(_key(t) for t in targets)} on Fashion-MNIST, "
                         f"{threads} threads, evaluation time left out; "
                         f"recipes: {', '.join(norms)} (docs/speedrun)."),
            "seeds": list(range(seeds)), "targets": [_key(t) for t in targets],
            "budget_s": budget_s, "split": split, "runs": runs,
            **summarise(runs, targets, budget_s, split),
        }
        write_json(d / "results.json", results)
        from .report import write_report

        write_report(d)
        say(_medians_line(results, targets))
        if "verdict" in results:
            say(f"verdict (BN makes training faster): {results['verdict']}")
    return results


def _medians_line(results: dict[str, Any], targets: Sequence[float]) -> str:
    parts = []
    for norm, m in results["medians"].items():
        ts = ", ".join(f"{_key(t)} at {_fmt_s(m[f'time_to_{_key(t)}'])} s "
                       f"({m[f'reached_{_key(t)}']} seeds)" for t in targets)
        parts.append(f"median {norm}: accuracy {m['accuracy']:.4f}; {ts}")
    return "\n".join(parts)


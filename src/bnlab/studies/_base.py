"""What a study is, how its results are stored, and how a verdict is reached from numbers.

A study states a claim from the seed, runs a measurement with several seeds, and writes a run
directory: ``config.json`` (resolved preset), ``environment.json``, ``results.json`` (every
number), figures and ``report.md``/``report.html`` derived from those files. The verdict is
computed from the numbers by :func:`compare`, never typed.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Preset = Literal["quick", "full"]
Verdict = Literal["supported", "contradicted", "not shown"]


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[Any]]


@dataclass
class StudyResult:
    """What a study's run produced: the verdict, the sentence with its numbers, and evidence."""

    verdict: Verdict
    evidence: str
    measured: str
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (caption, file name)
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyContext:
    """Everything a study's ``run`` needs: its resolved settings, seeds and where to write."""

    name: str
    preset: Preset
    settings: dict[str, Any]
    seeds: list[int]
    out: Path
    data_dir: str | None = None
    log: Callable[[str], None] = print

    def figure_path(self, stem: str) -> Path:
        return self.out / f"{stem}.png"


@dataclass(frozen=True)
class Study:
    name: str
    claim: str
    method: str
    presets: dict[str, dict[str, Any]]
    run: Callable[[StudyContext], StudyResult]
    default_seeds: dict[str, int] = field(default_factory=lambda: {"quick": 2, "full": 3})


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_ms(values: Sequence[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def compare(with_: Sequence[float], without: Sequence[float], *, higher_is_better: bool = True,
            min_effect: float = 0.005) -> tuple[Verdict, float]:
    """Decide whether ``with_`` beats ``without`` beyond the seed-to-seed noise.

    The difference of means must exceed twice its standard error (each side's standard
    deviation over seeds) and ``min_effect`` (default half a percentage point of accuracy; the
    only guard with a single seed) to count. Returns the verdict and the signed improvement
    (positive: ``with_`` is better).
    """
    ma, sa = mean_std(with_)
    mb, sb = mean_std(without)
    diff = (ma - mb) if higher_is_better else (mb - ma)
    se = math.sqrt(sa**2 / max(len(with_), 1) + sb**2 / max(len(without), 1))
    threshold = max(2 * se, min_effect)
    if diff > threshold:
        return "supported", diff
    if diff < -threshold:
        return "contradicted", diff
    return "not shown", diff


def run_study(study: Study, preset: Preset, seeds: int | None, out: Path,
              data_dir: str | None = None, overrides: dict[str, Any] | None = None,
              log: Callable[[str], None] = print) -> Path:
    """Run ``study`` with ``preset`` and write its run directory; returns the directory."""
    from ..train.rundir import run_environment, write_json
    from ._report import write_report

    if preset not in study.presets:
        raise ValueError(
            f"study {study.name}: preset must be one of {sorted(study.presets)}, got {preset!r}"
        )
    settings = dict(study.presets[preset])
    for key, value in (overrides or {}).items():
        if key not in settings:
            raise ValueError(
                f"study {study.name}: unknown setting {key!r}; valid: {', '.join(sorted(settings))}"
            )
        settings[key] = type(settings[key])(value) if settings[key] is not None else value
    n_seeds = seeds if seeds is not None else study.default_seeds[preset]
    if n_seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {n_seeds}")
    out.mkdir(parents=True, exist_ok=True)
    ctx = StudyContext(study.name, preset, settings, list(range(n_seeds)), out, data_dir, log)
    config = {"study": study.name, "preset": preset, "seeds": ctx.seeds, "settings": settings,
              "data_dir": data_dir}
    write_json(out / "config.json", config)
    write_json(out / "environment.json", run_environment())
    t0 = time.perf_counter()
    result = study.run(ctx)
    elapsed = time.perf_counter() - t0
    payload = {
        "study": study.name, "claim": study.claim, "method": study.method,
        "preset": preset, "seeds": ctx.seeds, "seconds": elapsed,
        "verdict": result.verdict, "evidence": result.evidence, "measured": result.measured,
        "tables": [t.__dict__ for t in result.tables],
        "figures": result.figures, "numbers": result.numbers,
    }
    write_json(out / "results.json", payload)
    write_report(out)
    log(f"{study.name}: {result.verdict} - {result.evidence} ({elapsed:.0f} s)")
    return out

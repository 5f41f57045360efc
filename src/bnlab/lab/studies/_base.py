"""What a study is, how its results are stored, and how a verdict is reached from numbers.

A study states a claim from the seed, runs a measurement with several seeds, and writes a run
directory: ``config.json`` (resolved preset), ``environment.json``, ``results.json`` (every
number), figures and ``report.md``/``report.html`` derived from those files. The verdict is
computed from the numbers by one rule, :func:`judge`, never typed: each study only chooses
the measure it compares (one value per seed for each side) and the direction its claim
predicts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..report.collect import mean_sd

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
    # the headline comparison first (its verdict is ``verdict``), then secondary ones
    comparisons: list[Comparison] = field(default_factory=list)


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
    # the verdict rule applied to a run's ``numbers``: the headline comparison first
    decide: Callable[[dict[str, Any]], list[Comparison]] | None = None
    default_seeds: dict[str, int] = field(default_factory=lambda: {"quick": 5, "full": 5})


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation: bnlab's one convention (``report.mean_sd``), so
    the sd of a single value is ``nan`` (undefined), never 0: one seed cannot show a spread,
    and the verdict rule then says "not shown" rather than trusting a zero error."""
    return mean_sd([float(v) for v in values])


def fmt_ms(values: Sequence[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    if math.isnan(s):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


@dataclass(frozen=True)
class Comparison:
    """One application of the verdict rule, with every number a reader needs to check it.

    ``diff`` is the difference of the means in the claim's direction (positive: as the claim
    predicts), ``se`` its standard error over seeds, ``[low, high]`` = ``diff -+ 2 se``.
    """

    measure: str
    with_label: str
    without_label: str
    higher_is_better: bool
    min_effect: float
    with_values: list[float]
    without_values: list[float]
    mean_with: float
    mean_without: float
    diff: float
    se: float
    verdict: Verdict

    @property
    def low(self) -> float:
        return self.diff - 2 * self.se

    @property
    def high(self) -> float:
        return self.diff + 2 * self.se

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["low"], d["high"] = self.low, self.high
        return d

    def sentence(self, digits: int = 3) -> str:
        """The comparison in words, e.g. for a study's evidence line."""
        f = f".{digits}f"
        return (f"{self.measure}: {self.with_label} {self.mean_with:{f}} vs "
                f"{self.without_label} {self.mean_without:{f}}, difference {self.diff:+{f}} "
                f"(claim direction; +-2 SE [{self.low:+{f}}, {self.high:+{f}}], minimum effect "
                f"{self.min_effect:{f}}): {self.verdict}")


def judge(measure: str, with_: Sequence[float], without: Sequence[float], *,
          with_label: str = "with", without_label: str = "without",
          higher_is_better: bool = True, min_effect: float = 0.005) -> Comparison:
    """The one verdict rule: does ``with_`` differ from ``without`` as the claim predicts?

    ``diff`` is the difference of the means over seeds in the claim's direction (``with_``
    minus ``without`` when ``higher_is_better``, else the reverse) and ``se`` its standard
    error (each side's standard deviation over its seeds). The verdict is

    * ``supported`` when ``diff > max(2 se, min_effect)``: the whole interval ``diff -+ 2 se``
      lies above zero and the effect is at least the stated minimum;
    * ``contradicted`` when ``diff < -max(2 se, min_effect)``: the same, the other way;
    * ``not shown`` otherwise (inside the seed-to-seed noise, or too small to matter).

    ``min_effect`` is in the measure's units. A side with a single value has no standard
    deviation (``nan``), so its verdict is "not shown": one seed cannot support a claim.
    """
    if min_effect < 0 or not math.isfinite(min_effect):
        raise ValueError(f"judge: min_effect must be a finite number >= 0, got {min_effect!r}")
    a = [float(v) for v in with_]
    b = [float(v) for v in without]
    if not a or not b:
        raise ValueError(f"judge({measure!r}): each side needs at least one value")
    ma, sa = mean_std(a)
    mb, sb = mean_std(b)
    diff = (ma - mb) if higher_is_better else (mb - ma)
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    threshold = max(2 * se, min_effect)
    verdict: Verdict = "not shown"
    if not math.isfinite(diff) or not math.isfinite(se):
        verdict = "not shown"
    elif diff > threshold:
        verdict = "supported"
    elif diff < -threshold:
        verdict = "contradicted"
    return Comparison(measure, with_label, without_label, higher_is_better, min_effect, a, b,
                      ma, mb, diff, se, verdict)


def compare(with_: Sequence[float], without: Sequence[float], *, higher_is_better: bool = True,
            min_effect: float = 0.005) -> tuple[Verdict, float]:
    """:func:`judge` reduced to ``(verdict, diff)`` (positive: ``with_`` is better)."""
    c = judge("", with_, without, higher_is_better=higher_is_better, min_effect=min_effect)
    return c.verdict, c.diff


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def parse_setting(study: str, key: str, default: Any, value: Any) -> Any:
    """``value`` (a command-line string, usually) as the type of the preset's ``default``.

    Booleans accept true/false, yes/no, on/off, 1/0 (any case); integers refuse fractions;
    a preset value of ``None`` takes the value as given.
    """
    if default is None or not isinstance(value, str):
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"study {study}: setting {key!r} expects true or false, got "
                             f"{value!r}")
        return value
    text = value.strip()
    if isinstance(default, bool):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"study {study}: setting {key!r} expects true or false, got {value!r}")
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        kind = "an integer" if isinstance(default, int) else "a number"
        raise ValueError(f"study {study}: setting {key!r} expects {kind}, got {value!r}") \
            from None
    return type(default)(text)


def run_study(study: Study, preset: Preset, seeds: int | None, out: Path,
              data_dir: str | None = None, overrides: dict[str, Any] | None = None,
              log: Callable[[str], None] = print) -> Path:
    """Run ``study`` with ``preset`` and write its run directory; returns the directory."""
    from ..train.rundir import run_environment, write_json
    from ._report import write_study_report

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
        settings[key] = parse_setting(study.name, key, settings[key], value)
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
    if result.comparisons and result.verdict != result.comparisons[0].verdict:
        raise RuntimeError(f"study {study.name}: verdict {result.verdict!r} is not its headline "
                           f"comparison's ({result.comparisons[0].verdict!r})")
    elapsed = time.perf_counter() - t0
    payload = {
        "study": study.name, "claim": study.claim, "method": study.method,
        "preset": preset, "seeds": ctx.seeds, "seconds": elapsed,
        "verdict": result.verdict, "evidence": result.evidence, "measured": result.measured,
        "tables": [t.__dict__ for t in result.tables],
        "figures": result.figures, "numbers": result.numbers,
        "comparisons": [c.as_dict() for c in result.comparisons],
    }
    write_json(out / "results.json", payload)
    write_study_report(out)
    log(f"{study.name}: {result.verdict} - {result.evidence} ({elapsed:.0f} s)")
    return out

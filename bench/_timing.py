"""Shared timing helpers for the benchmarks: medians of many repeats, ratios in one run."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def median_seconds(fn: Callable[[], object], *, repeats: int = 30, warmup: int = 3,
                   min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls (more while under ``min_time``)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], object]], *, rounds: int = 5,
                        repeats: int = 8, warmup: int = 1) -> dict[str, float]:
    """Median times of several functions measured in alternating rounds.

    Alternating keeps slow drifts of the machine (other load, frequency) from favouring one
    contender: every contender sees every phase of the run. ``repeats=1`` alternates call by
    call. ``warmup`` untimed rounds of one call each come first.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def rounds_of(fns: dict, rounds: int, repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Per-round medians of each contender, alternating call by call within a round.

    Each round starts with the next contender (round ``r`` runs them from position
    ``r mod n`` on), so none always runs right after the same other one (a call's cost depends
    on what ran before it: caches, the allocator's free lists). It does not remove a
    contender's own placement in memory: two identical copies of a small model can differ by
    a few percent for as long as they live (``torch again`` in the benches shows it)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    out: dict[str, list[float]] = {k: [] for k in fns}
    items = list(fns.items())
    for r in range(rounds):
        samples: dict[str, list[float]] = {k: [] for k in fns}
        order = items[r % len(items):] + items[: r % len(items)]
        for _ in range(repeats):
            for k, f in order:
                t0 = time.perf_counter()
                f()
                samples[k].append(time.perf_counter() - t0)
        for k, v in samples.items():
            out[k].append(statistics.median(v))
    return out


def machine() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }


def write_json(target: str | Path, payload: dict) -> Path:
    """Write ``payload`` atomically to ``target``: a path, or a name under ``bench/results``."""
    path = RESULTS / f"{target}.json" if isinstance(target, str) else Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return path

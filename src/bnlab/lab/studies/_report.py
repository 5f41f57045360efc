"""Study reports (Markdown and self-contained HTML), derived from a run directory only and
written by the one report writer, :func:`bnlab.lab.report.page.write_page`."""

from __future__ import annotations

import json
from pathlib import Path

from ..report.page import Block, Figure, Heading, ReportPaths, Table, Text, write_page

__all__ = ["write_study_report", "load_results", "machine_line"]


def load_results(run_dir: Path) -> tuple[dict, dict]:
    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    env = json.loads((run_dir / "environment.json").read_text())
    return results, env


def machine_line(env: dict) -> str:
    """One line naming the machine and versions a run was measured on."""
    cpu = env.get("cpu_model") or env.get("processor") or env.get("machine", "?")
    return (f"{cpu}, {env.get('cpu_count', '?')} CPUs, {env.get('torch_threads')} torch "
            f"threads, torch {env.get('torch')}, bnlab {env.get('bnlab')}, kernels "
            f"{env.get('kernel_backend')}")


COMPARISON_HEADERS = ["measure", "with", "mean", "without", "mean", "difference (claim's way)",
                      "±2 SE interval", "minimum effect", "verdict"]


def _g(v: float) -> str:
    return f"{v:.4g}"


def comparison_rows(r: dict) -> list[list[str]]:
    """One row per comparison of a run (none for runs written before comparisons were kept):
    both means, the difference, its interval and the minimum effect, so the verdict can be
    checked by eye: supported when the interval lies above 0 and the difference is at least
    the minimum effect, contradicted when both hold the other way."""
    rows = []
    for i, c in enumerate(r.get("comparisons", [])):
        way = "higher" if c["higher_is_better"] else "lower"
        rows.append([
            ("**headline** " if i == 0 else "") + f"{c['measure']} ({way} as claimed)",
            c["with_label"], _g(c["mean_with"]), c["without_label"], _g(c["mean_without"]),
            f"{c['diff']:+.4g}", f"[{c['low']:+.4g}, {c['high']:+.4g}]", _g(c["min_effect"]),
            c["verdict"],
        ])
    return rows


def write_study_report(run_dir: Path) -> ReportPaths:
    """Write ``report.md`` and ``report.html`` into ``run_dir`` from its JSON files."""
    run_dir = Path(run_dir)
    r, env = load_results(run_dir)
    blocks: list[Block] = [
        Text(f"**Claim (from the tutorial):** {r['claim']}"),
        Text(f"**Verdict:** {r['verdict']}. {r['evidence']}", "answer"),
        Text(f"**What we measured:** {r['measured']}"),
        Text(f"**Method:** {r['method']}"),
        Text(f"**Machine:** {machine_line(env)}. Preset `{r['preset']}`, seeds {r['seeds']}, "
             f"{r['seconds']:.0f} s."),
    ]
    rows = comparison_rows(r)
    if rows:
        blocks += [
            Heading("The verdict's numbers"),
            Text(f"Means over {len(r['seeds'])} seeds; difference = with - without in the "
                 "claim's direction; supported when the ±2 SE interval lies above 0 and the "
                 "difference is at least the minimum effect, contradicted when both hold below "
                 "0."),
            Table(COMPARISON_HEADERS, rows),
        ]
    for t in r["tables"]:
        blocks += [Heading(t["title"]), Table(t["headers"], t["rows"])]
    blocks += [Figure(caption, name) for caption, name in r["figures"]]
    return write_page(run_dir, f"Study `{r['study']}`", blocks)

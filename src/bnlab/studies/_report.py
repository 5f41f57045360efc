"""Study reports (Markdown and self-contained HTML), derived from a run directory only."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

__all__ = ["write_report", "load_results", "machine_line"]


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


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``run_dir`` from its JSON files."""
    run_dir = Path(run_dir)
    r, env = load_results(run_dir)
    md = [
        f"# Study `{r['study']}`",
        "",
        f"**Claim (from the seed):** {r['claim']}",
        "",
        f"**Verdict:** {r['verdict']}. {r['evidence']}",
        "",
        f"**What we measured:** {r['measured']}",
        "",
        f"**Method:** {r['method']}",
        "",
        f"**Machine:** {machine_line(env)}. Preset `{r['preset']}`, seeds {r['seeds']}, "
        f"{r['seconds']:.0f} s.",
        "",
    ]
    rows = comparison_rows(r)
    if rows:
        md += ["## The verdict's numbers", "",
               f"Means over {len(r['seeds'])} seeds; difference = with - without in the claim's "
               "direction; supported when the ±2 SE interval lies above 0 and the difference "
               "is at least the minimum effect, contradicted when both hold below 0.", "",
               "| " + " | ".join(COMPARISON_HEADERS) + " |",
               "|" + "---|" * len(COMPARISON_HEADERS)]
        md += ["| " + " | ".join(row) + " |" for row in rows]
        md.append("")
    for t in r["tables"]:
        md += [f"## {t['title']}", "", "| " + " | ".join(t["headers"]) + " |",
               "|" + "---|" * len(t["headers"])]
        md += ["| " + " | ".join(str(c) for c in row) + " |" for row in t["rows"]]
        md.append("")
    for caption, name in r["figures"]:
        md += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    md_path = run_dir / "report.md"
    md_path.write_text("\n".join(md))

    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>bnlab study {e(r['study'])}</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
        "img{max-width:100%}.v{font-size:1.2em}</style></head><body>",
        f"<h1>Study <code>{e(r['study'])}</code></h1>",
        f"<p><b>Claim (from the seed):</b> {e(r['claim'])}</p>",
        f"<p class='v'><b>Verdict: {e(r['verdict'])}.</b> {e(r['evidence'])}</p>",
        f"<p><b>What we measured:</b> {e(r['measured'])}</p>",
        f"<p><b>Method:</b> {e(r['method'])}</p>",
        f"<p><b>Machine:</b> {e(machine_line(env))}. Preset <code>{e(r['preset'])}</code>, "
        f"seeds {e(str(r['seeds']))}, {r['seconds']:.0f} s.</p>",
    ]
    if rows:
        parts.append("<h2>The verdict's numbers</h2><table><tr>"
                     + "".join(f"<th>{e(h)}</th>" for h in COMPARISON_HEADERS) + "</tr>")
        for row in rows:
            cells = [e(str(c)).replace("**headline** ", "<b>headline</b> ") for c in row]
            parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    for t in r["tables"]:
        parts.append(f"<h2>{e(t['title'])}</h2><table><tr>"
                     + "".join(f"<th>{e(h)}</th>" for h in t["headers"]) + "</tr>")
        for row in t["rows"]:
            parts.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>")
        parts.append("</table>")
    for caption, name in r["figures"]:
        data = base64.b64encode((run_dir / name).read_bytes()).decode()
        parts.append(f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{e(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    html_path = run_dir / "report.html"
    html_path.write_text("\n".join(parts))
    return md_path, html_path

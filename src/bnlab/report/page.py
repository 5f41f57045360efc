"""The building blocks every bnlab report shares: a markdown table, figures embedded as
base64 PNG, and one self-contained HTML page (no external file, script or font).

:func:`write_page` writes ``report.md`` (figures as ``report-files/<stem>.png``) and
``report.html`` from a title, paragraphs, tables and figures, for reports that are not
training studies (e.g. ``bench/bench_shift.py``); :mod:`bnlab.report.render` uses the same
pieces for ``bnlab report``.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from ..train.rundir import atomic_write_bytes, atomic_write_text, make_out_dir

__all__ = ["md_table", "html_table", "code", "figures_html", "html_page", "write_page"]

_CSS = """body { font-family: sans-serif; max-width: 1000px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }
th { background: #eee; } td:first-child { text-align: left; font-weight: bold; }
.answer { background: #f3f7ff; border-left: 4px solid #36c; padding: 0.6em 1em; }
figure { margin: 1.5em 0; } img.plot { max-width: 100%; }
figcaption, .note, .meta { color: #555; font-size: 0.9em; }
"""


def md_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table with the first row's keys as the header."""
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines)


def html_table(rows: list[dict[str, Any]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in r.values()) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def code(text: str) -> str:
    """Markdown's `name` as HTML <code> (on already escaped text)."""
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def figures_html(figs: dict[str, tuple[str, bytes]]) -> str:
    """``{stem: (caption, PNG bytes)}`` as ``<figure>`` elements with the PNGs inlined."""
    e = html.escape
    return "".join(
        f'<figure><img class="plot" id="fig-{stem}" alt="{e(caption)}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{e(caption)}</figcaption></figure>"
        for stem, (caption, png) in figs.items()
    )


def html_page(title: str, body: str) -> str:
    """A complete HTML document around ``body`` (already HTML) with the reports' style."""
    e = html.escape
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
{_CSS}</style></head><body>
<h1>{e(title)}</h1>
{body}
</body></html>
"""


def write_page(out_dir: str | Path, title: str, paragraphs: list[str],
               tables: dict[str, list[dict[str, Any]]],
               figs: dict[str, tuple[str, bytes]], footer: str = "") -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and ``report-files/<stem>.png`` into ``out_dir``.

    ``paragraphs`` are markdown-ish text (backticks become ``<code>``), ``tables`` map a
    section heading to rows (dicts with the same keys), ``figs`` map a file stem to
    ``(caption, PNG bytes)``. Returns ``(html_path, md_path)``.
    """
    if not all(tables.values()):
        raise ValueError("write_page: every table needs at least one row")
    out = Path(out_dir)
    files = make_out_dir(make_out_dir(out, "--out") / "report-files", "--out")
    for stem, (_, png) in figs.items():
        atomic_write_bytes(files / f"{stem}.png", png)  # never a 0-byte PNG on a full disk
    md = [f"# {title}", ""]
    for p in paragraphs:
        md += [p, ""]
    for heading, rows in tables.items():
        md += [f"## {heading}", "", md_table(rows), ""]
    for stem, (caption, _) in figs.items():
        md += [f"## {caption}", "", f"![{caption}](report-files/{stem}.png)", ""]
    if footer:
        md += [footer, ""]
    md_path = out / "report.md"
    atomic_write_text(md_path, "\n".join(md))
    e = html.escape
    body = "".join(f"<p>{code(e(p))}</p>\n" for p in paragraphs)
    body += "".join(f"<h2>{e(h)}</h2>\n{html_table(rows)}\n" for h, rows in tables.items())
    body += figures_html(figs)
    if footer:
        body += f'\n<p class="note">{code(e(footer))}</p>'
    html_path = out / "report.html"
    atomic_write_text(html_path, html_page(title, body))
    return html_path, md_path

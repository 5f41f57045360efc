"""The one report writer: ``report.md`` and a self-contained ``report.html`` (no external
file, script or font) from a title and a list of blocks (:class:`Heading`, :class:`Text`,
:class:`Table`, :class:`Figure`).

The run experiment's report (:mod:`bnlab.lab.report.render`), the studies' reports
(:mod:`bnlab.lab.studies._report`) and the corruption benchmark's report all go through
:func:`write_page`, which writes every file atomically and returns :class:`ReportPaths`.
Text is markdown-ish: ``**bold**`` and backticks become ``<b>`` and ``<code>`` in the HTML.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..train.rundir import atomic_write_bytes, atomic_write_text, make_out_dir

__all__ = ["ReportPaths", "Heading", "Text", "Table", "Figure", "Block", "md_table",
           "html_table", "code", "html_page", "write_page"]


@dataclass(frozen=True)
class ReportPaths:
    """Where :func:`write_page` wrote a report."""

    markdown: Path
    html: Path


@dataclass(frozen=True)
class Heading:
    """A section heading (``##``)."""

    text: str


@dataclass(frozen=True)
class Text:
    """A paragraph; ``style`` is ``""``, ``"answer"`` (set off), ``"meta"`` or ``"note"``
    (smaller, grey)."""

    text: str
    style: str = ""


@dataclass(frozen=True)
class Table:
    """A table: column headers and rows of cells (shown with ``str``)."""

    headers: list[str]
    rows: list[list[Any]]

    @classmethod
    def from_dicts(cls, rows: list[dict[str, Any]]) -> Table:
        """The first row's keys as headers, each row's values as cells."""
        if not rows:
            raise ValueError("Table.from_dicts: a table needs at least one row")
        return cls(list(rows[0]), [list(r.values()) for r in rows])


@dataclass(frozen=True)
class Figure:
    """A PNG figure at ``file`` (relative to the report's folder). With ``png`` the file is
    written; without it, it must already be there (a study's figure)."""

    caption: str
    file: str
    png: bytes | None = None


Block = Heading | Text | Table | Figure

_CSS = """body { font-family: sans-serif; max-width: 1000px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }
th { background: #eee; } td:first-child { text-align: left; font-weight: bold; }
.answer { background: #f3f7ff; border-left: 4px solid #36c; padding: 0.6em 1em; }
figure { margin: 1.5em 0; } img.plot { max-width: 100%; } code { background: #f4f4f4; }
figcaption, .note, .meta { color: #555; font-size: 0.9em; }
"""


def md_table(table: Table) -> str:
    """``table`` as a markdown table."""
    lines = ["| " + " | ".join(table.headers) + " |", "|" + "---|" * len(table.headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def code(text: str) -> str:
    """Markdown's `name` as HTML <code> (on already escaped text)."""
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _inline(text: str) -> str:
    """Markdown-ish ``text`` as HTML: escaped, backticks as <code>, ``**x**`` as <b>."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", code(html.escape(text, quote=False)))


def html_table(table: Table) -> str:
    head = "".join(f"<th>{_inline(str(h))}</th>" for h in table.headers)
    body = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>"
                   for row in table.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_page(title: str, body: str) -> str:
    """A complete HTML document around ``body`` (already HTML) with the reports' style."""
    plain = html.escape(title.replace("`", ""))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{plain}</title>
<style>
{_CSS}</style></head><body>
<h1>{_inline(title)}</h1>
{body}
</body></html>
"""


def _markdown(block: Block) -> list[str]:
    if isinstance(block, Heading):
        return [f"## {block.text}", ""]
    if isinstance(block, Text):
        return [block.text, ""]
    if isinstance(block, Table):
        return [md_table(block), ""]
    return [f"![{block.caption}]({block.file})", "", f"*{block.caption}*", ""]


def _html(block: Block, out: Path) -> str:
    if isinstance(block, Heading):
        return f"<h2>{_inline(block.text)}</h2>"
    if isinstance(block, Text):
        style = f' class="{block.style}"' if block.style else ""
        return f"<p{style}>{_inline(block.text)}</p>"
    if isinstance(block, Table):
        return html_table(block)
    png = block.png if block.png is not None else (out / block.file).read_bytes()
    caption = html.escape(block.caption)
    return (f'<figure><img class="plot" id="fig-{html.escape(Path(block.file).stem)}" '
            f'alt="{caption}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            f"<figcaption>{caption}</figcaption></figure>")


def write_page(out_dir: str | Path, title: str, blocks: Sequence[Block]) -> ReportPaths:
    """Write ``report.md`` and ``report.html`` (figures inlined) into ``out_dir``, and each
    :class:`Figure` that carries its PNG to its file; every file atomically (a full disk
    leaves no partial or 0-byte file)."""
    out = make_out_dir(Path(out_dir), "--out")
    for b in blocks:
        if isinstance(b, Figure) and b.png is not None:
            make_out_dir((out / b.file).parent, "--out")
            atomic_write_bytes(out / b.file, b.png)
    md = [f"# {title}", ""]
    for b in blocks:
        md += _markdown(b)
    paths = ReportPaths(out / "report.md", out / "report.html")
    atomic_write_text(paths.markdown, "\n".join(md))
    atomic_write_text(paths.html, html_page(title, "\n".join(_html(b, out) for b in blocks)))
    return paths

"""The blocks a page is made of (headings, paragraphs, bullets, tables, code, figures) and their markdown and HTML.

report.md / report.html (klgap/render/pages.py) and compare.md (klgap/report/compare.py) are lists of these blocks, so each
page's markdown and HTML show the same content; the HTML escapes every piece of text and embeds PNGs as data URIs.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

# ----------------------------------------------------------------------------- the document


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Para:
    text: str
    lead: bool = False  # the page's finding: set off in HTML


@dataclass(frozen=True)
class Bullets:
    items: list[str]
    lead: bool = False


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Code:
    text: str
    lang: str = ""


@dataclass(frozen=True)
class Figure:
    path: Path
    caption: str


@dataclass(frozen=True)
class PageLinks:
    """Links to other pages of the same kind, one a bullet: (text, folder) -> folder/report.md in markdown,
    folder/report.html in HTML (a study's per-site/layer pages)."""

    items: list[tuple[str, str]]


Block = Union[Heading, Para, Bullets, Table, Code, Figure, PageLinks]


# ----------------------------------------------------------------------------- markdown


def _md_text(text: str) -> str:
    """Plain text for markdown: no raw HTML, no accidental line breaks."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def _md_cell(text: str) -> str:
    return _md_text(text).replace("|", "\\|")


def md_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {_md_text(block.text)}"
    if isinstance(block, Para):
        return _md_text(block.text)
    if isinstance(block, Bullets):
        return "\n".join(f"- {_md_text(item)}" for item in block.items)
    if isinstance(block, Table):
        lines = ["| " + " | ".join(_md_cell(h) for h in block.header) + " |",
                 "|" + "|".join("---" for _ in block.header) + "|"]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
        return "\n".join(lines)
    if isinstance(block, Code):
        longest = max((len(m) for m in re.findall(r"`+", block.text)), default=0)
        fence = "`" * max(3, longest + 1)
        return f"{fence}{block.lang}\n{block.text}\n{fence}"
    if isinstance(block, Figure):
        return f"![{block.path.stem}]({block.path.name})\n\n*{_md_text(block.caption)}*"
    if isinstance(block, PageLinks):
        return "\n".join(f"- [{_md_text(text)}]({folder}/report.md)" for text, folder in block.items)
    raise TypeError(f"unknown block {block!r}")


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """A table as plain text, columns padded to their widest cell (the terminal, a Result's repr)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows])


# ----------------------------------------------------------------------------- html

STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}"
    "table{border-collapse:collapse;margin:.5em 0 1em;font-size:.85em}"
    "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
    "td:first-child,th:first-child{text-align:left}"
    "th{vertical-align:bottom}.nw{white-space:nowrap}"
    ".table{max-width:100%;overflow-x:auto}"
    ".lead{font-size:1.05em;background:#f2f7fb;border-left:4px solid #0072B2;padding:.6em 1em .6em 1.6em}"
    "p.lead{padding-left:1em}"
    "pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.85em}"
    "figure{margin:1em 0}img{max-width:100%;box-sizing:border-box;border:1px solid #ddd}figcaption{font-size:.9em;color:#555}"
)


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _cell(text: str) -> str:
    """A table cell that wraps only between its parts ('0.292' | '[0.288, 0.296]', '3.81e-06' | '(Holm 4.2e-05)'),
    never inside a number (a browser would break '3.81e-06' after its hyphen)."""
    parts = re.split(r" (?=[\[(])", str(text))
    return " ".join(f'<span class="nw">{esc(part)}</span>' for part in parts)


def html_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{esc(block.text)}</h{block.level}>"
    lead = ' class="lead"' if isinstance(block, (Para, Bullets)) and block.lead else ""
    if isinstance(block, Para):
        return f"<p{lead}>{esc(block.text)}</p>"
    if isinstance(block, Bullets):
        return f"<ul{lead}>" + "".join(f"<li>{esc(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Table):
        head = "".join(f"<th>{esc(h)}</th>" for h in block.header)
        body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in block.rows)
        return f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    if isinstance(block, Code):
        return f"<pre><code>{esc(block.text)}</code></pre>"
    if isinstance(block, Figure):
        return (f'<figure><img src="{_png_uri(block.path)}" alt="{esc(block.path.stem)}">'
                f"<figcaption>{esc(block.caption)}</figcaption></figure>")
    if isinstance(block, PageLinks):
        return "<ul>" + "".join(f'<li><a href="{esc(folder)}/report.html">{esc(text)}</a></li>'
                                for text, folder in block.items) + "</ul>"
    raise TypeError(f"unknown block {block!r}")

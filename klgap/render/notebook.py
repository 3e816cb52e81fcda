"""A Result as a notebook shows it: ``repr`` (the finding and the key table, as text) and ``_repr_html_`` (the
page's opening block and key table, then its figures inline as PNG data URIs, under a style scoped to the output
so the notebook's own look is left alone). Both come from the blocks report.html is made of."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pandas as pd

from klgap.render.blocks import STYLE, Figure, Heading, Table, esc, html_block, text_table
from klgap.render.lead import finding_sentences, lead_blocks
from klgap.render.pages import caption_for, summary_blocks, title_of
from klgap.report.schema import Report

SCOPE = "klgap-result"
N_SHOWN = 1  # figures shown open; the rest under a <details> the reader opens


def scoped_style(style: str = STYLE, scope: str = SCOPE) -> str:
    """The page's CSS with every rule limited to `.scope` (its `body` rule made the scope's own)."""
    rules = []
    for selectors, body in re.findall(r"([^{}]+)\{([^{}]*)\}", style):
        scoped = []
        for selector in selectors.split(","):
            selector = selector.strip()
            scoped.append(f".{scope}" if selector == "body" else f".{scope} {selector}")
        rules.append(f"{','.join(scoped)}{{{body}}}")
    return "".join(rules).replace("max-width:1180px;margin:2em auto;padding:0 1em;", "max-width:1180px;")


def where_saved(path: Path | None) -> str:
    return f"saved in {path}" if path is not None else "in memory (result.save(FOLDER) writes its folder)"


def result_text(report: Report, path: Path | None) -> str:
    """The repr: what was measured, the finding, the key table, where it is and how to see more."""
    key = next(b for b in summary_blocks(report) if isinstance(b, Table))
    head = (f"klgap.Result: {report.model} · {report.hook_name} · {report.mode} · {report.n_tokens:,} tokens "
            f"({report.n_contexts:,} contexts), {len(report.interventions)} interventions, {where_saved(path)}")
    return "\n".join([head, *finding_sentences(report), text_table(key.header, key.rows),
                      "result.summary(): every intervention; result.plot(kind): a figure; result.report: all numbers"])


def result_html(report: Report, tokens: pd.DataFrame, path: Path | None) -> str:
    """The HTML display: the page's title, finding and key table, then its figures (drawn from `tokens`)."""
    from klgap.figures.runs import figures_for_run

    key = [b for b in summary_blocks(report) if isinstance(b, Table)]
    parts = [html_block(Heading(3, title_of(report))), *map(html_block, lead_blocks(report)), *map(html_block, key),
             f"<p>{esc(where_saved(path))}</p>"]
    with tempfile.TemporaryDirectory(prefix="klgap-figures-") as tmp:
        figures = figures_for_run(Path(tmp), report, tokens)
        shown = [html_block(Figure(f, caption_for(f, report))) for f in figures]
    parts += shown[:N_SHOWN]
    if len(shown) > N_SHOWN:
        names = ", ".join(f.stem for f in figures[N_SHOWN:])
        parts.append(f"<details><summary>{esc(f'more figures: {names}')}</summary>{''.join(shown[N_SHOWN:])}</details>")
    return f'<div class="{SCOPE}"><style>{scoped_style()}</style>{"".join(parts)}</div>'

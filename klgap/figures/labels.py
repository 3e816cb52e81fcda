"""What the run figures share: how a run and a site are named in titles, the order interventions are drawn in,
which rows of the tokens table are measured ones, and when an axis should be logarithmic."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from klgap.report.schema import BASELINE, Report, SiteSummary, StudyReport

PRIMARY = ("sae", BASELINE)  # drawn first, bold, with their intervals; every other intervention fainter


def site_label(run: SiteSummary, with_site: bool = True) -> str:
    """'resid_post L6' (or 'L6' without the site)."""
    return f"{run.site} L{run.layer}" if with_site else f"L{run.layer}"


def run_line(run: SiteSummary, model: str, mode: str) -> str:
    """'tiny-gpt2 · resid_pre L1 · all_tokens · 1,008 tokens (16 contexts)'."""
    return f"{model} · {site_label(run)} · {mode} · {run.n_tokens:,} tokens ({run.n_contexts:,} contexts)"


def run_label(report: Report | None, n_tokens: int | None = None) -> str:
    """One line naming the run: model · site Lk · mode · N tokens (C contexts); without a report, N tokens."""
    if report is None:
        return f"{n_tokens:,} tokens" if n_tokens is not None else ""
    return run_line(report, report.model, report.mode)


def runs_of(reports: Report | StudyReport | Sequence[Report]) -> list[tuple[SiteSummary, str, str]]:
    """(run, model, mode) per site/layer of a run report, a list of them, or a study report."""
    if isinstance(reports, StudyReport):
        return [(run, reports.model, reports.mode) for run in reports.runs]
    if isinstance(reports, Report):
        return [(reports, reports.model, reports.mode)]
    return [(report, report.model, report.mode) for report in reports]


def tokens_per_run(runs: Sequence[tuple[SiteSummary, str, str]]) -> str:
    """The tokens of several sites/layers, each its own ('4,064 tokens each'; '4,064 / 2,032 tokens'), never
    their sum: every site/layer measured its own tokens."""
    counts = [run.n_tokens for run, _, _ in runs]
    if len(set(counts)) == 1:
        return f"{counts[0]:,} tokens each"
    if len(counts) <= 6:
        return " / ".join(f"{n:,}" for n in counts) + " tokens"
    return f"{min(counts):,}–{max(counts):,} tokens each"


def ordered(names: Iterable[str]) -> list[str]:
    """sae, the baseline first, then the others in order of appearance."""
    seen = list(dict.fromkeys(str(n) for n in names))
    return [n for n in PRIMARY if n in seen] + [n for n in seen if n not in PRIMARY]


def intervention_names(tokens: pd.DataFrame) -> list[str]:
    """Interventions in order of first appearance (the engine writes them in the run's order)."""
    column = tokens["intervention"]
    if isinstance(column.dtype, pd.CategoricalDtype):
        present = set(column.unique())
        return [str(c) for c in column.cat.categories if c in present]
    return [str(n) for n in pd.unique(column)]


def measured(tokens: pd.DataFrame) -> pd.DataFrame:
    """Rows of the named interventions only (many-samples draws have draw >= 0)."""
    return tokens[tokens["draw"] < 0] if "draw" in tokens.columns else tokens


def spans_decades(values: Iterable[float], decades: float = 1.5) -> bool:
    """The positive finite values span at least `decades` powers of ten (a log axis reads them better)."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    arr = arr[np.isfinite(arr) & (arr > 0)]
    return arr.size > 1 and math.log10(arr.max() / arr.min()) >= decades


def num(value: Any) -> float:
    """A number to draw: None as NaN."""
    return float(value) if value is not None else math.nan

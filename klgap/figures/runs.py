"""Figures for a run, drawn on plain matplotlib ``Figure`` objects: no pyplot, no backend switched, no window.

Every function takes data (a typed report from klgap.report.schema, the per-token table, or both) and an output
path, writes one PNG atomically and returns its path; with ``path=None`` it returns the Figure instead
(``klgap.Result.plot`` in a notebook). Titles say what is drawn and for which run (model, site, layer, mode,
number of tokens). :func:`figures_for_run` draws every figure that applies to a saved run folder; the figures
themselves live in bars.py (kl_bars), distributions.py (kl_hist, many_samples), positions.py (kl_by_position,
single_token) and curves.py (robustness), and are importable from here.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from klgap.figures.bars import kl_bars
from klgap.figures.curves import CurvePoint, curve_floor, curves_of, ratio_bars, robustness_curve
from klgap.figures.distributions import kl_histogram, many_samples_hist
from klgap.figures.labels import measured, run_label, site_label, tokens_per_run
from klgap.figures.positions import kl_by_position, single_token_curve
from klgap.figures.sweep import length_sweep
from klgap.report.read import load_report
from klgap.report.schema import Report, StudyReport

TOKEN_COLUMNS = ["context", "position", "offset", "intervention", "draw", "kl"]

__all__ = ["CurvePoint", "curve_floor", "curves_of", "figures_for_run", "kl_bars", "kl_by_position", "kl_histogram",
           "many_samples_hist", "ratio_bars", "read_tokens", "robustness_curve", "run_label", "single_token_curve",
           "site_label", "study_robustness"]


# ----------------------------------------------------------------------------- a run folder


def read_tokens(run_dir: str | Path) -> pd.DataFrame | None:
    """The columns the figures need from run_dir/tokens.parquet (read once), or None if there is none."""
    path = Path(run_dir) / "tokens.parquet"
    if not path.is_file():
        return None
    frame = pd.read_parquet(path, columns=TOKEN_COLUMNS)
    names = frame["intervention"].astype(str)
    frame["intervention"] = pd.Categorical(names, categories=pd.unique(names))
    return frame


def study_robustness(report: StudyReport, path: str | Path | None) -> Path | Figure:
    """A study's robustness curves, one per site/layer (sequential colours when they are the layers of one site)."""
    points, stars = curves_of((site_label(run), run.curve) for run in report.runs)
    one_site = len({run.site for run in report.runs}) == 1
    curved = [(run, report.model, report.mode) for run in report.runs if run.curve is not None]
    where = ", ".join(site_label(run) for run, _, _ in curved)
    return robustness_curve(points, path, stars, f"{report.model} · {where} · {report.mode} · {tokens_per_run(curved)}",
                            ordered=one_site)


def figures_for_run(
    run_dir: str | Path, report: Report | StudyReport | None = None, tokens: pd.DataFrame | None = None
) -> list[Path]:
    """Write every figure that applies to the run's mode beside its report.json; return their paths.

    Reads report.json (unless `report` is given) and tokens.parquet (once, only the needed columns;
    unless `tokens` is given). Without a tokens table only the figures drawn from the report are made.
    """
    run_dir = Path(run_dir)
    if report is None:
        report = load_report(run_dir)
    if isinstance(report, StudyReport):
        paths = [kl_bars(report, run_dir / "kl_bars.png")]
        if any(run.curve is not None for run in report.runs):
            paths.append(study_robustness(report, run_dir / "robustness.png"))
        return paths
    if tokens is None:
        tokens = read_tokens(run_dir)
    mode = report.mode
    paths = [kl_bars(report, run_dir / "kl_bars.png", tokens=tokens)]
    if tokens is not None and len(measured(tokens)):
        paths.append(kl_histogram(tokens, run_dir / "kl_hist.png", report))
    if mode == "all_tokens" and tokens is not None:
        paths.append(kl_by_position(tokens, run_dir / "kl_by_position.png", report))
    if mode == "single_token" and (tokens is not None or report.single_token is not None):
        paths.append(single_token_curve(tokens if tokens is not None else report, run_dir / "single_token.png", report))
    if mode == "many_samples" and tokens is not None and (tokens["draw"] >= 0).any():
        paths.append(many_samples_hist(tokens, report, run_dir / "many_samples.png"))
    if report.curve is not None:
        points, stars = curves_of([(site_label(report), report.curve)])
        paths.append(robustness_curve(points, run_dir / "robustness.png", stars, run_label(report)))
    if report.sweep is not None:
        paths.append(length_sweep(report.sweep, run_dir / "length_sweep.png", run_label(report), report.baselines))
    if report.sweep is not None:
        paths.append(length_sweep(report.sweep, run_dir / "length_sweep.png", run_label(report), report.baselines))
    return paths

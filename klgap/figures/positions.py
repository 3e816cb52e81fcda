"""Mean KL along the context: kl_by_position.png (every position of an all-tokens run) and single_token.png
(the offsets after the one patched position). The SAE and the baseline are drawn bold with their intervals;
every other intervention faint, in its own colour and line style, so that thirteen of them stay readable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from klgap.figures.labels import PRIMARY, intervention_names, measured, num, ordered, run_label, spans_decades
from klgap.figures.style import SeriesStyle, legend_beside, new_figure, save, styles_for, title
from klgap.report.schema import Report

N_MARKERS = 12  # markers along a faint line: about this many, so they tell lines apart without covering them


def line_kwargs(style: SeriesStyle, primary: bool, n_points: int) -> dict[str, Any]:
    """Axes.plot arguments: the SAE and the baseline bold and on top; the others thin and faint, their markers
    (where their style has one) spaced out along the line."""
    kwargs: dict[str, Any] = {**style.line(), "linewidth": 1.8 if primary else 0.9, "alpha": 1.0 if primary else 0.45,
                              "zorder": 3 if primary else 2}
    if style.marker:
        kwargs.update(markersize=3.5, markevery=max(1, n_points // N_MARKERS))
    return kwargs


def opaque_legend(ax: Any) -> None:
    """The legend's keys drawn at full strength, though the lines they name are faint (each key must be readable)."""
    for handle in ax.get_legend().legend_handles:
        handle.set_alpha(1.0)


def kl_by_position(tokens: pd.DataFrame, path: str | Path | None, report: Report | None = None) -> Path | Figure:
    """Mean KL at each context position per intervention (bands: ±1.96·SE for sae and the baseline)."""
    rows = measured(tokens)
    rows = rows[np.isfinite(rows["kl"])]
    table = rows.groupby(["intervention", "position"], observed=True)["kl"].agg(["mean", "std", "count"])
    names = ordered(intervention_names(rows))
    styles = styles_for(names)
    fig = new_figure((9, 5))
    ax = fig.subplots()
    for name in names:
        part = table.loc[name]
        primary = name in PRIMARY
        ax.plot(part.index, part["mean"], label=name, **line_kwargs(styles[name], primary, len(part)))
        if primary:
            half = 1.96 * part["std"].fillna(0) / np.sqrt(part["count"])
            ax.fill_between(part.index, (part["mean"] - half).clip(lower=part["mean"] * 0.05), part["mean"] + half,
                            color=styles[name].color, alpha=0.15, linewidth=0, zorder=3)
    if spans_decades(table["mean"].to_numpy()):
        ax.set_yscale("log")
    ax.set_xlabel("position in context [tokens]")
    ax.set_ylabel("mean KL(P_clean ‖ P_patched) [nats]")
    legend_beside(ax)
    opaque_legend(ax)
    n = int((rows["intervention"] == "sae").sum()) if "sae" in names else None
    faint = " (bold: sae and the baseline, with ±1.96·SE bands; faint: the other interventions)" \
        if len(names) > len([n for n in names if n in PRIMARY]) else " (bands: ±1.96·SE)"
    title(fig, "Mean per-token KL by position" + faint, run_label(report, n))
    return save(fig, path)


def offset_table(data: pd.DataFrame | Report) -> dict[str, dict[int, float]]:
    """intervention -> {offset: mean KL}, from the tokens table or the report's single_token.kl_by_offset."""
    if isinstance(data, pd.DataFrame):
        rows = measured(data)
        rows = rows[np.isfinite(rows["kl"])]
        means = rows.groupby(["intervention", "offset"], observed=True, sort=False)["kl"].mean()
        out: dict[str, dict[int, float]] = {}
        for (name, offset), value in means.items():
            out.setdefault(str(name), {})[int(offset)] = float(value)
        return {k: dict(sorted(v.items())) for k, v in out.items()}
    by_offset = data.single_token.kl_by_offset if data.single_token is not None else {}
    return {name: dict(sorted((int(o), num(v)) for o, v in curve.items())) for name, curve in by_offset.items()}


def single_token_curve(data: pd.DataFrame | Report, path: str | Path | None,
                       report: Report | None = None) -> Path | Figure:
    """Mean KL at offsets 0..k after the single patched position t, per intervention (log y if it spans decades)."""
    if report is None and isinstance(data, Report):
        report = data
    curves = offset_table(data)
    names = ordered(curves)
    styles = styles_for(names)
    fig = new_figure((8, 5))
    ax = fig.subplots()
    for name in names:
        offsets = list(curves[name])
        primary = name in PRIMARY
        kwargs = {"marker": "o", "markersize": 3 if primary else 2, **line_kwargs(styles[name], primary, len(offsets))}
        ax.plot(offsets, list(curves[name].values()), label=name, **kwargs)
    if spans_decades([v for c in curves.values() for v in c.values()]):
        ax.set_yscale("log")
    position = report.single_token.position if report is not None and report.single_token is not None else None
    where = f"t = {position}" if position is not None else "t"
    ax.set_xlabel(f"offset from the patched position {where} [tokens]; 0 = the patched token")
    ax.set_ylabel("mean KL(P_clean ‖ P_patched) [nats]")
    ax.xaxis.get_major_locator().set_params(integer=True)
    legend_beside(ax)
    opaque_legend(ax)
    title(fig, f"Mean KL at positions after patching only position {where}", run_label(report))
    return save(fig, path)

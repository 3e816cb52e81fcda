"""kl_bars.png: mean per-token KL per intervention, as bars (one group per site/layer of a study)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from klgap.figures.labels import measured, num, ordered, run_line, runs_of, site_label, spans_decades, tokens_per_run
from klgap.figures.style import legend_beside, new_figure, save, styles_for, title
from klgap.report.schema import Report, StudyReport
from klgap.report.sweep import is_sweep_point


def context_se(tokens: pd.DataFrame) -> dict[str, float]:
    """1.96 × standard error of the per-context mean KL, per intervention."""
    rows = measured(tokens)
    rows = rows[np.isfinite(rows["kl"])]
    per_context = rows.groupby(["intervention", "context"], observed=True)["kl"].mean()
    spread = per_context.groupby(level=0, observed=True).agg(["std", "count"])
    return {str(k): 1.96 * float(r["std"]) / math.sqrt(r["count"]) for k, r in spread.iterrows() if r["count"] > 1}


def kl_bars(
    reports: Report | StudyReport | Sequence[Report], path: str | Path | None, tokens: pd.DataFrame | None = None
) -> Path | Figure:
    """Grouped bars of mean KL per intervention, one group per site/layer (one report gives one group).

    With `tokens` (single report only), error bars are ±1.96·SE of the per-context mean KL. Each intervention
    keeps its style (colour, and a hatch once the palette's colours come round: klgap.figures.style.styles_for).
    Length-sweep points are left out (length_sweep.png draws them).
    """
    runs = runs_of(reports)
    same_site = len({run.site for run, _, _ in runs}) <= 1
    names = ordered(n for run, _, _ in runs for n in run.interventions if not is_sweep_point(n))
    styles = styles_for(names)
    errors = context_se(tokens) if tokens is not None and len(runs) == 1 else {}
    values_all: list[float] = []
    if len(runs) == 1:  # one site/layer: a bar per intervention, named on the axis (no one-tick layer axis)
        run = runs[0][0]
        fig = new_figure((min(16.0, max(7.0, 0.9 * len(names) + 3)), 4.8))
        ax = fig.subplots()
        err = [errors.get(n, math.nan) for n in names] if errors else None
        for i, name in enumerate(names):
            value = num(run.interventions[name].kl_mean)
            values_all.append(value)
            ax.bar([i], [value], 0.7, yerr=[err[i]] if err else None, capsize=3 if err else 0, label=name,
                   error_kw={"elinewidth": 1}, **styles[name].bar())
        rotate = len(names) > 4 or max((len(n) for n in names), default=0) > 16
        ax.set_xticks(np.arange(len(names)), names, rotation=30 if rotate else 0, ha="right" if rotate else "center",
                      fontsize=8)
        ax.set_xlabel("intervention")
    else:
        labels = [site_label(run, with_site=not same_site) for run, _, _ in runs]
        fig = new_figure((min(16.0, max(7.0, 0.4 * len(runs) * max(1, len(names)) + 4)), 4.8))
        ax = fig.subplots()
        width = 0.8 / max(1, len(names))
        x = np.arange(len(runs))
        for i, name in enumerate(names):
            values = [num(run.interventions[name].kl_mean) if name in run.interventions else math.nan
                      for run, _, _ in runs]
            values_all += values
            ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=name, **styles[name].bar())
        ax.set_xticks(x, labels)
        ax.set_xlabel(f"layer of {runs[0][0].site}" if same_site else "site / layer")
        legend_beside(ax, title="intervention", title_fontsize=8)
    ax.set_ylabel("mean KL(P_clean ‖ P_patched) [nats]")
    if spans_decades(values_all, 2):
        ax.set_yscale("log")
        positive = [v for v in values_all if math.isfinite(v) and v > 0]
        floor = min(v for v in positive if v >= max(positive) * 1e-6) / 5  # ~0 KL (x' = x) does not squash the rest
        ax.set_ylim(bottom=floor)
        if any(v < floor for v in positive):  # said under the axis, not over the bars
            ax.set_xlabel(f"{ax.get_xlabel()} (bars below {floor:.1g} nats, ≈ 0, are cut at the axis)")
    if len(runs) == 1:
        label = run_line(*runs[0])
    else:
        models = sorted({model for _, model, _ in runs})
        modes = sorted({mode for _, _, mode in runs})
        where = ", ".join(site_label(run) for run, _, _ in runs) if len(runs) <= 6 else f"{len(runs)} sites/layers"
        label = f"{', '.join(models)} · {where} · {', '.join(modes)} · {tokens_per_run(runs)}"
    what = "Mean per-token KL per intervention" + (" (error bars: ±1.96·SE over contexts)" if errors else "")
    title(fig, what if len(runs) == 1 else what + " by site/layer", label)
    return save(fig, path)

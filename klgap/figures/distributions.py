"""Distributions of per-token KL: kl_hist.png (every intervention on a log axis) and many_samples.png (the
random draws of each context against the SAE's KL, and the z-scores)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from klgap.figures.labels import PRIMARY, measured, ordered, run_label, spans_decades
from klgap.figures.style import BASELINE_COLOR, SAE, legend_beside, new_figure, save, styles_for, title
from klgap.report.schema import Report

N_CONTEXT_PANELS = 4


def log_bins(values: list[np.ndarray], n_bins: int = 60) -> np.ndarray:
    positive = np.concatenate([v[v > 0] for v in values]) if values else np.empty(0)
    if positive.size == 0:
        return np.logspace(-6, 0, n_bins + 1)
    low, high = max(positive.min(), positive.max() * 1e-12), positive.max()  # values below 1e-12·max are clipped
    if not high > low:
        low, high = high / 10, high * 10
    return np.logspace(math.log10(low), math.log10(high), n_bins + 1)


def pooled(report: Report | None) -> str:
    """What a mode's per-token rows are: all offsets after t pooled, or the one position t."""
    if report is None or report.mode == "all_tokens":
        return ""
    position = report.position if report.position is not None else "t"
    if report.mode == "single_token":
        return f", offsets 0..{report.single_token.k if report.single_token else 'k'} after t = {position} pooled"
    return f" at position {position}"


def kl_histogram(tokens: pd.DataFrame, path: str | Path | None, report: Report | None = None) -> Path | Figure:
    """Histograms of per-token KL on a log x axis (log-spaced bins; density per decade of KL).

    sae and the baseline (epsilon_random) are drawn filled with their means marked; other interventions as faint lines.
    """
    rows = measured(tokens)
    groups = {str(k): v.to_numpy(dtype=np.float64) for k, v in rows.groupby("intervention", observed=True, sort=False)["kl"]}
    groups = {k: v[np.isfinite(v)] for k, v in groups.items()}
    names = ordered(groups)
    styles = styles_for(names)
    typical = int(np.median([v.size for v in groups.values()])) if groups else 0
    bins = log_bins(list(groups.values()), int(np.clip(2 * math.sqrt(typical), 10, 60)))
    fig = new_figure((8, 5))
    ax = fig.subplots()
    n_nonpositive = 0
    for name in names:
        values = groups[name]
        positive = values[values > 0]
        n_nonpositive += int(values.size - positive.size)
        if positive.size == 0:
            continue
        logs = np.clip(np.log10(positive), math.log10(bins[0]), math.log10(bins[-1]))
        density, edges = np.histogram(logs, bins=np.log10(bins), density=True)
        primary = name in PRIMARY
        label = f"{name} (mean {positive.mean():.3g}, n={positive.size:,})" if primary else name
        color = styles[name].color
        if primary:
            ax.stairs(density, 10**edges, color=color, fill=True, alpha=0.35, linewidth=1.5, label=label)
            ax.stairs(density, 10**edges, color=color, linewidth=1.5)
            ax.axvline(values.mean(), color=color, linestyle="--", linewidth=1)
        else:
            ax.stairs(density, 10**edges, color=color, linestyle=styles[name].linestyle, alpha=0.6, linewidth=0.8,
                      label=label)
    ax.set_xscale("log")
    ax.set_xlabel("per-token KL(P_clean ‖ P_patched) [nats], log scale")
    ax.set_ylabel("density [fraction of tokens per decade of KL]")
    legend_beside(ax)
    if n_nonpositive:  # said under the axis, not over the data
        ax.set_xlabel(f"{ax.get_xlabel()} ({n_nonpositive:,} values ≤ 0 not shown)")
    n = int(len(rows[rows["intervention"] == "sae"])) if "sae" in groups else None
    title(fig, "Distribution of per-token KL" + pooled(report) + " (dashed: means)", run_label(report, n))
    return save(fig, path)


def zscores(tokens: pd.DataFrame, report: Report | None) -> pd.DataFrame:
    """Per-context sae_kl, z (from the report when it has them, else recomputed from the draws)."""
    many = report.many_samples if report is not None else None
    if many is not None and many.per_context:
        return pd.DataFrame([c.model_dump() for c in many.per_context]).set_index("context")
    draws = tokens[tokens["draw"] >= 0].groupby("context")["kl"].agg(["mean", "std"])
    sae = tokens[(tokens["draw"] < 0) & (tokens["intervention"] == "sae")].set_index("context")["kl"]
    frame = draws.join(sae.rename("sae_kl"), how="inner")
    frame["z"] = (frame["sae_kl"] - frame["mean"]) / frame["std"]
    return frame


def many_samples_hist(tokens: pd.DataFrame, report: Report | None, path: str | Path | None) -> Path | Figure:
    """For the first few contexts, the KL of N random draws with the SAE's KL marked; and all contexts' z-scores."""
    draws = tokens[tokens["draw"] >= 0]
    sample_name = report.many_samples.sample_intervention if report is not None and report.many_samples else None
    if sample_name is None and len(draws):
        sample_name = str(draws["intervention"].iloc[0])
    sae = tokens[(tokens["draw"] < 0) & (tokens["intervention"] == "sae")].groupby("context")["kl"].first()
    zs = zscores(tokens, report)
    contexts = sorted(draws["context"].unique())[:N_CONTEXT_PANELS]
    fig = new_figure((12, 6))
    grid = fig.add_gridspec(2, 3)
    by_context = dict(tuple(draws[draws["context"].isin(contexts)].groupby("context")["kl"]))
    for i, context in enumerate(contexts):
        ax = fig.add_subplot(grid[i // 2, i % 2])
        values = by_context[context].to_numpy(dtype=np.float64)
        values = values[np.isfinite(values)]
        sae_kl = float(sae.get(context, math.nan))
        log_x = spans_decades(list(values) + [sae_kl], 1.0)
        if log_x:
            bins = log_bins([values, np.array([sae_kl])], 40)
            values = np.clip(values, bins[0], bins[-1])
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            span = values.tolist() + ([sae_kl] if math.isfinite(sae_kl) else [])
            bins = np.linspace(min(span), max(span), 41) if span and max(span) > min(span) else 40
        ax.hist(values, bins=bins, color=BASELINE_COLOR, alpha=0.6)
        ax.axvline(sae_kl, color=SAE, linewidth=2)
        z = float(zs["z"].get(context, math.nan)) if "z" in zs else math.nan
        ax.set_title(f"context {context}: {len(values)} draws (blue); sae KL {sae_kl:.3g} (line), z = {z:.2f}",
                     fontsize=8)
        ax.set_xlabel("KL(P_clean ‖ P_patched) [nats]", fontsize=8)
        ax.set_ylabel("draws [count]", fontsize=8)
        ax.tick_params(labelsize=7)
    ax = fig.add_subplot(grid[:, 2])
    z = zs["z"].to_numpy(dtype=np.float64) if "z" in zs else np.empty(0)
    z = z[np.isfinite(z)]
    if z.size:
        ax.hist(z, bins=min(40, max(5, z.size // 3)), color=SAE, alpha=0.7)
        ax.axvline(0, color="black", linewidth=1)
        ax.axvline(2, color="gray", linestyle="--", linewidth=1)
    ax.set_title(f"z of sae KL against the draws, all {z.size:,}\ncontexts (mean {z.mean() if z.size else math.nan:.2f};"
                 " dashed: z = 2)", fontsize=9)
    ax.set_xlabel("z = (KL_sae − mean draws) / sd draws [sd]", fontsize=8)
    ax.set_ylabel("contexts [count]", fontsize=8)
    position = report.position if report is not None else None
    at = f" at position {position}" if position is not None else ""
    n_draws = int(draws["draw"].max()) + 1 if len(draws) else 0
    fig.suptitle(f"Many samples{at}: KL of {n_draws} random {sample_name} draws per context vs the SAE's KL\n"
                 f"{run_label(report)}", fontsize=10)
    return save(fig, path)

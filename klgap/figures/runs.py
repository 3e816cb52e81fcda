"""Figures for a run, drawn on plain matplotlib ``Figure`` objects: no pyplot, no backend switched, no window.

Every function takes data (a typed report from klgap.report.schema, the per-token table, or both) and an output path, writes one PNG
atomically and returns its path; with ``path=None`` it returns the Figure instead (``klgap.Result.plot`` in a
notebook). Titles say what is drawn and for which run (model, site, layer, mode,
number of tokens). :func:`figures_for_run` draws every figure that applies to a saved run folder.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.ticker import NullFormatter

from klgap.figures.style import BASELINE_COLOR, SAE, colors_for, legend_beside, save as _save, title
from klgap.figures.style import new_figure as _figure
from klgap.figures.curves import CurvePoint, curve_floor, curves_of, ratio_bars, robustness_curve  # noqa: F401
from klgap.figures.sweep import length_sweep
from klgap.report.sweep import is_sweep_point
from klgap.report.schema import BASELINE, Report, SiteSummary, StudyReport, load_report
PRIMARY = ("sae", BASELINE)
TOKEN_COLUMNS = ["context", "position", "offset", "intervention", "draw", "kl"]
N_CONTEXT_PANELS = 4


# ----------------------------------------------------------------------------- helpers


def site_label(run: SiteSummary, with_site: bool = True) -> str:
    """'resid_post L6' (or 'L6' without the site)."""
    return f"{run.site} L{run.layer}" if with_site else f"L{run.layer}"


def _label(run: SiteSummary, model: str, mode: str) -> str:
    return f"{model} · {site_label(run)} · {mode} · {run.n_tokens:,} tokens ({run.n_contexts:,} contexts)"


def run_label(report: Report | None, n_tokens: int | None = None) -> str:
    """One line naming the run: model · site Lk · mode · N tokens (C contexts); without a report, N tokens."""
    if report is None:
        return f"{n_tokens:,} tokens" if n_tokens is not None else ""
    return _label(report, report.model, report.mode)


def _title(ax: Any, what: str, label: str) -> None:
    title(ax.figure, what, label)


def _ordered(names: Iterable[str]) -> list[str]:
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


def _spans_decades(values: Iterable[float], decades: float = 1.5) -> bool:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    arr = arr[np.isfinite(arr) & (arr > 0)]
    return arr.size > 1 and math.log10(arr.max() / arr.min()) >= decades


def _num(value: Any) -> float:
    return float(value) if value is not None else math.nan


# ----------------------------------------------------------------------------- figures


def _runs(reports: Report | StudyReport | Sequence[Report]) -> list[tuple[SiteSummary, str, str]]:
    """(run, model, mode) per site/layer of a run report, a list of them, or a study report."""
    if isinstance(reports, StudyReport):
        return [(run, reports.model, reports.mode) for run in reports.runs]
    if isinstance(reports, Report):
        return [(reports, reports.model, reports.mode)]
    return [(report, report.model, report.mode) for report in reports]


def _context_se(tokens: pd.DataFrame) -> dict[str, float]:
    """1.96 × standard error of the per-context mean KL, per intervention."""
    rows = measured(tokens)
    rows = rows[np.isfinite(rows["kl"])]
    per_context = rows.groupby(["intervention", "context"], observed=True)["kl"].mean()
    spread = per_context.groupby(level=0, observed=True).agg(["std", "count"])
    return {str(k): 1.96 * float(r["std"]) / math.sqrt(r["count"]) for k, r in spread.iterrows() if r["count"] > 1}


def kl_bars(
    reports: Report | StudyReport | Sequence[Report], path: str | Path, tokens: pd.DataFrame | None = None
) -> Path:
    """Grouped bars of mean KL per intervention, one group per site/layer (one report gives one group).

    With `tokens` (single report only), error bars are ±1.96·SE of the per-context mean KL. Length-sweep points are
    left out (length_sweep.png draws them).
    """
    runs = _runs(reports)
    same_site = len({run.site for run, _, _ in runs}) <= 1
    names = _ordered(n for run, _, _ in runs for n in run.interventions if not is_sweep_point(n))
    colors = colors_for(names)
    errors = _context_se(tokens) if tokens is not None and len(runs) == 1 else {}
    values_all: list[float] = []
    if len(runs) == 1:  # one site/layer: a bar per intervention, named on the axis (no one-tick layer axis)
        run = runs[0][0]
        fig = _figure((min(16.0, max(7.0, 0.9 * len(names) + 3)), 4.8))
        ax = fig.subplots()
        values_all = [_num(run.interventions[n].kl_mean) for n in names]
        err = [errors.get(n, math.nan) for n in names] if errors else None
        ax.bar(np.arange(len(names)), values_all, 0.7, color=[colors[n] for n in names], yerr=err,
               capsize=3 if err else 0, error_kw={"elinewidth": 1})
        rotate = len(names) > 4 or max((len(n) for n in names), default=0) > 16
        ax.set_xticks(np.arange(len(names)), names, rotation=30 if rotate else 0, ha="right" if rotate else "center",
                      fontsize=8)
        ax.set_xlabel("intervention")
    else:
        labels = [site_label(run, with_site=not same_site) for run, _, _ in runs]
        fig = _figure((min(16.0, max(7.0, 0.4 * len(runs) * max(1, len(names)) + 4)), 4.8))
        ax = fig.subplots()
        width = 0.8 / max(1, len(names))
        x = np.arange(len(runs))
        for i, name in enumerate(names):
            values = [_num(run.interventions[name].kl_mean) if name in run.interventions else math.nan
                      for run, _, _ in runs]
            values_all += values
            ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=name, color=colors[name])
        ax.set_xticks(x, labels)
        ax.set_xlabel(f"layer of {runs[0][0].site}" if same_site else "site / layer")
        legend_beside(ax, title="intervention", title_fontsize=8)
    ax.set_ylabel("mean KL(P_clean ‖ P_patched) [nats]")
    if _spans_decades(values_all, 2):
        ax.set_yscale("log")
        positive = [v for v in values_all if math.isfinite(v) and v > 0]
        floor = min(v for v in positive if v >= max(positive) * 1e-6) / 5  # ~0 KL (x' = x) does not squash the rest
        ax.set_ylim(bottom=floor)
        if any(v < floor for v in positive):  # said under the axis, not over the bars
            ax.set_xlabel(f"{ax.get_xlabel()} (bars below {floor:.1g} nats, ≈ 0, are cut at the axis)")
    models = sorted({model for _, model, _ in runs})
    modes = sorted({mode for _, _, mode in runs})
    if len(runs) == 1:
        label = _label(*runs[0])
    else:
        total = sum(run.n_tokens for run, _, _ in runs)
        where = ", ".join(site_label(run) for run, _, _ in runs) if len(runs) <= 6 else f"{len(runs)} sites/layers"
        label = f"{', '.join(models)} · {where} · {', '.join(modes)} · {total:,} tokens"
    what = "Mean per-token KL per intervention" + (" (error bars: ±1.96·SE over contexts)" if errors else "")
    _title(ax, what if len(runs) == 1 else what + " by site/layer", label)
    return _save(fig, path)


def _log_bins(values: list[np.ndarray], n_bins: int = 60) -> np.ndarray:
    positive = np.concatenate([v[v > 0] for v in values]) if values else np.empty(0)
    if positive.size == 0:
        return np.logspace(-6, 0, n_bins + 1)
    low, high = max(positive.min(), positive.max() * 1e-12), positive.max()  # values below 1e-12·max are clipped
    if not high > low:
        low, high = high / 10, high * 10
    return np.logspace(math.log10(low), math.log10(high), n_bins + 1)


def _pooled(report: Report | None) -> str:
    """What a mode's per-token rows are: all offsets after t pooled, or the one position t."""
    if report is None or report.mode == "all_tokens":
        return ""
    position = report.position if report.position is not None else "t"
    if report.mode == "single_token":
        return f", offsets 0..{report.single_token.k if report.single_token else 'k'} after t = {position} pooled"
    return f" at position {position}"


def kl_histogram(tokens: pd.DataFrame, path: str | Path, report: Report | None = None) -> Path:
    """Histograms of per-token KL on a log x axis (log-spaced bins; density per decade of KL).

    sae and the baseline (epsilon_random) are drawn filled with their means marked; other interventions as faint lines.
    """
    rows = measured(tokens)
    groups = {str(k): v.to_numpy(dtype=np.float64) for k, v in rows.groupby("intervention", observed=True, sort=False)["kl"]}
    groups = {k: v[np.isfinite(v)] for k, v in groups.items()}
    names = _ordered(groups)
    colors = colors_for(names)
    typical = int(np.median([v.size for v in groups.values()])) if groups else 0
    bins = _log_bins(list(groups.values()), int(np.clip(2 * math.sqrt(typical), 10, 60)))
    fig = _figure((8, 5))
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
        ax.stairs(density, 10**edges, color=colors[name], fill=primary, alpha=0.35 if primary else 0.6,
                  linewidth=1.5 if primary else 0.8, label=label)
        if primary:
            ax.stairs(density, 10**edges, color=colors[name], linewidth=1.5)
            ax.axvline(values.mean(), color=colors[name], linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("per-token KL(P_clean ‖ P_patched) [nats], log scale")
    ax.set_ylabel("density [fraction of tokens per decade of KL]")
    legend_beside(ax)
    if n_nonpositive:  # said under the axis, not over the data
        ax.set_xlabel(f"{ax.get_xlabel()} ({n_nonpositive:,} values ≤ 0 not shown)")
    n = int(len(rows[rows["intervention"] == "sae"])) if "sae" in groups else None
    _title(ax, "Distribution of per-token KL" + _pooled(report) + " (dashed: means)", run_label(report, n))
    return _save(fig, path)


def kl_by_position(tokens: pd.DataFrame, path: str | Path, report: Report | None = None) -> Path:
    """Mean KL at each context position per intervention (bands: ±1.96·SE for sae and the baseline)."""
    rows = measured(tokens)
    rows = rows[np.isfinite(rows["kl"])]
    table = rows.groupby(["intervention", "position"], observed=True)["kl"].agg(["mean", "std", "count"])
    names = _ordered(intervention_names(rows))
    colors = colors_for(names)
    fig = _figure((9, 5))
    ax = fig.subplots()
    for name in names:
        part = table.loc[name]
        primary = name in PRIMARY
        ax.plot(part.index, part["mean"], color=colors[name], label=name,
                linewidth=1.6 if primary else 0.9, alpha=1.0 if primary else 0.7)
        if primary:
            half = 1.96 * part["std"].fillna(0) / np.sqrt(part["count"])
            ax.fill_between(part.index, (part["mean"] - half).clip(lower=part["mean"] * 0.05), part["mean"] + half,
                            color=colors[name], alpha=0.15, linewidth=0)
    if _spans_decades(table["mean"].to_numpy()):
        ax.set_yscale("log")
    ax.set_xlabel("position in context [tokens]")
    ax.set_ylabel("mean KL(P_clean ‖ P_patched) [nats]")
    legend_beside(ax)
    n = int((rows["intervention"] == "sae").sum()) if "sae" in names else None
    _title(ax, "Mean per-token KL by position (bands: ±1.96·SE)", run_label(report, n))
    return _save(fig, path)


def _offset_table(data: pd.DataFrame | Report) -> dict[str, dict[int, float]]:
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
    return {name: dict(sorted((int(o), _num(v)) for o, v in curve.items())) for name, curve in by_offset.items()}


def single_token_curve(data: pd.DataFrame | Report, path: str | Path, report: Report | None = None) -> Path:
    """Mean KL at offsets 0..k after the single patched position t, per intervention (log y if it spans decades)."""
    if report is None and isinstance(data, Report):
        report = data
    curves = _offset_table(data)
    names = _ordered(curves)
    colors = colors_for(names)
    fig = _figure((8, 5))
    ax = fig.subplots()
    for name in names:
        offsets = list(curves[name])
        primary = name in PRIMARY
        ax.plot(offsets, list(curves[name].values()), marker="o", markersize=3 if primary else 2, color=colors[name],
                label=name, linewidth=1.6 if primary else 0.9, alpha=1.0 if primary else 0.7)
    if _spans_decades([v for c in curves.values() for v in c.values()]):
        ax.set_yscale("log")
    position = report.single_token.position if report is not None and report.single_token is not None else None
    where = f"t = {position}" if position is not None else "t"
    ax.set_xlabel(f"offset from the patched position {where} [tokens]; 0 = the patched token")
    ax.set_ylabel("mean KL(P_clean ‖ P_patched) [nats]")
    ax.xaxis.get_major_locator().set_params(integer=True)
    legend_beside(ax)
    _title(ax, f"Mean KL at positions after patching only position {where}", run_label(report))
    return _save(fig, path)


def _zscores(tokens: pd.DataFrame, report: Report | None) -> pd.DataFrame:
    """Per-context sae_kl, z (from the report when it has them, else recomputed from the draws)."""
    many = report.many_samples if report is not None else None
    if many is not None and many.per_context:
        return pd.DataFrame([c.model_dump() for c in many.per_context]).set_index("context")
    draws = tokens[tokens["draw"] >= 0].groupby("context")["kl"].agg(["mean", "std"])
    sae = tokens[(tokens["draw"] < 0) & (tokens["intervention"] == "sae")].set_index("context")["kl"]
    frame = draws.join(sae.rename("sae_kl"), how="inner")
    frame["z"] = (frame["sae_kl"] - frame["mean"]) / frame["std"]
    return frame


def many_samples_hist(tokens: pd.DataFrame, report: Report | None, path: str | Path) -> Path:
    """For the first few contexts, the KL of N random draws with the SAE's KL marked; and all contexts' z-scores."""
    draws = tokens[tokens["draw"] >= 0]
    sample_name = report.many_samples.sample_intervention if report is not None and report.many_samples else None
    if sample_name is None and len(draws):
        sample_name = str(draws["intervention"].iloc[0])
    sae = tokens[(tokens["draw"] < 0) & (tokens["intervention"] == "sae")].groupby("context")["kl"].first()
    zs = _zscores(tokens, report)
    contexts = sorted(draws["context"].unique())[:N_CONTEXT_PANELS]
    fig = _figure((12, 6))
    grid = fig.add_gridspec(2, 3)
    by_context = dict(tuple(draws[draws["context"].isin(contexts)].groupby("context")["kl"]))
    for i, context in enumerate(contexts):
        ax = fig.add_subplot(grid[i // 2, i % 2])
        values = by_context[context].to_numpy(dtype=np.float64)
        values = values[np.isfinite(values)]
        sae_kl = float(sae.get(context, math.nan))
        log_x = _spans_decades(list(values) + [sae_kl], 1.0)
        if log_x:
            bins = _log_bins([values, np.array([sae_kl])], 40)
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
    return _save(fig, path)


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
    if isinstance(report, StudyReport) and report.over_training is not None:  # the checkpoints of an SAE
        from klgap.figures.training import over_training

        return [over_training(report, run_dir / "over_training.png")]
    if isinstance(report, StudyReport):
        paths = [kl_bars(report, run_dir / "kl_bars.png")]
        points, stars = curves_of((site_label(run), run.curve) for run in report.runs)
        if points:
            one_site = len({run.site for run in report.runs}) == 1
            where = ", ".join(site_label(run) for run in report.runs if run.curve is not None)
            paths.append(robustness_curve(points, run_dir / "robustness.png", stars,
                                          f"{report.model} · {where} · {report.mode}", ordered=one_site))
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
    return paths

"""The length-sweep figure: mean KL against the length t along the SAE's error and each baseline direction, drawn
from a report's typed ``sweep`` section (klgap.report.schema.Sweep), never from the tokens table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from klgap.figures.style import BASELINE_COLOR, SAE, legend_beside, new_figure, save, series_colors, title
from klgap.report.schema import Sweep


def _draw(ax: Any, sweep: Sweep, colors: dict[str, str], labels: dict[str, str], legend: bool) -> None:
    """Every direction's curve with its band and plateau marker, t = 1 and the threshold, on linear axes (so a
    plateau width, interpolated linearly in KL from t = 0, sits on its line)."""
    for direction in sweep.directions:
        points = [p for p in direction.points if p.kl_mean is not None]
        name = direction.direction
        shown = "error: x + t·(x̂ − x)" if name == "error" else f"{name}: {labels[name]}" if name in labels else name
        ax.plot([p.t for p in points], [p.kl_mean for p in points], marker="o", markersize=3, color=colors[name],
                label=shown if legend else None)
        band = [p for p in points if p.kl_ci_low is not None and p.kl_ci_high is not None]
        if band:
            ax.fill_between([p.t for p in band], [p.kl_ci_low for p in band], [p.kl_ci_high for p in band],
                            color=colors[name], alpha=0.18, linewidth=0)
        plateau = direction.plateau
        if plateau is not None and plateau.t is not None and sweep.threshold_kl is not None:
            ax.plot([plateau.t], [sweep.threshold_kl], marker=">" if plateau.censored else "v", markersize=9,
                    color=colors[name], markeredgecolor="black", linestyle="none")
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1, label="t = 1: the SAE's own error" if legend else None)
    if sweep.threshold_kl is not None:
        ax.axhline(sweep.threshold_kl, color="gray", linestyle=":", linewidth=1,
                   label=f"plateau threshold: {sweep.threshold_frac:g}× the SAE's KL" if legend else None)
    ax.set_xlabel("length t (units of the SAE's error ε = ‖x − x̂‖)")


def length_sweep(sweep: Sweep, path: str | Path | None, subtitle: str = "", labels: dict[str, str] | None = None):
    """Left: mean KL against t over the whole grid, one line per direction with its 95% band, t = 1 (the SAE's own
    error) dashed, the plateau threshold dotted and each plateau width marked on it (▼; ▶ where the grid censors it).
    Right: the same near t = 0, up to three times the threshold, where the plateaus are."""
    labels = labels or {}
    names = [d.direction for d in sweep.directions]
    colors = series_colors(names, ordered=False)
    colors.update({name: SAE for name in names if name == "error"})
    colors.update({name: BASELINE_COLOR for name in names if name == "epsilon_random"})
    fig = new_figure((12, 5))
    full, zoom = fig.subplots(1, 2, width_ratios=[3, 2])
    _draw(full, sweep, colors, labels, legend=False)
    _draw(zoom, sweep, colors, labels, legend=True)
    full.set_ylabel("mean KL(P_clean ‖ P_patched) [nats]")
    widths = [d.plateau.t for d in sweep.directions if d.plateau is not None and d.plateau.t is not None]
    ts = [p.t for d in sweep.directions for p in d.points]
    if widths and ts and sweep.threshold_kl:
        zoom.set_xlim(min(ts), min(max(ts), max(2.5 * max(widths), 0.2)))
        zoom.set_ylim(0, 3 * sweep.threshold_kl)
    zoom.set_title("near t = 0: the plateaus", fontsize=9)
    legend_beside(zoom)
    title(fig, "Length sweep: mean KL against the patch's length t (bands: 95% intervals over contexts; "
               "▼ plateau widths)", subtitle)
    return save(fig, path)


__all__ = ["length_sweep"]

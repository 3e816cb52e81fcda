"""Figures over several runs or a curve's points: robustness curves (with interval bands) and the ratio comparison.

Drawn from typed report pieces (klgap.report.schema.Curve, klgap.report.summary.SummaryRow), never from the tokens table;
`klgap compare`, a study's page and a run's page share them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.ticker import FixedLocator, NullFormatter

from klgap.figures.style import BASELINE_COLOR, SAE, legend_beside, new_figure, save, series_styles, title
from klgap.report.schema import BASELINE, Curve
from klgap.report.summary import SummaryRow


@dataclass(frozen=True)
class CurvePoint:
    """One point of a drawn curve: mean KL at a cosine, with its 95% context-bootstrap interval (None: unknown)."""

    cos: float
    kl: float
    low: float | None = None
    high: float | None = None


def _point(value: CurvePoint | tuple) -> CurvePoint:
    return value if isinstance(value, CurvePoint) else CurvePoint(*value)


def robustness_curve(
    points: Mapping[str, Sequence[CurvePoint | tuple]],
    path: str | Path | None,
    sae_points: Mapping[str, CurvePoint | tuple] | None = None,
    subtitle: str = "",
    ordered: bool = False,
):
    """Mean KL (log y) against cos(x, x') for each labelled curve, its 95% interval as a band; each SAE's
    (cos_mean, kl_mean) as a star with its interval. `ordered`: the curves are a progression (layers of a study) and
    take a sequential colormap; else the colour-blind-safe palette (with line styles past its colours).

    The y axis spans what is drawn (points, bands, stars and their intervals) with a margin, so no star is cut at
    an edge and no empty decades are left below the lowest point."""
    names = list(dict.fromkeys([*points, *(sae_points or {})]))
    styles = series_styles(names, ordered)
    colors = {name: style.color for name, style in styles.items()}
    fig = new_figure((10, 5))
    ax = fig.subplots()
    curves = {name: sorted((_point(p) for p in curve if _point(p).kl is not None), key=lambda p: p.cos)
              for name, curve in points.items()}
    stars = {name: _point(p) for name, p in (sae_points or {}).items()}
    # KL at cos -> 1 can fall to ~0 (a rescaled x where a norm layer hides the scale): decades below every
    # other point. Such points are drawn at the floor as ▼ so they do not squash the rest of the axis.
    floor = curve_floor({n: [(p.cos, p.kl) for p in c] for n, c in curves.items()},
                        {n: (p.cos, p.kl) for n, p in stars.items()})
    lift = (lambda v: max(v, floor)) if floor is not None else (lambda v: v)
    clipped_any = False
    for name, pairs in curves.items():
        if not pairs:
            continue
        cos = [p.cos for p in pairs]
        ax.plot(cos, [lift(p.kl) for p in pairs], markersize=3, label=name,
                **{"marker": "o", **styles[name].line()})
        band = [p for p in pairs if p.low is not None and p.high is not None]
        if len(band) == 1:  # one point: its interval as a bar (a band of one point has no width)
            point = band[0]
            ax.errorbar([point.cos], [lift(point.kl)], yerr=[[lift(point.kl) - lift(point.low)],
                                                             [lift(point.high) - lift(point.kl)]],
                        color=colors[name], linestyle="none", capsize=3)
        elif band:
            ax.fill_between([p.cos for p in band], [lift(p.low) for p in band], [lift(p.high) for p in band],
                            color=colors[name], alpha=0.18, linewidth=0)
        low = [(p.cos, floor) for p in pairs if floor is not None and p.kl < floor]
        if low:
            clipped_any = True
            ax.plot(*zip(*low, strict=True), marker="v", markersize=8, color=colors[name], linestyle="none")
    for name, star in stars.items():
        err = None
        if star.low is not None and star.high is not None:
            err = [[max(0.0, star.kl - lift(star.low))], [max(0.0, star.high - star.kl)]]
        ax.errorbar([star.cos], [star.kl], yerr=err, marker="*", markersize=16, color=colors[name],
                    markeredgecolor="black", linestyle="none", capsize=3,
                    label=f"{name}: SAE (cos {star.cos:.3f}, KL {star.kl:.3g})")
    if floor is not None:
        ax.set_yscale("log")
    ax.margins(x=0.04, y=0.08)  # autoscaled to what is drawn (near-zero KL lifted to the floor), with room for a star
    if clipped_any:
        ax.plot([], [], marker="v", color="gray", linestyle="none", label=f"▼ KL below {floor:.2g} (drawn at the floor)")
    ax.set_xlabel("cos(x, x′) of the substitute to the clean activation (cosine, no unit)")
    ax.set_ylabel("mean KL(P_clean ‖ P_patched) [nats], log scale")
    if names:
        legend_beside(ax)
    title(fig, "Robustness: mean KL of cosine-matched noise vs cosine (bands: 95% intervals over contexts; "
          "stars: the SAE)", subtitle)
    return save(fig, path)


def curve_floor(curves: Mapping[str, Sequence[tuple[float, float]]],
                sae_points: Mapping[str, tuple[float, float]] | None = None) -> float | None:
    """The lowest KL a robustness plot shows: 1/20 of the smallest positive KL away from cos = 1 (None: none)."""
    informative = [k for pairs in curves.values() for c, k in pairs if c < 0.999 and k is not None and k > 0]
    informative += [kl for _, kl in (sae_points or {}).values() if kl is not None and kl > 0]
    return min(informative) / 20 if informative else None


def curves_of(entries: Iterable[tuple[str, Curve | None]]) -> tuple[dict, dict]:
    """(label, a report's curve) pairs -> robustness_curve's points and SAE stars, one curve per norm_frac, each
    label stating its norm ('L3 (norm 0.9·‖x‖)')."""
    points: dict[str, list[CurvePoint]] = {}
    stars: dict[str, CurvePoint] = {}
    for label, curve in entries:
        if curve is None:
            continue
        fracs = sorted({p.norm_frac for p in curve.points})
        for frac in fracs:
            points[f"{label} (norm {frac:g}·‖x‖)"] = [CurvePoint(p.cos, p.kl_mean, p.kl_ci_low, p.kl_ci_high)
                                                    for p in curve.points if p.norm_frac == frac and p.kl_mean is not None]
        sae = curve.sae
        if sae is not None and sae.cos_mean is not None and sae.kl_mean is not None and fracs:
            stars[f"{label} (norm {fracs[0]:g}·‖x‖)"] = CurvePoint(sae.cos_mean, sae.kl_mean, sae.kl_ci_low, sae.kl_ci_high)
    return points, stars


def runs_title(rows: Sequence[SummaryRow]) -> str:
    """'smollm2-135m, gemma-3-270m · mlp_out L10, attn_out L17 · all_tokens' (long lists counted, not listed)."""
    models = list(dict.fromkeys(r.model for r in rows))
    where = list(dict.fromkeys(r.where for r in rows))
    modes = list(dict.fromkeys(r.mode for r in rows))
    where_text = ", ".join(where) if len(where) <= 4 else f"{len(rows)} runs at {len(where)} sites/layers"
    return f"{', '.join(models)} · {where_text} · {', '.join(modes)}"


RATIO_TICKS = (1.005, 1.01, 1.02, 1.05, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0, 8.0, 16.0)


def _ratio_ticks(reach: float, n_side: int = 4) -> list[float]:
    """Ticks of a log ratio axis spanning [e^-reach, e^reach]: 1, and on each side up to `n_side` round ratios
    (r and 1/r) at least reach/n_side apart in log, so labels never overlap."""
    kept: list[float] = []
    for tick in RATIO_TICKS:
        gap = math.log(tick) - (math.log(kept[-1]) if kept else 0.0)
        if math.log(tick) <= reach and gap >= reach / (n_side + 0.5):
            kept.append(tick)
    return sorted([1.0, *kept, *(1 / t for t in kept)])


def ratio_bars(entries: Sequence[tuple[str, SummaryRow]], path: str | Path | None, baseline: str = BASELINE):
    """KL(sae)/KL(baseline) per (label, summary row) as a point with its 95% context-bootstrap interval, on a log
    axis centred on 1 (no gap), so 1.01 and 0.99 sit as far from the line as they are."""
    labels = [label for label, _ in entries]
    num = lambda v: float(v) if v is not None else math.nan  # noqa: E731
    ratio = np.array([num(row.ratio) for _, row in entries])
    low = np.array([num(row.ratio_ci_low) for _, row in entries])
    high = np.array([num(row.ratio_ci_high) for _, row in entries])
    fig = new_figure((10, max(3.0, 0.45 * len(entries) + 1.8)))
    ax = fig.subplots()
    y = np.arange(len(entries))[::-1]  # first entry on top
    above = np.where(np.isfinite(low) & (low > 1), SAE, np.where(np.isfinite(high) & (high < 1), BASELINE_COLOR, "gray"))
    for i in range(len(entries)):
        err = [[ratio[i] - low[i]], [high[i] - ratio[i]]] if np.isfinite(low[i]) and np.isfinite(high[i]) else None
        ax.errorbar([ratio[i]], [y[i]], xerr=err, marker="o", color=above[i], capsize=4, linestyle="none")
    ax.axvline(1.0, color="black", linewidth=1, linestyle="--")
    ax.set_xscale("log")
    finite = np.concatenate([v[np.isfinite(v) & (v > 0)] for v in (ratio, low, high)])
    reach = float(np.max(np.abs(np.log(finite)))) if finite.size else math.log(2)
    reach = max(reach * 1.15, math.log(1.02))
    ax.set_xlim(math.exp(-reach), math.exp(reach))
    ax.xaxis.set_major_locator(FixedLocator(_ratio_ticks(reach)))
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:.3g}×" if v >= 1 else f"{v:.2g}×")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks(y, labels)
    ax.set_ylim(-0.7, len(entries) - 0.3)
    ax.set_xlabel(f"mean KL(sae) / mean KL({baseline}) [ratio, log scale; 1 = no gap]")
    title(fig, f"KL gap per run: KL(sae) / KL({baseline}) with 95% intervals over contexts (orange: above 1, blue: "
          "below, gray: 1 inside the interval)", runs_title([row for _, row in entries]))
    return save(fig, path)

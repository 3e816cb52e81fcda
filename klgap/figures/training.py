"""over_training.png: a study over SAE checkpoints (klgap/report/over_training.py), one row of panels per SAE, each
against the tokens seen in training: KL(sae) and KL(baseline) with 95% bands, their ratio with its band (1
marked), and the held-out explained variance and L0 of each checkpoint."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from klgap.figures.style import BASELINE_COLOR, SAE, legend_beside, new_figure, save, title
from klgap.report.over_training import TrainingCurve
from klgap.report.schema import MeanCI, RatioCI, StudyReport

NEUTRAL = "#000000"


def _num(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _band(ax, x: list[int], found: list[MeanCI] | list[RatioCI], color: str, label: str) -> None:
    """A line through the estimates with markers, and the 95% interval as a shaded band."""
    estimate = [_num(f.ratio if isinstance(f, RatioCI) else f.mean) for f in found]
    ax.fill_between(x, [_num(f.ci_low) for f in found], [_num(f.ci_high) for f in found], color=color, alpha=0.2,
                    linewidth=0)
    ax.plot(x, estimate, marker="o", markersize=3, color=color, label=label)


def _row(axes, curve: TrainingCurve) -> None:
    x = [p.tokens_seen for p in curve.points]
    where = f"{curve.site} L{curve.layer}"
    kl, ratio, ev, l0 = axes
    _band(kl, x, [p.kl_sae for p in curve.points], SAE, "sae")
    _band(kl, x, [p.kl_baseline for p in curve.points], BASELINE_COLOR, curve.baseline)
    kl.set_ylabel("mean KL [nats]")
    kl.set_title(f"{where}: KL", fontsize=9)
    _band(ratio, x, [p.kl_ratio for p in curve.points], SAE, f"sae / {curve.baseline}")
    ratio.axhline(1.0, color=NEUTRAL, linewidth=0.8, linestyle="--")
    ratio.set_ylabel(f"KL(sae) / KL({curve.baseline}) [ratio]")
    ratio.set_title(f"{where}: ratio (1 dashed)", fontsize=9)
    for axis, run, held in ((ev, "run_explained_variance", "explained_variance"), (l0, "run_l0_mean", "l0_mean")):
        axis.plot(x, [_num(getattr(p, run)) for p in curve.points], marker="o", markersize=3, color=NEUTRAL)
        axis.plot(x, [_num(getattr(p, held)) for p in curve.points], marker="o", markersize=3, color=NEUTRAL,
                  linestyle=":", alpha=0.6)
    ev.set_ylabel("explained variance [fraction]")
    ev.set_title(f"{where}: EV (study tokens; dotted: trainer's held-out)", fontsize=9)
    l0.set_ylabel("L0 [latents per token]")
    l0.set_title(f"{where}: L0 (study tokens; dotted: held-out)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("tokens seen in training [tokens]")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
    legend_beside(l0, handles=kl.get_lines(), labels=[line.get_label() for line in kl.get_lines()],
                  title="mean KL (95% bands)", title_fontsize=8)


def over_training(report: StudyReport, path: str | Path | None) -> Path | Figure:
    """One row per SAE of the study's over-training section; bands resample whole contexts."""
    curves = report.over_training or []
    fig = new_figure((18.0, 3.6 * len(curves) + 0.6))
    grid = fig.subplots(len(curves), 4, squeeze=False)
    for axes, curve in zip(grid, curves, strict=True):
        _row(axes, curve)
    where = ", ".join(f"{c.site} L{c.layer}" for c in curves)
    n_tokens = {run.n_tokens for run in report.runs}
    tokens = f"{n_tokens.pop():,} tokens per checkpoint" if len(n_tokens) == 1 else "tokens per checkpoint vary"
    title(fig, "SAE checkpoints over training: KL of the SAE and of the random baseline, their ratio, held-out "
          "explained variance and L0", f"{report.model} · {where} · {report.mode} · {tokens}")
    return save(fig, path)

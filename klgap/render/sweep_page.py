"""A run's length sweep (klgap/report/sweep.py) as page blocks and terminal lines: KL against the length t along
the SAE's error and each baseline direction, each direction's plateau width and the length at which it does the
SAE's damage."""

from __future__ import annotations

from klgap.render.blocks import Block, Heading, Para, Table
from klgap.render.formatting import DASH, fmt, fmt_ci, fmt_ci_sig, fmt_fixed
from klgap.report.schema import Report, Sweep, SweepDirection

CAPTION = ("Mean KL against the length t of the patch: x + t·(x̂ − x) along the SAE's error (t = 1, dashed, is the "
           "SAE's own reconstruction) and x + t·ε·u along each baseline's direction u; bands are 95% intervals that "
           "resample contexts; the dotted line is the plateau threshold, the markers each direction's plateau width.")


def plateau_text(direction: SweepDirection) -> str:
    """'0.412 [0.380, 0.450]'; '≥ 2.000' when the curve stays below the threshold on the whole grid."""
    plateau = direction.plateau
    if plateau is None:
        return DASH
    if plateau.censored:
        first = direction.points[0].t if direction.points else None
        side = "≤" if first is not None and plateau.t == first and len(direction.points) > 1 else "≥"
        return f"{side} {fmt_fixed(plateau.t)} (censored by the grid)"
    return fmt_ci(plateau.t, plateau.ci_low, plateau.ci_high)


def threshold_text(sweep: Sweep) -> str:
    return (f"The plateau width is the length t at which the mean KL first reaches {sweep.threshold_frac:g}× the SAE's "
            f"mean KL ({fmt(sweep.sae_kl)} nats, so the threshold is {fmt(sweep.threshold_kl)}), linear between grid "
            "points (in log KL where both are positive); its 95% interval resamples whole contexts, the threshold "
            "with them. The SAE-equivalent length is the t at which the direction does the SAE's damage.")


def sweep_blocks(report: Report) -> list[Block]:
    sweep = report.sweep
    if sweep is None:
        return []
    labels = report.baselines or {}
    rows = [[d.direction, "the SAE's error (t = 1: x̂)" if d.direction == "error" else labels.get(d.direction, DASH),
             plateau_text(d), fmt_fixed(d.sae_equivalent_t)] for d in sweep.directions]
    ts = sorted({p.t for d in sweep.directions for p in d.points})
    grid = [[f"{t:g}", *(next((fmt_ci_sig(p.kl_mean, p.kl_ci_low, p.kl_ci_high) for p in d.points if p.t == t), DASH)
                         for d in sweep.directions)] for t in ts]
    return [Heading(2, "Length sweep"), Para(threshold_text(sweep)),
            Table(["direction", "what it is", "plateau width t [95% CI]", "SAE-equivalent length t"], rows),
            Para("Mean KL (nats) at each length t, with 95% intervals over contexts:"),
            Table(["t", *(d.direction for d in sweep.directions)], grid)]


def sweep_lines(report: Report) -> list[str]:
    """The terminal's lines: per direction its plateau width and SAE-equivalent length."""
    sweep = report.sweep
    if sweep is None:
        return []
    head = (f"length sweep: plateau = t where KL reaches {sweep.threshold_frac:g}× the SAE's KL "
            f"({fmt(sweep.threshold_kl)} nats)")
    return [head, *[f"  along {d.direction:<26} plateau {plateau_text(d)}, SAE-equivalent length "
                    f"{fmt_fixed(d.sae_equivalent_t)}" for d in sweep.directions]]


__all__ = ["CAPTION", "plateau_text", "sweep_blocks", "sweep_lines", "threshold_text"]

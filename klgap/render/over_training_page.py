"""The over-training section of a study over an SAE's checkpoints (klgap/report/over_training.py) as page blocks."""

from __future__ import annotations

from klgap.render.blocks import Block, Bullets, Heading, Para, Table
from klgap.render.formatting import fmt, fmt_ci, fmt_fixed
from klgap.report.schema import BASELINE, StudyReport


def training_blocks(report: StudyReport) -> list[Block]:
    """The section as page blocks: each SAE's finding first, then a row per checkpoint."""
    curves = report.over_training or []
    blocks: list[Block] = [Bullets([c.finding for c in curves], lead=True), Heading(2, "Over training"),
                    Para(f"Every checkpoint measured on the same tokens with the same random draws (the clean forward "
                         f"shared). KL is the mean per-token KL(P_clean ‖ P_patched) in nats; gap = KL(sae) − "
                         f"KL({BASELINE}); intervals (95%) resample whole contexts. EV and L0 are measured on the "
                         "study's tokens, the same as the KLs; EV held-out and L0 held-out are the trainer's, on its "
                         "held-out tokens (training.json).")]
    for curve in curves:
        rows = [[str(p.step), f"{p.tokens_seen:,}", fmt(p.run_explained_variance), fmt(p.run_l0_mean),
                 fmt(p.explained_variance), fmt(p.l0_mean),
                 fmt_ci(p.kl_sae.mean, p.kl_sae.ci_low, p.kl_sae.ci_high),
                 fmt_ci(p.kl_baseline.mean, p.kl_baseline.ci_low, p.kl_baseline.ci_high),
                 fmt_ci(p.kl_gap.mean, p.kl_gap.ci_low, p.kl_gap.ci_high),
                 fmt_ci(p.kl_ratio.ratio, p.kl_ratio.ci_low, p.kl_ratio.ci_high), p.path] for p in curve.points]
        blocks += [Heading(3, f"{curve.site} L{curve.layer} ({curve.hook_name})"),
                   Table(["step", "tokens seen", "EV", "L0", "EV held-out", "L0 held-out", "KL sae", f"KL {curve.baseline}", "gap", "ratio",
                          "folder"], rows)]
    return blocks


def console_lines(report: StudyReport) -> list[str]:
    """Each SAE's ratio at every checkpoint, and its finding."""
    lines = []
    for curve in report.over_training or []:
        lines.append(f"{curve.site} L{curve.layer} over training: "
                     + ", ".join(f"step {p.step} {fmt_fixed(p.kl_ratio.ratio)}" for p in curve.points))
        lines.append(curve.finding)
    return lines


__all__ = ["console_lines", "training_blocks"]

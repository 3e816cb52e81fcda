"""The between-SAE section of a study over several SAEs of one site (klgap/report/between_saes.py) as page blocks
and console lines."""

from __future__ import annotations

from klgap.render.blocks import Block, Bullets, Heading, Para, Table
from klgap.render.formatting import fmt, fmt_ci, fmt_fixed
from klgap.report.schema import StudyReport


def blocks(report: StudyReport) -> list[Block]:
    """Each group's finding first, then a row per SAE."""
    groups = report.between_saes or []
    out: list[Block] = [Bullets([g.finding for g in groups], lead=True), Heading(2, "Between SAEs"),
                        Para("SAEs measured at one site on the same tokens with the same random draws (the clean "
                             "forward shared). Seeds of one recipe (training.json files equal but for the seed): the "
                             "recipe's ratio is the mean of the seeds' ratios, its 95% interval resamples seeds and "
                             "whole contexts together (the same contexts for every seed drawn); the seed's share is "
                             "the part of that estimate's bootstrap variance that resampling seeds alone gives, "
                             "against resampling contexts alone. Each SAE's own interval resamples contexts only. "
                             "With few seeds the interval over seeds is itself rough (3 seeds: 10 distinct draws).")]
    for g in groups:
        rows = [[s.path, str(s.seed) if s.seed is not None else "—", s.architecture, fmt(s.explained_variance),
                 fmt(s.l0_mean), fmt_ci(s.kl_ratio.ratio, s.kl_ratio.ci_low, s.kl_ratio.ci_high)] for s in g.saes]
        title = f"{g.site} L{g.layer} ({g.hook_name}): {len(g.saes)} SAEs, differing in {', '.join(g.differ_in)}"
        out += [Heading(3, title), Table(["folder", "seed", "architecture", "EV", "L0", f"ratio to {g.baseline}"],
                                         rows)]
        if g.kl_ratio is not None:
            share = "—" if g.sae_variance_share is None else f"{fmt_fixed(100 * g.sae_variance_share, 0)}%"
            out.append(Table(["recipe ratio (seeds and contexts)", "range", "seed's share of variance"],
                             [[fmt_ci(g.kl_ratio.ratio, g.kl_ratio.ci_low, g.kl_ratio.ci_high),
                               f"{fmt_fixed(g.ratio_min)}–{fmt_fixed(g.ratio_max)}", share]]))
    return out


def console_lines(report: StudyReport) -> list[str]:
    """Each group's finding (the headline across seeds, each seed's ratio, the range and the seed's share)."""
    return [g.finding for g in report.between_saes or []]


__all__ = ["blocks", "console_lines"]

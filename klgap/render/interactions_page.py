"""The report's "Interactions" section of a joint run (klgap/report/interactions.py computes it): the joint KL as the
sum of each site's effect alone and the interaction terms of every pair, triple, ... of its sites."""

from __future__ import annotations

from klgap.render.blocks import Block, Heading, Para, Table
from klgap.render.formatting import fmt, fmt_ci_sig
from klgap.report.interactions import Interactions
from klgap.report.schema import Report


def interaction_table(found: Interactions) -> tuple[list[str], list[list[str]]]:
    """A row per subset of the sites (its order, then per intervention its term [95% CI]), and the joint KL."""
    names = list(found.joint_kl_mean)
    header = ["sites", "order", *(f"{name} [95% CI]" for name in names)]
    rows = [[" + ".join(term.sites), str(term.order),
             *(fmt_ci_sig(d.estimate, d.ci_low, d.ci_high) for d in (term.terms[name] for name in names))]
            for term in found.terms]
    rows.append(["joint KL (the sum of every term)", "", *(fmt(found.joint_kl_mean[name]) for name in names)])
    return header, rows


def interactions_blocks(report: Report) -> list[Block]:
    found = report.interactions
    if found is None:
        return []
    return [Heading(2, "Interactions"),
            Para("The joint KL decomposed over the subsets of the sites (Möbius inversion): order 1 is a site's KL "
                 "alone, order 2 what patching a pair together adds beyond the two alone (f(a+b) − f(a) − f(b)), "
                 "order 3 what a triple adds beyond its pairs and sites, and so on; the terms sum to the joint KL. "
                 "Intervals resample whole contexts (every run measured the same tokens). Figure: "
                 "interactions.png."),
            Table(*interaction_table(found))]


def console_lines(report: Report) -> list[str]:
    found = report.interactions
    header, rows = interaction_table(found)
    return ["interaction terms of the joint KL (Möbius over the subsets of the sites):",
            *("  " + " | ".join(row) for row in [header, *rows])]


__all__ = ["console_lines", "interaction_table", "interactions_blocks"]

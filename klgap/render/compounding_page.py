"""The report's "Compounding" section of a joint run (klgap/report/compounding.py computes it): the sites alone, the
joint KL ratio against the largest single-site one, joint KL against the sum per intervention and, with
``--joint-subsets``, one row per subset of the sites patched together."""

from __future__ import annotations

from klgap.render.blocks import Block, Bullets, Heading, Para, Table
from klgap.render.formatting import DASH, fmt, fmt_ci, fmt_fixed, fmt_p
from klgap.report.compounding import Compounding
from klgap.report.schema import BASELINE, RatioCI, Report


def _ci(ratio: RatioCI) -> str:
    return fmt_ci(ratio.ratio, ratio.ci_low, ratio.ci_high)


def compounding_blocks(report: Report) -> list[Block]:
    """A joint run: every site patched together against each alone (klgap/report/compounding.py)."""
    found = report.compounding
    if found is None:
        return []
    sites = [[site.hook_name, _ci(site.kl_ratio) if site.kl_ratio else DASH,
              *(fmt(site.kl_mean.get(name)) for name in found.additivity), site.path] for site in found.sites]
    blocks: list[Block] = [
        Heading(2, "Compounding"),
        Para("Every site patched in the same forward (joint) against each site patched alone, on the same tokens; "
             "intervals are bootstraps over whole contexts, tests pair per-context means."),
        Table(["site alone", f"KL ratio sae/{BASELINE} [95% CI]", *(f"KL {n}" for n in found.additivity), "folder"],
              sites),
    ]
    if found.joint_kl_ratio is not None:
        bullets = [f"joint KL ratio sae/{BASELINE}: {_ci(found.joint_kl_ratio)}"]
        diff = found.joint_minus_max_single_ratio
        if diff is not None:
            bullets.append(f"joint ratio − largest single-site ratio ({found.max_single}, "
                           f"{fmt_fixed(found.max_single_kl_ratio)}): {fmt_ci(diff.estimate, diff.ci_low, diff.ci_high)}, "
                           f"one-sided p = {fmt_p(diff.p_value)}")
        blocks.append(Bullets(bullets))
    rows = [[name, fmt(a.joint_kl_mean), fmt(a.sum_single_kl_mean), _ci(a.joint_over_sum),
             fmt_p(a.wilcoxon_joint_vs_sum.p_value), fmt(a.joint_ce_delta_mean), fmt(a.sum_single_ce_delta_mean),
             a.verdict] for name, a in found.additivity.items()]
    blocks.append(Table(["intervention", "joint KL", "Σ KL alone", "joint/Σ [95% CI]", "Wilcoxon p",
                         "joint ΔCE", "Σ ΔCE alone", "verdict"], rows))
    if found.patch_sizes:
        blocks += [Para(f"Patch sizes in the joint forward, per site (means over the measured tokens; x the activation "
                        f"that forward gives the site, x' its replacement). Baselines sized by: "
                        f"{found.joint_baseline} ({BASELINE_MODES.get(found.joint_baseline or '', '')})."),
                   Table(*patch_size_table(found))]
    if found.subsets:
        blocks += [Para("Every subset of two or more sites, patched together in the same pass (`--joint-subsets`; "
                        "each folder holds its own report), and all of them:"),
                   Table(*subset_table(found))]
    return blocks


#: what each --joint-baseline means, for the page
BASELINE_MODES = {
    "matched": "each site's ε is the joint SAE run's at that site, token by token",
    "clean": "each site's ε is the SAE's error on the clean activation, as the site alone",
    "reencoded": "each site's ε is the SAE's error on the activation the baseline's own forward gives the site",
}


def patch_size_table(found: Compounding) -> tuple[list[str], list[list[str]]]:
    """One row per site: mean ε = ‖x − x'‖ per intervention side by side, then the SAE's ‖x‖, cos and L0."""
    names = list(found.additivity)
    header = ["site", *(f"ε {name}" for name in names), "‖x‖ sae", "cos(x, x') sae", "L0 sae"]
    rows = [[size.hook_name, *(fmt(size.eps_mean[name]) for name in names), fmt(size.x_norm_mean.get("sae")),
             fmt(size.cos_mean.get("sae")), fmt(size.l0_mean.get("sae"))] for size in found.patch_sizes or []]
    return header, rows


def subset_table(found: Compounding) -> tuple[list[str], list[list[str]]]:
    """A joint run's subsets and the run itself, a row each: the joint KL ratio, the largest ratio alone, their
    difference (one-sided p, and Holm over the table's rows) and, per intervention, joint KL / Σ alone."""
    names = list(found.additivity)
    header = ["sites patched together", f"joint KL ratio sae/{BASELINE} [95% CI]", "largest alone",
              "joint − largest alone [95% CI]", "p", "p Holm (this table)",
              *(f"joint/Σ {name} [95% CI]" for name in names)]
    every = [site.hook_name for site in found.sites]
    table = [*((s.sites, s.compounding) for s in found.subsets or []), (every, found)]
    holm = found.subsets_p_holm if found.subsets_p_holm is not None else [None] * len(table)
    rows = []
    for (sites, part), p_holm in zip(table, holm, strict=True):
        diff = part.joint_minus_max_single_ratio
        rows.append([" + ".join(sites), _ci(part.joint_kl_ratio) if part.joint_kl_ratio else DASH,
                     fmt_fixed(part.max_single_kl_ratio),
                     fmt_ci(diff.estimate, diff.ci_low, diff.ci_high) if diff else DASH,
                     fmt_p(diff.p_value) if diff else DASH, fmt_p(p_holm) if p_holm is not None else DASH,
                     *(_ci(part.additivity[name].joint_over_sum) for name in names)])
    return header, rows



def console_lines(report: Report) -> list[str]:
    """A joint run: the ratio with every site patched against each site alone, and joint KL against the sum."""
    found = report.compounding
    lines: list[str] = []
    joint = found.joint_kl_ratio
    if joint is not None:
        lines.append(f"joint KL(sae)/KL(epsilon_random) = {fmt_fixed(joint.ratio)}  95% CI [{fmt_fixed(joint.ci_low)}, "
                     f"{fmt_fixed(joint.ci_high)}]; alone: " + ", ".join(
                         f"{site.hook_name} {fmt_fixed(site.kl_ratio.ratio if site.kl_ratio else None)}"
                         for site in found.sites))
    difference = found.joint_minus_max_single_ratio
    if difference is not None:
        lines.append(f"joint ratio − largest single-site ratio ({found.max_single}) = {fmt_fixed(difference.estimate)}  "
                     f"95% CI [{fmt_fixed(difference.ci_low)}, {fmt_fixed(difference.ci_high)}], one-sided p = "
                     f"{fmt_p(difference.p_value)}")
    lines.append(f"{'intervention':<40} {'joint KL':>10} {'Σ alone':>10} {'joint/Σ [95% CI]':>26}  verdict")
    for name, row in found.additivity.items():
        ratio = row.joint_over_sum
        interval = f"{fmt_fixed(ratio.ratio)} [{fmt_fixed(ratio.ci_low)}, {fmt_fixed(ratio.ci_high)}]"
        lines.append(f"{name:<40} {fmt(row.joint_kl_mean):>10} {fmt(row.sum_single_kl_mean):>10} {interval:>26}  "
                     f"{row.verdict}")
    if found.patch_sizes:
        header, rows = patch_size_table(found)
        lines.append(f"patch sizes per site (baselines sized by: {found.joint_baseline}):")
        for row in [header, *rows]:
            lines.append("  " + " | ".join(row))
    if found.subsets:
        header, rows = subset_table(found)
        lines.append("every subset of the sites patched together (--joint-subsets), and all of them:")
        for row in [header, *rows]:
            lines.append("  " + " | ".join(row))
    return lines


__all__ = ["BASELINE_MODES", "compounding_blocks", "console_lines", "patch_size_table", "subset_table"]

"""What the terminal shows after a run or a study: the per-intervention table, the summary row, where the
files went. Reads the typed report only (klgap.report.schema); numbers go through klgap.render.formatting."""

from __future__ import annotations

from pathlib import Path

from klgap.render.formatting import fmt, fmt_fixed, fmt_p
from klgap.render.panel_page import panel_lines
from klgap.render.sweep_page import sweep_lines
from klgap.report.panel import opening_sentence
from klgap.report.schema import Report, StudyReport
from klgap.report.summary import summary_row, summary_rows


def print_study(study: StudyReport, out: Path) -> None:
    """One line per site/layer: KL of the SAE and the baseline, the ratio with its interval, Holm's p."""
    rows = summary_rows(study)
    print(f"{study.model} study, mode {study.mode}: {len(rows)} sites/layers")
    print(f"{'site':<12} {'layer':>5} {'KL sae':>10} {'KL eps':>10} {'ratio [95% CI]':>24} {'p (Holm)':>10}")
    families = sorted({row.holm_family for row in rows if row.holm_family is not None})
    for row in rows:
        print(f"{row.site:<12} {row.layer:>5} {fmt(row.kl_sae):>10} {fmt(row.kl_baseline):>10} "
              f"{row.ratio_text():>24} {fmt_p(row.p_holm):>10}")
    for family in families:
        print(f"Holm family: {family}")
    for run in study.runs:  # against every baseline measured, when there are several (klgap/report/panel.py)
        sentence = opening_sentence(run, study.model, study.mode)
        if sentence != summary_row(run, study.model, study.mode).verdict():
            print(sentence)
    for curve in study.over_training or []:  # a study over SAE checkpoints
        print(f"{curve.site} L{curve.layer} over training: "
              + ", ".join(f"step {p.step} {fmt_fixed(p.kl_ratio.ratio)}" for p in curve.points))
        print(curve.finding)
    print(f"wrote {out / 'report.json'} (and one folder per site/layer)")


def print_summary(report: Report, out: Path, pages: bool = True) -> None:
    """The run's notes, what was measured, each intervention's KL and ΔCE, the ratio to the baseline.
    `pages`: report.md, report.html and the figures were written too (the last line lists only what was)."""
    for note in report.notes:
        print(f"note: {note}")
    where = report.hook_name if report.joint is None else "joint " + " + ".join(s.hook_name for s in report.joint)
    sae = report.sae.source if report.joint is None else f"{len(report.joint)} SAEs"
    print(f"{report.model} {where}  SAE {sae}  mode {report.mode}  "
          f"{report.n_tokens} tokens in {report.n_contexts} contexts")
    print(f"{'intervention':<40} {'KL mean':>10} {'KL median':>10} {'ΔCE mean':>10}")
    for name, row in report.interventions.items():
        print(f"{name:<40} {fmt(row.kl_mean):>10} {fmt(row.kl_median):>10} {fmt(row.ce_delta_mean):>10}")
    summary = summary_row(report, report.model, report.mode)
    # the ratio, its interval, the Wilcoxon p (Holm-corrected where its family is larger); against every baseline
    # measured when there are several (klgap/report/panel.py), a line per baseline and per ε/‖x‖ bin after it
    print(opening_sentence(report, report.model, report.mode))
    for line in panel_lines(report) + sweep_lines(report):
        print(line)
    if summary.holm_family is not None:
        print(f"Holm family: {summary.holm_family} ({summary.holm_family_size} test"
              f"{'s' * (summary.holm_family_size != 1)})")
    curve = report.curve
    if curve is not None and curve.sae is not None:
        for frac, cos in curve.sae_equivalent_cos.items():
            where = f"cos {fmt_fixed(cos)}" if cos is not None else "no cosine on the grid"
            print(f"robustness curve (norm {frac}·‖x‖): the SAE (cos {fmt_fixed(curve.sae.cos_mean)}, "
                  f"KL {fmt(curve.sae.kl_mean)}) does the damage of cosine-matched noise at {where}")
    if report.many_samples is not None:
        many = report.many_samples
        print(f"many samples: mean z of the SAE's KL = {fmt_fixed(many.z_mean)}, "
              f"fraction z > 2 = {fmt_fixed(many.frac_z_above_2)}")
    if pages:
        print(f"wrote {out / 'report.json'}, {out / 'tokens.parquet'}, report.md, report.html and figures")
    else:
        print(f"wrote {out / 'report.json'} and {out / 'tokens.parquet'}")


def print_compounding(report: Report) -> None:
    """A joint run: the ratio with every site patched against each site alone, and joint KL against the sum."""
    found = report.compounding
    if found is None:
        return
    joint = found.joint_kl_ratio
    if joint is not None:
        print(f"joint KL(sae)/KL(epsilon_random) = {fmt_fixed(joint.ratio)}  95% CI [{fmt_fixed(joint.ci_low)}, "
              f"{fmt_fixed(joint.ci_high)}]; alone: " + ", ".join(
                  f"{site.hook_name} {fmt_fixed(site.kl_ratio.ratio if site.kl_ratio else None)}" for site in found.sites))
    difference = found.joint_minus_max_single_ratio
    if difference is not None:
        print(f"joint ratio − largest single-site ratio ({found.max_single}) = {fmt_fixed(difference.estimate)}  "
              f"95% CI [{fmt_fixed(difference.ci_low)}, {fmt_fixed(difference.ci_high)}], one-sided p = "
              f"{fmt_p(difference.p_value)}")
    print(f"{'intervention':<40} {'joint KL':>10} {'Σ alone':>10} {'joint/Σ [95% CI]':>26}  verdict")
    for name, row in found.additivity.items():
        ratio = row.joint_over_sum
        interval = f"{fmt_fixed(ratio.ratio)} [{fmt_fixed(ratio.ci_low)}, {fmt_fixed(ratio.ci_high)}]"
        print(f"{name:<40} {fmt(row.joint_kl_mean):>10} {fmt(row.sum_single_kl_mean):>10} {interval:>26}  {row.verdict}")
    if found.subsets:
        from klgap.render.compounding_page import subset_table

        header, rows = subset_table(found)
        print("every subset of the sites patched together (--joint-subsets), and all of them:")
        for row in [header, *rows]:
            print("  " + " | ".join(row))

"""What the terminal shows after a run or a study: the per-intervention table, the summary row, each section's
lines, where the files went. Reads the typed report only (klgap.report.schema); numbers go through
klgap.render.formatting."""

from __future__ import annotations

from pathlib import Path

from klgap.render.formatting import fmt, fmt_fixed, fmt_p
from klgap.render.panel_page import panel_lines
from klgap.render.sweep_page import sweep_lines
from klgap.report.findings import curve_findings
from klgap.report.panel import opening_sentence
from klgap.report.schema import Report, StudyReport
from klgap.report.summary import precision_sentence, summary_row, summary_rows


def print_sections(report: Report | StudyReport) -> None:
    """The console lines of each section the report holds (klgap/report/sections.py), in registration order."""
    from klgap.report.sections import present

    for _, section, _ in present(report):
        for line in section.console(report) if section.console is not None else []:
            print(line)


def print_study(study: StudyReport, out: Path) -> None:
    """One line per site/layer: KL of the SAE and the baseline, the ratio with its interval, Holm's p."""
    rows = summary_rows(study)
    where = [(run.site, run.layer) for run in study.runs]
    several = len(set(where)) < len(where)  # several SAEs at one site (seeds, checkpoints): their folders say which
    print(f"{study.model} study, mode {study.mode}: {len(rows)} {'runs' if several else 'sites/layers'}")
    print(f"{'site':<12} {'layer':>5} {'KL sae':>10} {'KL eps':>10} {'ratio [95% CI]':>24} {'p (Holm)':>10}"
          + ("  folder" if several else ""))
    families = sorted({row.holm_family for row in rows if row.holm_family is not None})
    for row, run in zip(rows, study.runs, strict=True):
        print(f"{row.site:<12} {row.layer:>5} {fmt(row.kl_sae):>10} {fmt(row.kl_baseline):>10} "
              f"{row.ratio_text():>24} {fmt_p(row.p_holm):>10}" + (f"  {run.path}" if several else ""))
    for family in families:
        print(f"Holm family: {family}")
    for run in study.runs:  # against every baseline measured, when there are several (klgap/report/panel.py)
        sentence = opening_sentence(run, study.model, study.mode)
        if sentence != summary_row(run, study.model, study.mode).verdict():
            print(sentence)
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
    if report.precision is not None:
        print(precision_sentence(report.precision))
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
    for finding in curve_findings(report.curve, report.hook_name):  # the robustness curve's, as the page opens
        print(finding)
    if report.many_samples is not None:
        many = report.many_samples
        print(f"many samples: mean z of the SAE's KL = {fmt_fixed(many.z_mean)}, "
              f"fraction z > 2 = {fmt_fixed(many.frac_z_above_2)}")
    if pages:
        print(f"wrote {out / 'report.json'}, {out / 'tokens.parquet'}, report.md, report.html and figures")
    else:
        print(f"wrote {out / 'report.json'} and {out / 'tokens.parquet'}")

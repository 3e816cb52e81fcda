"""How each kind of page opens: with its own finding, in one set-off block (the key table comes next).

A run whose measured tokens overlap its SAE's training tokens opens with a warning saying so. A run: the SAE against
the baseline (klgap.report.summary.SummaryRow.verdict), with the SAE's explained variance and L0 and any quality
note (klgap/report/quality.py). A curve run: first where noise
does the SAE's damage on its robustness curve (klgap.report.findings.curve_findings), then that verdict. A study:
the same per site/layer. A joint run: the SAEs patched together against each alone
(klgap.report.findings.compounding_finding). A study over SAE checkpoints opens with its over-training section instead (a
section with ``lead=True``: klgap/render/over_training_page.py). `klgap compare` opens with klgap.report.findings.compare_finding.
"""

from __future__ import annotations

from klgap.render.blocks import Block, Bullets, Para
from klgap.report.findings import compounding_finding, curve_findings
from klgap.report.schema import Report, StudyReport
from klgap.report.sections import present
from klgap.report.panel import opening_sentence
from klgap.report.quality import notes_text


def finding_sentences(report: Report | StudyReport) -> list[str]:
    """The page's finding, a sentence per site/layer (curve findings first where there is a curve)."""
    held = {key: value for key, _, value in present(report)}  # the report's sections (klgap/report/sections.py)
    if "compounding" in held:  # a joint run: its sites' quality notes after the finding (klgap/report/quality.py)
        notes = notes_text(report.quality_notes) if isinstance(report, Report) else ""
        return [compounding_finding(held["compounding"], report.model) + notes]
    runs = list(report.runs) if isinstance(report, StudyReport) else [report]
    curves = [s for run in runs for s in curve_findings(run.curve, run.hook_name)]
    # against every baseline the run measured, when its plugins say which (klgap/report/panel.py)
    return curves + [opening_sentence(run, report.model, report.mode) for run in runs]


def overlap_warnings(report: Report | StudyReport) -> list[str]:
    """A warning per run whose measured tokens overlap its SAE's training tokens (klgap/job/disjoint.py)."""
    runs = list(report.runs) if isinstance(report, StudyReport) else [report]
    return list(dict.fromkeys(f"Warning: {run.held_out.why}" for run in runs
                              if run.held_out is not None and run.held_out.status == "overlap"))


def lead_blocks(report: Report | StudyReport) -> list[Block]:
    """The finding first: one set-off paragraph, or bullets when there are several sentences; before it, a
    warning when the SAE was measured on tokens it was trained on."""
    sentences = finding_sentences(report)
    warnings = [Para(text, lead=True) for text in overlap_warnings(report)]
    return warnings + ([Para(sentences[0], lead=True)] if len(sentences) == 1 else [Bullets(sentences, lead=True)])

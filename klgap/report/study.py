"""A study's report: several sites, layers, SAEs or checkpoints of one command, each measured into its own folder
(klgap/job/plan.py), summarised from their report.json files and parts alone (no model).

``OUT/report.json`` holds every run's summary, Wilcoxon p-values Holm-corrected within each family
(klgap.report.holm: the SAE against one baseline across the study's runs; curve points apart), and the Spearman
correlation of the per-token gap between every pair of runs (the same tokens are measured everywhere: same dataset,
seed and context length); a study over an SAE's checkpoints gets its over-training section.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from klgap.job.folder import RunDir, atomic_write_json
from klgap.plan.config import RunConfig
from klgap.report import stats
from klgap.report.aggregate import token_gaps
from klgap.report.holm import apply_holm
from klgap.report.numbers import finite
from klgap.report.provenance import provenance
from klgap.report.read import load_report
from klgap.report.schema import BASELINE, SCHEMA_VERSION, Report, RunPairCorrelation, SiteSummary, StudyReport, as_json
from klgap.report.sections import StudyFiles, build_study_sections, report_model, site_sections


def write_study(base: RunConfig, folders: list[Path], out: Path, shape: str = "study") -> StudyReport:
    """Build OUT/report.json of a study from its sub-runs' report.json files (no model needed)."""
    study = build_study(base, [load_report(folder) for folder in folders], folders, out, shape)  # type: ignore[misc]
    atomic_write_json(out / "report.json", as_json(study))
    return study


def build_study(base: RunConfig, reports: list[Report], folders: list[Path], out: Path,
                shape: str = "study") -> StudyReport:
    """The study report over its sub-runs' reports: their summaries (with their site-level sections), Holm within
    each family across the study's runs (klgap.report.holm), the gap correlations between runs, and each
    study-level section (klgap/report/sections.py: a study over checkpoints, `shape`, gets its over-training
    section). The sub-reports are left unchanged."""
    row = report_model("study_run")
    runs = [row(**{k: getattr(report, k) for k in report.model_fields_set & set(SiteSummary.model_fields)},
                **site_sections(report), path=str(folder.relative_to(out))).model_copy(deep=True)
            for report, folder in zip(reports, folders, strict=True)]
    apply_holm([run.comparisons for run in runs])
    extra = build_study_sections(StudyFiles(base, shape, runs, folders, out))
    return report_model("study")(
        schema_version=SCHEMA_VERSION,
        kind="study",
        model=reports[0].model,
        mode=reports[0].mode,
        runs=runs,
        gap_correlation_between_runs=gap_correlations_between(folders, [run.path for run in runs]),
        config={**base.to_dict(), "layer": [run.layer for run in runs], "site": [run.site for run in runs]},
        provenance=provenance(),
        **extra,
    )


def gap_correlations_between(folders: list[Path], labels: list[str]) -> list[RunPairCorrelation]:
    """Spearman ρ of the per-token gap KL(sae) − KL(baseline) between every pair of sub-runs, read a part at a
    time from each sub-run's parts (klgap.report.aggregate.token_gaps), paired on (context, position)."""
    gaps = {}
    for folder, label in zip(folders, labels, strict=True):
        gap = token_gaps(RunDir(folder).finished_parts()[0], BASELINE)
        if gap is not None:
            gaps[label] = gap
    out = []
    names = list(gaps)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pair = pd.concat([gaps[a].rename("a"), gaps[b].rename("b")], axis=1, join="inner").dropna()
            if len(pair) < 3:
                continue
            found = stats.spearman(pair["a"].to_numpy(), pair["b"].to_numpy())
            out.append(RunPairCorrelation(a=a, b=b, rho=finite(float(found["rho"])),
                                          p_value=finite(float(found["p_value"])), n=int(found["n"])))
    return out


__all__ = ["build_study", "gap_correlations_between", "write_study"]

"""klgap's own report sections, registered as any plugin's are (``register_report_sections``): the error
decomposition (a site's: klgap/report/decomposition.py), a joint run's compounding (klgap/report/compounding.py)
and interactions (klgap/report/interactions.py), and a study over an SAE's checkpoints' over-training section (klgap/report/over_training.py). The plugin manager
registers this module itself (klgap.plugins.manager.CORE_PLUGINS), so no entry point can leave them out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from klgap.figures.interactions import interaction_matrix
from klgap.figures.training import over_training as over_training_figure
from klgap.hookspecs import hookimpl
from klgap.render import compounding_page, decomposition_page, interactions_page, over_training_page
from klgap.report import compounding, decomposition, interactions, over_training
from klgap.report.aggregate import context_sums
from klgap.report.schema import BASELINE
from klgap.report.sections import ReportSection, RunFiles, StudyFiles


def _decomposition(files: RunFiles) -> decomposition.ErrorDecomposition | None:
    """When the run measured one of the decomposition's interventions (a single site: a joint run has none)."""
    record = files.record
    if not set(decomposition.INTERVENTIONS) & set(record.names) or record.joint is not None:
        return None
    return decomposition.error_decomposition(files.paths, files.sides, record.names, context_sums(files.paths),
                                             record.seed, record.execution.get("fitted", {}),
                                             record.config.get("fit_tokens"))


def _compounding(files: RunFiles) -> compounding.Compounding | None:
    """A joint run's: its sites alone (their reports are built before this one) and its subsets."""
    if files.record.joint is None:
        return None
    return compounding.compounding(files.record, files.rundir, files.stats.interventions)


def _interactions(files: RunFiles) -> interactions.Interactions | None:
    """A joint run whose every subset of sites was measured (--joint-subsets, or two sites)."""
    if files.record.joint is None:
        return None
    return interactions.interactions(files.record, files.rundir)


def _interaction_figures(report: Any, folder: Path) -> list[Path]:
    label = f"{report.model} · {report.mode} · {len(report.interactions.sites)} sites"
    return [interaction_matrix(report.interactions, label, folder / "interactions.png")]


INTERACTIONS_CAPTION = ("The joint KL's interaction terms: each site's KL alone on the diagonal (grey), the pairwise "
                        "interaction f(a+b) − f(a) − f(b) off it, per intervention on one colour scale centred at 0 "
                        "(* the term's 95% interval, resampling whole contexts, excludes 0).")


def _over_training(files: StudyFiles) -> list[over_training.TrainingCurve] | None:
    """A study over an SAE's checkpoints."""
    if files.shape != "checkpoints":
        return None
    return over_training.over_training(files.runs, files.folders, files.config.seed)


def _over_training_figures(report: Any, folder: Path) -> list[Path]:
    return [over_training_figure(report, folder / "over_training.png")]


OVER_TRAINING_CAPTION = ("Each SAE checkpoint against the tokens it had seen in training: mean KL of the SAE and of "
                         f"{BASELINE} and their ratio (bands: 95% intervals resampling whole contexts; 1 dashed), and "
                         "the checkpoint's held-out explained variance and L0.")


@hookimpl
def register_report_sections(register: Any) -> None:
    register("error_decomposition", ReportSection(
        decomposition.ErrorDecomposition, "site", _decomposition, blocks=decomposition_page.blocks),
        "where the KL gap lies: the linear or the nonlinear part of the SAE's error")
    register("compounding", ReportSection(
        compounding.Compounding, "run", _compounding, blocks=compounding_page.compounding_blocks,
        console=compounding_page.console_lines),
        "a joint run's sites patched together against each alone")
    register("interactions", ReportSection(
        interactions.Interactions, "run", _interactions, blocks=interactions_page.interactions_blocks,
        figures=_interaction_figures, captions={"interactions": INTERACTIONS_CAPTION},
        console=interactions_page.console_lines),
        "a joint run's KL as each site's effect alone plus the interaction terms of every subset of its sites")
    register("over_training", ReportSection(
        list[over_training.TrainingCurve], "study", _over_training, blocks=over_training_page.training_blocks,
        figures=_over_training_figures, captions={"over_training": OVER_TRAINING_CAPTION},
        console=over_training_page.console_lines, lead=True),
        "a study over an SAE's checkpoints: the KL gap along training")

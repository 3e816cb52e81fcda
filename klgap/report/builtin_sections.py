"""klgap's own report sections, registered as any plugin's are (``register_report_sections``): the error
decomposition (a site's: klgap/report/decomposition.py), --second-order's predicted KL and Fisher sensitivity (a
site's: klgap/report/second_order.py), a joint run's compounding (klgap/report/compounding.py) and
interactions (klgap/report/interactions.py), a study over an
SAE's checkpoints' over-training section (klgap/report/over_training.py) and a study over seeds of one recipe's
between-SAE section (klgap/report/between_saes.py). The plugin manager
registers this module itself (klgap.plugins.manager.CORE_PLUGINS), so no entry point can leave them out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from klgap.figures.interactions import interaction_matrix
from klgap.figures.training import over_training as over_training_figure
from klgap.hookspecs import hookimpl
from klgap.render import (between_saes_page, compounding_page, decomposition_page, interactions_page,
                          over_training_page, second_order_page)
from klgap.report import between_saes, compounding, decomposition, interactions, over_training, second_order
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


def _second_order(files: RunFiles) -> second_order.SecondOrder | None:
    """When the run was measured with --second-order (its parts hold kl_second_order and the fisher side sums)."""
    if not files.record.config.get("second_order"):
        return None
    return second_order.second_order(files.paths, files.sides, files.record.names, files.record.seed)


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


def _between_saes(files: StudyFiles) -> list[between_saes.BetweenSaes] | None:
    """A study with several SAEs at one site that differ in seed only, or in architecture only."""
    if files.shape != "study":
        return None
    return between_saes.between_saes(files.runs, files.folders, files.config.seed)


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
    register("second_order", ReportSection(
        second_order.SecondOrder, "site", _second_order, blocks=second_order_page.blocks,
        console=second_order_page.console_lines),
        "measured against second-order predicted KL (½ δᵀFδ) and the site's Fisher sensitivity (--second-order)")
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
    register("between_saes", ReportSection(
        list[between_saes.BetweenSaes], "study", _between_saes, blocks=between_saes_page.blocks,
        console=between_saes_page.console_lines, lead=True),
        "a study over seeds of one SAE recipe (or SAEs differing in architecture only): the spread between them")

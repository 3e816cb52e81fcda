"""Report sections: the parts of a report a plugin adds, each under its own report.json key.

A plugin registers a :class:`ReportSection` through ``register_report_sections`` (klgap/hookspecs.py); klgap's own
(the error decomposition, a joint run's compounding, a study's over-training section) are registered the same way
(klgap/report/builtin_sections.py). A section says at which level it lives (a site's, a run's, a study's), how it
is built from a folder's files alone (no model), its page blocks, figures and console lines; the core never names
one. The typed report models with every registered section as a field of its own (None where a report has none)
are :func:`report_model`, what a report is built and read with (klgap/report/read.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import create_model

from klgap.plugins.manager import get_host
from klgap.report.schema import Report, StudyReport, StudyRun

if TYPE_CHECKING:
    from klgap.job.folder import RunDir
    from klgap.job.record import RunRecord
    from klgap.plan.config import RunConfig
    from klgap.report.aggregate import RunStatistics

Level = Literal["site", "run", "study"]
KIND = "report_section"


@dataclass(frozen=True)
class RunFiles:
    """What a site- or run-level section is built from: a run folder's run.json, its finished parts (table files
    and side sums, in batch order) and the report's core statistics of them."""

    record: RunRecord
    rundir: RunDir
    paths: list[Path]
    sides: list[dict[str, Any]]
    stats: RunStatistics


@dataclass(frozen=True)
class StudyFiles:
    """What a study-level section is built from: the study's configuration and shape (``study`` or
    ``checkpoints``), its runs' summary rows and their folders."""

    config: RunConfig
    shape: str
    runs: list[StudyRun]
    folders: list[Path]
    out: Path


@dataclass(frozen=True)
class ReportSection:
    """One section of the report, registered under its report.json key.

    type:     its value's type (a pydantic model, or a list of one); the report's JSON Schema holds it.
    level:    ``site`` (a run report's, and each study row's: a study shows it across its runs), ``run`` (a run
              report's only) or ``study`` (a study report's).
    build:    RunFiles (site, run) or StudyFiles (study) -> its value, or None when the report has no such section.
    blocks:   report -> page blocks (klgap.render.blocks), placed after the run's overview, in registration order.
    figures:  (report, folder) -> the figure files it wrote there.
    captions: a caption per figure file stem.
    console:  report -> lines the command prints after the summary.
    lead:     its blocks and figures open the page in place of the verdict, summary table and the run figures.
    """

    type: Any
    level: Level
    build: Callable[[Any], Any]
    blocks: Callable[[Any], list[Any]] | None = None
    figures: Callable[[Any, Path], list[Path]] | None = None
    captions: dict[str, str] = field(default_factory=dict)
    console: Callable[[Any], list[str]] | None = None
    lead: bool = False
    description: str = ""


def sections(*levels: Level) -> dict[str, ReportSection]:
    """The registered sections (key -> section), in registration order; only those of `levels` when given."""
    entries = get_host().registry(KIND).entries
    return {key: e.obj for key, e in entries.items() if not levels or e.obj.level in levels}


def present(report: Report | StudyReport) -> list[tuple[str, ReportSection, Any]]:
    """The sections `report` holds: (key, section, value), in registration order."""
    levels: tuple[Level, ...] = ("study",) if isinstance(report, StudyReport) else ("site", "run")
    found = [(key, section, getattr(report, key, None)) for key, section in sections(*levels).items()]
    if isinstance(report, StudyReport):  # a site's section shown across the study's runs
        found += [(key, section, True) for key, section in sections("site").items()
                  if any(getattr(run, key, None) is not None for run in report.runs)]
    return [(key, section, value) for key, section, value in found if value is not None]


_MODELS: dict[tuple[str, tuple[str, ...]], Any] = {}


def report_model(kind: Literal["run", "study", "study_run"]) -> Any:
    """The report model of `kind` with every registered section as an optional field (cached per registry):
    ``run`` (a subclass of Report), ``study`` (of StudyReport, its rows ``study_run``) and ``study_run`` (of
    StudyRun: the site-level sections)."""
    levels = {"run": ("site", "run"), "study": ("study",), "study_run": ("site",)}[kind]
    chosen = sections(*levels)
    key = (kind, tuple(f"{k}:{id(s)}" for k, s in chosen.items()))
    if key not in _MODELS:
        base = {"run": Report, "study": StudyReport, "study_run": StudyRun}[kind]
        fields: dict[str, Any] = {name: (section.type | None, None) for name, section in chosen.items()}
        if kind == "study":
            fields["runs"] = (list[report_model("study_run")], ...)
        _MODELS[key] = create_model(base.__name__, __base__=base, __module__=base.__module__, __doc__=base.__doc__,
                                    **fields)
    return _MODELS[key]


def build_run_sections(files: RunFiles) -> dict[str, Any]:
    """Every site- and run-level section a run folder has (key -> value)."""
    built = {key: section.build(files) for key, section in sections("site", "run").items()}
    return {key: value for key, value in built.items() if value is not None}


def build_study_sections(files: StudyFiles) -> dict[str, Any]:
    """Every study-level section a study has (key -> value)."""
    built = {key: section.build(files) for key, section in sections("study").items()}
    return {key: value for key, value in built.items() if value is not None}


def site_sections(report: Report) -> dict[str, Any]:
    """A run report's site-level sections (what its study row holds too)."""
    return {key: value for key in sections("site") if (value := getattr(report, key, None)) is not None}


__all__ = ["KIND", "Level", "ReportSection", "RunFiles", "StudyFiles", "build_run_sections", "build_study_sections",
           "present", "report_model", "sections", "site_sections"]

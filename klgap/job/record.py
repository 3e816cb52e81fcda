"""run.json: everything a report needs besides the per-token rows, written when a run opens.

A run folder is ``run.json`` + ``parts/`` (per-batch token tables and side sums). The report is a pure function
of those files (:func:`klgap.report.build.build_report`), so ``klgap merge`` and ``klgap report`` never load a model
or an SAE. ``run.json`` is written before the first batch and again if the run learns something while it
measures (a study's shared clean forward), atomically each time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from klgap.errors import KlgapError
from klgap.job.folder import atomic_write_json
from klgap.report.schema import SCHEMA_VERSION, HeldOut, PluginRef, RunFacts, SAEInfo, StrictModel

RECORD_FILE = "run.json"
SINGLE_DIR = "single"  # a joint run's sites, each measured alone: OUT/single/<site>_L<layer>/
SUBSETS_DIR = "subsets"  # a joint run's subsets of sites patched together: OUT/subsets/<a+b>/
#: the per-site patch sizes a joint cell's rows carry, as ``site{k}_{name}`` (k: the site's index in run.json's
#: ``joint``, forward order; written by klgap/job/swap.py)
SIZE_COLUMNS = ("eps", "x_norm", "cos", "l0")


def size_column(k: int, name: str) -> str:
    """The column of site k's patch size `name` (:data:`SIZE_COLUMNS`) in a joint cell's rows."""
    return f"site{k}_{name}"


class InterventionRef(StrictModel):
    """One measured intervention: its row label, the spec the user wrote, the plugin that made it, and how a
    sentence names it when its plugin declares it a baseline (klgap.protocols.BaselineRole; None: not one)."""

    name: str
    spec: str
    plugin: PluginRef
    baseline: str | None = None  # absent in run.json files written before klgap recorded it
    definition: str | None = None  # what x' is (klgap.protocols.DescribedPerturbation; schema 0.7.0)


class RunRecord(RunFacts):
    """What was measured, how, and with which plugins (report.json's fields minus the statistics)."""

    schema_version: str
    kind: Literal["run_record"] = "run_record"
    site: str
    layer: int
    hook_name: str
    sae: SAEInfo
    interventions: list[InterventionRef]
    sample_intervention: str | None = None
    n_contexts: int
    n_batches: int
    notes: list[str]
    held_out: HeldOut | None = None  # the measured tokens against the SAE's training tokens (schema 0.6.0)

    @property
    def names(self) -> list[str]:
        """Intervention names in the order they were measured (the SAE's first)."""
        return [i.name for i in self.interventions]


def write_record(folder: Path, record: RunRecord) -> None:
    unset = {name for name in ("joint", "precision", "held_out") if getattr(record, name) is None}  # only when there
    atomic_write_json(Path(folder) / RECORD_FILE, record.model_dump(mode="json", exclude=unset or None))


def read_record(folder: Path) -> RunRecord:
    """The run.json of a run folder; a KlgapError saying what to do when it is missing or unreadable."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        raise KlgapError(
            f"{str(folder)!r} has no {RECORD_FILE}: it was written by an older klgap (or is not a run folder); "
            "run its command again (finished batches are measured again) to get a report"
        )
    try:
        return RunRecord.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as exc:
        raise KlgapError(f"{str(path)!r} is not a valid run record ({SCHEMA_VERSION}): {exc}") from exc


__all__ = ["RECORD_FILE", "SINGLE_DIR", "SIZE_COLUMNS", "SUBSETS_DIR", "InterventionRef", "RunRecord", "read_record", "size_column",
           "write_record"]

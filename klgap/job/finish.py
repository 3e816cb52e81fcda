"""A job's reports from its folders alone (no model, no SAE): each cell's report.json and tokens.parquet, built
in the order the cells read each other (a joint cell after the sites and subsets it compares itself with), then a
study's report over its cells. The end of a run (:func:`finish`), of ``klgap merge`` and of ``klgap report``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from klgap.errors import KlgapError, WriteError
from klgap.job.batches import OpenCell, mine
from klgap.job.distributed import World
from klgap.job.folder import RunDir, atomic_write_json
from klgap.job.plan import Job
from klgap.job.record import RECORD_FILE, SUBSETS_DIR, read_record
from klgap.job.shards import SHARD_FILE
from klgap.plan.config import RunConfig
from klgap.report.build import build_report
from klgap.report.schema import Report, StudyReport, as_json
from klgap.report.study import write_study

log = logging.getLogger("klgap")


def report_folder(folder: str | Path) -> Report:
    """Build report.json and tokens.parquet of a finished cell folder from its run.json and parts alone (a joint
    cell's sites and subsets must have their reports already: :func:`report_tree` builds them first)."""
    rundir = RunDir(folder)
    record = read_record(rundir.root)
    done = len(rundir.done_batches())
    if done < record.n_batches:
        raise KlgapError(f"{str(rundir.root)!r} holds {done} of its {record.n_batches} batches; run its command "
                         "again to finish it (finished batches are kept)")
    report = build_report(record, rundir)
    try:
        rundir.write_tokens(rundir.root / "tokens.parquet")
        atomic_write_json(rundir.root / "report.json", as_json(report))
    except WriteError as exc:
        raise KlgapError(f"{exc}; every measured batch is kept in {rundir.parts}: free space, then "
                         f"`klgap report {rundir.root}` writes the report") from exc
    return report


def report_tree(folder: str | Path) -> Report:
    """The report of a cell folder and, first, of the folders it reads that lack one (a joint cell's sites alone
    and its subsets): what ``klgap report`` does for a killed run's last step."""
    folder = Path(folder)
    record = read_record(folder)
    needed = [folder / site.path for site in record.joint or []]
    subsets = folder / SUBSETS_DIR
    if record.joint is not None and subsets.is_dir():
        needed += sorted(sub for sub in subsets.iterdir() if (sub / RECORD_FILE).is_file())
    for sub in needed:
        if not (sub / "report.json").is_file():
            report_tree(sub)
    return report_folder(folder)


def finish_reports(out: str | Path, shape: str, config: RunConfig, paths: list[str]) -> Report | StudyReport:
    """Every cell's report (`paths`, in the job's order: a joint cell after those it reads), then a study's; the
    report on top (the study's, or the cell at ``"."``)."""
    out = Path(out)
    reports = {path: report_folder(out / path) for path in paths}
    for path, report in reports.items():  # each SAE's quality notes (klgap/report/quality.py), once per SAE
        for note in report.quality_notes if report.joint is None else []:
            log.warning("quality note on the SAE at %s%s: %s", report.hook_name,
                        "" if path == "." else f" ({path})", note.text)
    if shape in ("study", "checkpoints"):
        return write_study(config, [out / path for path in paths], out, shape)
    return reports["."]


def finish(job: Job, opened: list[OpenCell], out: str | Path, shard: tuple[int, int] | None,
           world: World) -> Report | StudyReport | None:
    """After every rank has written its parts: rank 0 writes the reports (a shard: only each folder's shard.json);
    the other ranks, and a shard, return None."""
    if world.distributed:
        log.info("rank %d of %d measured batches %s of %s", world.rank, world.size,
                 sorted(set().union(*(o.todo for o in opened))), out)
        world.barrier()
        if not world.leader:
            return None
    if shard is not None:
        for o in opened:
            n_batches = o.record.n_batches
            atomic_write_json(o.rundir.root / SHARD_FILE, {"shard": list(shard), "batches": mine(n_batches, shard),
                                                           "n_batches": n_batches})
        return None
    return finish_reports(out, job.shape, job.config, [cell.path for cell in job.cells])


__all__ = ["finish", "finish_reports", "report_folder", "report_tree"]

"""Run a job: load it, bind its folders, measure every batch still to do, write its reports.

:func:`klgap.job.plan.plan_job` makes the job (nothing loaded); :func:`run_job` loads it (klgap/job/cells.py),
binds each cell's folder and measures its batches (klgap/job/batches.py), then writes the reports from the
folders alone (klgap/job/finish.py). The orchestration around it (SAEs trained first, the run lock, expected.json,
pages) is klgap/job/command.py.
"""

from __future__ import annotations

from pathlib import Path

from klgap.job.batches import measure_todo, open_cells, share_out
from klgap.job.cells import load_job
from klgap.job.distributed import SINGLE, World
from klgap.job.finish import finish
from klgap.job.folder import RunDir
from klgap.job.plan import Job
from klgap.report.schema import Report, StudyReport


def run_job(job: Job, out: str | Path, *, overwrite: bool = False, progress: bool = True,
            shard: tuple[int, int] | None = None, world: World = SINGLE) -> Report | StudyReport | None:
    """Measure `job` into `out`, resuming what is there; the report on top (a run's, a joint run's or a study's).

    ``shard=(i, n)`` measures only the batches ``b % n == i - 1`` of every cell and writes no report (None):
    ``klgap merge`` joins the n shards. The ranks of a torchrun/srun `world` share the batches; rank 0 returns the
    report, the others None."""
    rundir = RunDir(out)
    created = rundir.check_writable()
    try:
        loaded = load_job(job)
    except BaseException:  # a bad SAE or model: leave no folder behind that a rerun could take for a run
        if created:
            rundir.remove_if_empty()
        raise
    opened = open_cells(loaded, out, overwrite, shard, world)
    share_out(opened, world)
    measure_todo(loaded, opened, progress and world.leader, shard)
    return finish(job, opened, out, shard, world)


__all__ = ["run_job"]

"""A joint run's folder: ``OUT/`` holds the joint measurement (run.json with its sites, parts, report.json with
its compounding section); ``OUT/single/<site>_L<layer>/`` holds each site measured alone on the same batches,
an ordinary run folder (its own run.json, parts, report); with ``joint_subsets``, ``OUT/subsets/<name>/`` holds
each subset of two or more sites patched together, a joint run folder of its own whose sites alone are the
``single/`` folders above it (its run.json names them ``../../single/...``). A batch is done when the joint part
is written (the single-site and subset parts are written first), so a killed joint run resumes like any other.
"""

from __future__ import annotations

import logging
from pathlib import Path

from klgap.job.joint import JointRun, load_joint
from klgap.job.joint_modes import measure_batch
from klgap.job.record import RunRecord, write_record
from klgap.plan.resolve import JointPlan
from klgap.job.folder import RunDir, atomic_write_json
from klgap.report.schema import JointSite, Report
from klgap.job.shards import SHARD_FILE

log = logging.getLogger("klgap")

SINGLE_DIR = "single"
SUBSETS_DIR = "subsets"


def single_folder(site: str, layer: int) -> str:
    return f"{SINGLE_DIR}/{site}_L{layer:02d}"


def joint_identity(joint: JointRun) -> dict:
    """What makes two joint runs the same run (resume only into an identical one)."""
    from klgap.job.engine import run_identity

    identity = joint.plan.config.to_dict()
    identity.pop("no_fast")
    if not identity["joint_subsets"]:  # joint runs written before --joint-subsets existed still resume
        identity.pop("joint_subsets")
    identity["sites"] = [run_identity(run) for run in joint.runs]
    return identity


def subset_folder(subset: JointRun) -> str:
    return f"{SUBSETS_DIR}/{subset.name}"


def joint_record(joint: JointRun, up: str = "") -> RunRecord:
    """run.json of the joint run: the lowest site's facts, the joint config and execution, and every site (its
    folder alone relative to this run's: `up` is ``../../`` for a subset's)."""
    from klgap.job.engine import _json_safe, make_record

    lowest = make_record(joint.runs[0])
    sites = [JointSite(site=run.site, layer=run.layer, hook_name=record.hook_name, sae=record.sae,
                       path=up + single_folder(run.site, run.layer))
             for run, record in ((run, make_record(run)) for run in joint.runs)]
    notes = list(dict.fromkeys(note for run in joint.runs for note in run.notes))
    notes.append("joint run: every site below is patched in the same forward, each with its own SAE (x, x̂, ε "
                 "of the activation that forward gives it); site, layer and sae_metrics here are the lowest "
                 "site's; each site alone: " + ", ".join(site.path for site in sites))
    return lowest.model_copy(update={"config": _json_safe(joint.plan.config.to_dict()), "joint": sites,
                                     "execution": _json_safe(joint.execution), "notes": notes})


def run_joint(plan: JointPlan, out: str | Path, overwrite: bool = False, progress: bool = True,
              shard: tuple[int, int] | None = None) -> Report | None:
    """Measure a joint run into `out` (resuming what is there) and write its report, then each site's.

    ``shard=(i, n)`` measures only the batches ``b % n == i - 1`` (the same per-batch streams as the unsharded
    run) into every folder of the run and writes their shard.json instead of reports (None is returned):
    `klgap merge` joins the n shards (klgap/job/shards.py)."""
    from klgap.job.engine import _bar, make_record, report_folder, run_identity

    rundir = RunDir(out)
    rundir.check_writable()
    joint = load_joint(plan)
    folders = [(rundir, joint_identity(joint), joint_record(joint))]
    folders += [(RunDir(rundir.root / single_folder(run.site, run.layer)), run_identity(run), make_record(run))
                for run in joint.runs]
    folders += [(RunDir(rundir.root / subset_folder(subset)), joint_identity(subset),
                 joint_record(subset, up="../../")) for subset in joint.subsets]
    for folder, identity, record in folders:
        if shard is not None:
            identity["shard"] = f"{shard[0]}/{shard[1]}"
        folder.prepare(identity, overwrite)
        write_record(folder.root, record)
    mine = [i for i in range(joint.n_batches) if shard is None or i % shard[1] == shard[0] - 1]
    done = rundir.done_batches()
    todo = [i for i in mine if i not in done]
    if done:
        log.warning("resuming: %d of %d batches already done in %s", len(mine) - len(todo), len(mine), rundir.root)
    sites = ", ".join(f"{run.site} L{run.layer}" for run in joint.runs)
    tag = f" shard {shard[0]}/{shard[1]}" if shard else ""
    others = [folder for folder, _, _ in folders[1:]]
    for index in _bar(todo, f"joint {sites}{tag}", progress):
        found = measure_batch(joint, index)
        for folder, frames in zip(others, [*found.singles, *found.subsets], strict=True):
            folder.write_part(index, *frames)
        rundir.write_part(index, *found.joint)  # last: the batch is done when this part is there
    if shard is not None:
        for folder in [rundir, *others]:
            atomic_write_json(folder.root / SHARD_FILE, {"shard": list(shard), "batches": mine,
                                                         "n_batches": joint.n_batches})
        return None
    for folder in others:  # singles first: each subset's compounding section reads the single-site reports
        report_folder(folder.root)
    return report_folder(rundir.root)


__all__ = ["joint_record", "run_joint", "single_folder", "subset_folder"]

"""A joint run's folder: ``OUT/`` holds the joint measurement (run.json with its sites, parts, report.json with
its compounding section); ``OUT/single/<site>_L<layer>/`` holds each site measured alone on the same batches,
an ordinary run folder (its own run.json, parts, report). A batch is done when the joint part is written (the
single-site parts are written first), so a killed joint run resumes like any other.
"""

from __future__ import annotations

import logging
from pathlib import Path

from klgap.errors import KlgapError
from klgap.joint import JointRun, load_joint
from klgap.jointmodes import measure_batch
from klgap.record import RunRecord, write_record
from klgap.resolve import JointPlan
from klgap.rundir import RunDir
from klgap.schema import JointSite, Report

log = logging.getLogger("klgap")

SINGLE_DIR = "single"


def single_folder(site: str, layer: int) -> str:
    return f"{SINGLE_DIR}/{site}_L{layer:02d}"


def joint_identity(joint: JointRun) -> dict:
    """What makes two joint runs the same run (resume only into an identical one)."""
    from klgap.engine import run_identity

    identity = joint.plan.config.to_dict()
    identity.pop("no_fast")
    identity["sites"] = [run_identity(run) for run in joint.runs]
    return identity


def joint_record(joint: JointRun) -> RunRecord:
    """run.json of the joint run: the lowest site's facts, the joint config and execution, and every site."""
    from klgap.engine import _json_safe, make_record

    lowest = make_record(joint.runs[0])
    sites = [JointSite(site=run.site, layer=run.layer, hook_name=record.hook_name, sae=record.sae,
                       path=single_folder(run.site, run.layer))
             for run, record in ((run, make_record(run)) for run in joint.runs)]
    notes = list(dict.fromkeys(note for run in joint.runs for note in run.notes))
    notes.append("joint run: every site below is patched in the same forward, each with its own SAE (x, x̂, ε "
                 "of the activation that forward gives it); site, layer and sae_metrics here are the lowest "
                 "site's; each site alone: " + ", ".join(site.path for site in sites))
    return lowest.model_copy(update={"config": _json_safe(joint.plan.config.to_dict()), "joint": sites,
                                     "execution": _json_safe(joint.execution), "notes": notes})


def run_joint(plan: JointPlan, out: str | Path, overwrite: bool = False, progress: bool = True,
              shard: tuple[int, int] | None = None) -> Report:
    """Measure a joint run into `out` (resuming what is there) and write its report, then each site's."""
    from klgap.engine import _bar, make_record, report_folder, run_identity

    if shard is not None:
        raise KlgapError("--shard is not supported for --joint runs yet; run the joint command unsharded")
    rundir = RunDir(out)
    rundir.check_writable()
    joint = load_joint(plan)
    rundir.prepare(joint_identity(joint), overwrite)
    write_record(rundir.root, joint_record(joint))
    singles = []
    for run in joint.runs:
        sub = RunDir(rundir.root / single_folder(run.site, run.layer))
        sub.prepare(run_identity(run), overwrite)
        write_record(sub.root, make_record(run))
        singles.append(sub)
    done = rundir.done_batches()
    todo = [i for i in range(joint.n_batches) if i not in done]
    if done:
        log.warning("resuming: %d of %d batches already done in %s", len(done), joint.n_batches, rundir.root)
    sites = ", ".join(f"{run.site} L{run.layer}" for run in joint.runs)
    for index in _bar(todo, f"joint {sites}", progress):
        (frame, side), alone = measure_batch(joint, index)
        for sub, (single_frame, single_side) in zip(singles, alone, strict=True):
            sub.write_part(index, single_frame, single_side)
        rundir.write_part(index, frame, side)  # last: the batch is done when this part is there
    for sub in singles:
        report_folder(sub.root)
    return report_folder(rundir.root)


__all__ = ["joint_record", "run_joint", "single_folder"]

"""The run: resolve -> load -> execute -> parts + run.json -> report.

:func:`klgap.plan.resolve.resolve` checks a RunConfig and gives a RunPlan (nothing loaded);
:func:`klgap.job.loading.load_plan` loads its SAE, model and tokens and picks an executor (klgap/forward/executors.py);
:func:`open_run` binds it to a folder and writes run.json (klgap/job/recording.py, klgap/job/record.py); each batch is
measured by its mode (klgap/job/modes.py) and written as a part before the next starts, so a killed run resumes;
:func:`finish_run` builds the report from the folder alone (klgap/report/build.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from klgap.forward import metrics

from klgap.job import modes
from klgap.plan.config import RunConfig
from klgap.job.distributed import SINGLE, World
from klgap.errors import KlgapError, WriteError
from klgap.forward.finite import NonFiniteLogits
# loading and the record live in their own modules; their names stay importable from here
from klgap.job.loading import Loaded, load_model, load_plan, load_sae, prepare
from klgap.job.record import RunRecord, write_record
from klgap.job.recording import json_safe, make_record, run_identity
from klgap.plan.resolve import JointPlan, RunPlan, pick_device, resolve
from klgap.job.folder import RunDir, atomic_write_json
from klgap.report.schema import Report, as_json

log = logging.getLogger("klgap")

_json_safe = json_safe  # (klgap/job/joint_folder.py imports it from here)

__all__ = ["Loaded", "OpenRun", "finish_run", "load_model", "load_plan", "load_sae", "make_record", "open_run",
           "pick_device", "prepare", "report_folder", "run", "run_identity", "run_shared"]


@dataclass
class OpenRun:
    """A run bound to its folder: what is loaded, and which batches it still has to measure."""

    run: Loaded
    rundir: RunDir
    record: RunRecord
    mine: list[int]  # this run's (or shard's) batches
    todo: list[int]  # those not measured yet (by this rank, once shared out: share_out)
    shard: tuple[int, int] | None = None
    world: World = SINGLE


def open_run(config: RunConfig | RunPlan, out: str | Path, overwrite: bool = False,
             shard: tuple[int, int] | None = None, world: World = SINGLE) -> OpenRun:
    """Resolve (if given a config), load, and bind to `out` (resuming what is there); writes run.json.

    With several ranks (klgap.job.distributed) every rank loads; rank 0 alone binds the folder and writes run.json,
    and every rank gets rank 0's list of batches still to do (its own share: :func:`share_out`)."""
    rundir = RunDir(out)
    created = rundir.check_writable()
    try:
        plan = resolve(config) if isinstance(config, RunConfig) else config
        loaded = load_plan(plan)
    except BaseException:  # a bad SAE or model: leave no folder behind that a rerun could take for a run
        if created:
            rundir.remove_if_empty()
        raise
    identity = run_identity(loaded)
    if shard is not None:
        identity["shard"] = f"{shard[0]}/{shard[1]}"
    record = make_record(loaded, world)
    mine = [i for i in range(loaded.n_batches) if shard is None or i % shard[1] == shard[0] - 1]

    def bind() -> tuple[dict[str, Any], list[int]]:
        rundir.prepare(identity, overwrite)
        write_record(rundir.root, record)
        done = rundir.reusable_batches()  # a part holding a non-finite KL is measured again
        todo = [i for i in mine if i not in done]
        if done:
            log.warning("resuming: %d of %d batches already done in %s", len(mine) - len(todo), len(mine), rundir.root)
        return identity, todo

    bound, todo = world.from_leader(bind)
    if bound != identity:  # every rank must measure the run rank 0 bound the folder to
        raise KlgapError(f"rank {world.rank} resolved another run than rank 0 ({rundir.root}): start every rank "
                         "with the same command and environment")
    return OpenRun(loaded, rundir, record, mine, todo, shard, world)


def share_out(opened: list[OpenRun]) -> None:
    """Keep in each open run only this rank's batches: every world_size-th of the batches any of them still has
    to do (one split for all, so runs that share a clean forward get the same batches on a rank)."""
    world = opened[0].world
    share = set(world.share(sorted(set().union(*(o.todo for o in opened)))))
    for o in opened:
        o.todo = [i for i in o.todo if i in share]


def finish_run(opened: OpenRun) -> Report | None:
    """Write the report and tokens table from the folder (a shard writes only its shard.json). With several
    ranks: after every rank has written its parts, rank 0 writes them; the other ranks return None."""
    rundir, world = opened.rundir, opened.world
    if world.distributed:
        log.info("rank %d of %d measured batches %s of %s", world.rank, world.size, opened.todo, rundir.root)
        world.barrier()
        if not world.leader:
            return None
    if opened.shard is not None:
        atomic_write_json(rundir.root / "shard.json", {"shard": list(opened.shard), "batches": opened.mine,
                                                        "n_batches": opened.run.n_batches})
        return None
    return report_folder(rundir.root)


def report_folder(folder: Path) -> Report:
    """Build report.json and tokens.parquet of a finished run folder from its run.json and parts alone."""
    from klgap.job.record import read_record
    from klgap.report.build import build_report

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


def run(config: RunConfig | RunPlan | JointPlan, out: str | Path, overwrite: bool = False, progress: bool = True,
        shard: tuple[int, int] | None = None, world: World = SINGLE) -> Report | None:
    """Measure, writing per-batch parts as it goes; resume a killed run; write report + tokens table.

    ``shard=(i, n)`` measures only batches ``b`` with ``b % n == i - 1`` and writes no report (None is
    returned): `klgap merge` joins the n shards' parts into the report of the unsharded run. `world`: the
    ranks of a torchrun/srun launch share the batches (klgap.job.distributed); rank 0 returns the report. A joint
    config or plan (``joint=True``) runs as klgap/job/joint_folder.py says.
    """
    if isinstance(config, RunConfig) and config.joint:
        config = resolve(config)
    if isinstance(config, JointPlan):
        if world.size > 1:
            raise KlgapError(f"joint runs do not share a launch of {world.size} ranks yet; run them as one process "
                             "(the sites of a joint run share each forward pass)")
        from klgap.job.joint_folder import run_joint

        return run_joint(config, out, overwrite, progress, shard)
    opened = open_run(config, out, overwrite, shard, world)
    share_out([opened])
    _measure_todo(opened, progress)
    return finish_run(opened)


def _bar(items: list[int], desc: str, progress: bool) -> Any:
    """A progress bar over batches (klgap/job/progress.py: a terminal bar, or a notebook's), or the plain list when
    progress is off."""
    from klgap.job.progress import progress_bar

    return progress_bar(items, desc, progress)


def _measure_todo(opened: OpenRun, progress: bool) -> None:
    """Measure the batches an open run still has to do, writing each part as it is finished."""
    loaded, shard = opened.run, opened.shard
    tag = f" shard {shard[0]}/{shard[1]}" if shard else ""
    for index in _bar(opened.todo, f"{loaded.config.mode} {loaded.site} L{loaded.layer}{tag}", progress):
        with _batch_named(index, loaded):
            measured = modes.measure_batch(loaded, index)
        _write_part(opened, index, measured)


def _write_part(opened: OpenRun, index: int, measured: tuple[Any, dict[str, Any]]) -> None:
    try:
        opened.rundir.write_part(index, *measured)
    except WriteError as exc:
        raise KlgapError(f"{exc}; the batches finished before it are kept: free space and run the same command "
                         "to resume") from exc


@contextmanager
def _batch_named(index: int, run: Loaded) -> Iterator[None]:
    """Non-finite clean logits stop the run at that batch, named (no part is written for it)."""
    try:
        yield
    except NonFiniteLogits as exc:
        raise KlgapError(f"batch {index} (contexts {index * run.config.batch_size}..): {exc}; nothing of this "
                         "batch was written") from exc


def run_shared(configs: list[RunConfig], outs: list[Path], overwrite: bool = False, progress: bool = True,
               shard: tuple[int, int] | None = None, world: World = SINGLE) -> list[Report | None]:
    """Several all-token runs on one model and the same tokens (a study's sites/layers): each batch's clean
    forward runs once for all of them, then each reruns only the layers above its own site.

    Falls back to one run after another when a run cannot share (another mode, no suffix replay, other tokens).
    Per-token numbers are those of separate runs (tests/core/test_engine.py)."""
    from klgap.forward.suffix import shared_clean

    opened = [open_run(c, o, overwrite, shard, world) for c, o in zip(configs, outs, strict=True)]
    share_out(opened)
    first = opened[0].run
    can_share = len(opened) > 1 and all(
        o.run.config.mode == "all_tokens" and o.run.executor.path == "suffix-replay" and o.run.model is first.model
        and torch.equal(o.run.contexts, first.contexts) and o.run.config.batch_size == first.config.batch_size
        for o in opened
    )
    if not can_share:
        for o in opened:
            _measure_todo(o, progress)
        return [finish_run(o) for o in opened]
    for o in opened:  # known before the first batch: recorded now, so a killed study's run.json says it too
        o.run.execution["clean_forward"] = f"shared by {len(opened)} sites/layers"
        o.record = o.record.model_copy(update={"execution": json_safe(o.run.execution)})
        if world.leader:
            write_record(o.rundir.root, o.record)
    indices = sorted(set().union(*(o.todo for o in opened)))
    for index in _bar(indices, f"all_tokens, {len(opened)} sites/layers, shared clean forward", progress):
        need = [o for o in opened if index in o.todo]
        ids = modes.batch_ids(first, index)[0].to(first.model.device)
        runners = [o.run.executor.runner for o in need]
        with _batch_named(index, first):
            clean_ref = metrics.CleanReference.of(shared_clean(runners, ids))
        for o, runner in zip(need, runners, strict=True):
            _write_part(o, index, modes.measure_batch(o.run, index, clean=(runner.site_value, clean_ref)))
            runner.site_value = None
    return [finish_run(o) for o in opened]

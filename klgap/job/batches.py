"""The batch loop: any job (klgap/job/plan.py) on any executor, batch by batch, each batch's parts written before
the next starts, so a killed job resumes.

Per batch: the clean forward (shared by the cells that share it: klgap/job/loaded.py), then each cell's mode
(klgap/job/modes.py) on it, each cell's rows written as a part of its folder. Every cell's folder is bound to its
identity when the job opens (run_config.json, run.json); a batch a cell has already measured is not measured
again. ``shard=(i, n)`` measures the batches ``b % n == i - 1`` of every cell (``klgap merge`` joins the shards);
the ranks of a torchrun/srun `world` share the batches still to do (one split for all cells, so the cells that
share a clean forward get the same batches on a rank); rank 0 binds the folders and, after a barrier, writes
the reports (klgap/job/finish.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klgap.errors import KlgapError, WriteError
from klgap.forward.finite import NonFiniteLogits
from klgap.forward.metrics import CleanReference
from klgap.job import modes
from klgap.job.batch import Batch, Clean
from klgap.job.loaded import LoadedCell, LoadedJob
from klgap.job.distributed import SINGLE, World
from klgap.job.folder import RunDir
from klgap.job.identity import joint_identity, joint_record, make_record, run_identity
from klgap.job.record import RunRecord, write_record

log = logging.getLogger("klgap")


@dataclass
class OpenCell:
    """A cell bound to its folder, and the batches it still has to measure (this rank's, once shared out)."""

    cell: LoadedCell
    rundir: RunDir
    record: RunRecord
    todo: list[int]


def mine(n_batches: int, shard: tuple[int, int] | None) -> list[int]:
    """The batches a job (or its shard ``(i, n)``: ``b % n == i - 1``) measures."""
    return [i for i in range(n_batches) if shard is None or i % shard[1] == shard[0] - 1]


def _facts(job: LoadedJob, cell: LoadedCell, world: World) -> tuple[dict[str, Any], RunRecord]:
    """A cell's identity (what a resume must match) and its run.json."""
    if cell.joint:
        return joint_identity(cell), joint_record(cell, world)
    run = cell.runs[0]
    if job.shares_clean and job.job.shape != "joint":  # known before the first batch: run.json says it from the start
        run.execution["clean_forward"] = f"shared by {len(job.cells)} sites/layers"
    return run_identity(run), make_record(run, world)


def open_cells(job: LoadedJob, out: str | Path, overwrite: bool = False, shard: tuple[int, int] | None = None,
               world: World = SINGLE) -> list[OpenCell]:
    """Bind every cell's folder under `out` (resuming what is there): rank 0 writes run_config.json and run.json
    and hands every rank the batches each cell still has to do."""
    batches = mine(job.n_batches, shard)
    cells = []
    for cell in job.cells:
        identity, record = _facts(job, cell, world)
        if shard is not None:
            identity["shard"] = f"{shard[0]}/{shard[1]}"
        cells.append((cell, RunDir(Path(out) / cell.path), identity, record))

    def bind() -> tuple[list[dict[str, Any]], list[list[int]]]:
        todos = []
        for _, rundir, identity, record in cells:
            rundir.prepare(identity, overwrite)
            write_record(rundir.root, record)
            done = rundir.reusable_batches()  # a part holding a non-finite KL is measured again
            todos.append([i for i in batches if i not in done])
            if done:
                log.warning("resuming: %d of %d batches already done in %s", len(batches) - len(todos[-1]),
                            len(batches), rundir.root)
        return [identity for _, _, identity, _ in cells], todos

    bound, todos = world.from_leader(bind)
    if bound != [identity for _, _, identity, _ in cells]:  # every rank must measure what rank 0 bound
        raise KlgapError(f"rank {world.rank} resolved another run than rank 0 ({out}): start every rank "
                         "with the same command and environment")
    return [OpenCell(cell, rundir, record, todo) for (cell, rundir, _, record), todo in zip(cells, todos, strict=True)]


def share_out(opened: list[OpenCell], world: World) -> None:
    """Keep in each cell only this rank's batches: every world_size-th of the batches any cell still has to do."""
    share = set(world.share(sorted(set().union(*(o.todo for o in opened)))))
    for o in opened:
        o.todo = [i for i in o.todo if i in share]


def _clean(job: LoadedJob, cell: LoadedCell, batch: Batch, shared: list[Clean]) -> Clean:
    """The cell's clean run of the batch: the shared forward's (computed once, for the first cell needing it), or
    its own executor's."""
    reads = [run.reads(batch.ids)[:, batch.start :] if run.read_spec is not None else None for run in cell.runs]
    if cell.joint or job.shares_clean:
        if not shared:
            shared.append(job.clean(batch))
        every = shared[0]
        return Clean([every.acts[i] for i in cell.cell.sites], every.ref, reads)
    acts, logits = cell.runs[0].executor.clean(batch.ids, batch.start)
    return Clean([acts], CleanReference.of(logits), reads)


def measure_batch(job: LoadedJob, index: int, cells: list[LoadedCell]) -> Iterator[modes.Frames]:
    """Each cell's rows and side sums of batch `index` (plus the text of each token id seen, so a report is
    built later without a tokenizer), one cell at a time; non-finite clean logits stop the job there, named."""
    cfg, tokenizer = job.config, job.model.tokenizer
    batch = job.batch(index)
    shared: list[Clean] = []
    try:
        for cell in cells:
            clean = _clean(job, cell, batch, shared)
            if cfg.mode == "all_tokens":
                frame, side = modes.all_tokens(cell, batch, clean, cfg.skip_first_position, cfg.drop_last_position)
            elif cfg.mode == "single_token":
                frame, side = modes.single_token(cell, batch, clean, cfg.k)
            else:
                frame, side = modes.many_samples(cell, batch, clean, cfg.n_samples)
            if tokenizer is not None:
                side["token_text"] = modes.token_texts(frame, tokenizer)
            yield frame, side
    except NonFiniteLogits as exc:
        raise KlgapError(f"batch {index} (contexts {index * cfg.batch_size}..): {exc}; nothing of this batch was "
                         "written") from exc
    finally:
        if shared:
            job.release()


def _bar(items: list[int], desc: str, progress: bool) -> Any:
    """A progress bar over batches (klgap/job/progress.py: a terminal bar, or a notebook's), or the plain list when
    progress is off."""
    from klgap.job.progress import progress_bar

    return progress_bar(items, desc, progress)


def describe(job: LoadedJob, shard: tuple[int, int] | None) -> str:
    """What the progress bar says: the mode and the cells, with the shard."""
    cfg, tag = job.config, f" shard {shard[0]}/{shard[1]}" if shard else ""
    whole = next((cell for cell in job.cells if cell.joint and cell.path == "."), None)
    if whole is not None:
        return f"joint {', '.join(f'{run.site} L{run.layer}' for run in whole.runs)}{tag}"
    if len(job.cells) == 1:
        run = job.runs[0]
        return f"{cfg.mode} {run.site} L{run.layer}{tag}"
    shared = ", shared clean forward" if job.shares_clean else ""
    return f"{cfg.mode}, {len(job.cells)} sites/layers{shared}{tag}"


def measure_todo(job: LoadedJob, opened: list[OpenCell], progress: bool = True,
                 shard: tuple[int, int] | None = None) -> None:
    """Measure every batch some cell still has to do; each cell's part is written as soon as it is measured."""
    indices = sorted(set().union(*(o.todo for o in opened)))
    for index in _bar(indices, describe(job, shard), progress):
        need = [o for o in opened if index in o.todo]
        for o, measured in zip(need, measure_batch(job, index, [o.cell for o in need]), strict=True):
            try:
                o.rundir.write_part(index, *measured)
            except WriteError as exc:
                raise KlgapError(f"{exc}; the batches finished before it are kept: free space and run the same "
                                 "command to resume") from exc


__all__ = ["OpenCell", "describe", "measure_batch", "measure_todo", "mine", "open_cells", "share_out"]

"""A loaded job's types: :class:`LoadedCell` (a cell with its sites loaded and, when joint, the executor that patches
them together) and :class:`LoadedJob` (a job's runs and cells, and the batch's shared clean forward). What loads
them: klgap/job/cells.py; what measures them: klgap/job/modes.py, klgap/job/batches.py.

:meth:`LoadedJob.clean` is a batch's shared clean forward: one forward of the model for every site of the job,
used by every joint cell and, in all-token mode, by every single-site cell when the job shares it
(:attr:`LoadedJob.shares_clean`: a study whose sites all replay their suffix, or a joint run); a cell that does
not share runs its own executor's clean run (the KV cache's, say).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from klgap.forward.joint import JointExecutor, clean_forward, release
from klgap.forward.metrics import CleanReference
from klgap.job.batch import Batch, Clean
from klgap.job.loading import Loaded
from klgap.job.masks import special_token_ids
from klgap.job.patch import JointPatch, Patch, Positions, SitePatch
from klgap.job.plan import Cell, Job
from klgap.job.view import SaeView
from klgap.plan.config import RunConfig
from klgap.protocols import ErrorSplitter, LoadedModel
from klgap.report.schema import PrecisionCheck


@dataclass
class LoadedCell:
    """A cell with its sites loaded (forward order) and, when joint, its executor and what run.json says of it."""

    cell: Cell
    runs: list[Loaded]
    executor: JointExecutor | None = None
    execution: dict[str, Any] = field(default_factory=dict)
    precision: PrecisionCheck | None = None  # a joint cell's own check against float32 (klgap/job/precision.py);
    #                                          a single-site cell's is its run's

    @property
    def joint(self) -> bool:
        return self.cell.joint

    @property
    def path(self) -> str:
        return self.cell.path

    @property
    def config(self) -> RunConfig:
        """The configuration its run.json records (a joint cell's own, a single site's its plan's)."""
        return self.cell.config if self.cell.config is not None else self.runs[0].config

    @property
    def lowest(self) -> Loaded:
        """The lowest site's run: the rows' geometry (eps, cos, ...) is its SAE's view of the clean run."""
        return self.runs[0]

    @property
    def split(self) -> ErrorSplitter | None:
        """A single site's split of its SAE's error (its rows get eps_lin, eps_nl); None for a joint cell."""
        return None if self.joint else self.runs[0].error_split

    @property
    def name(self) -> str:
        """``resid_post_L03+resid_post_L10``: the sites patched together, in forward order."""
        return "+".join(f"{run.site}_L{run.layer:02d}" for run in self.runs)

    def patch(self, batch: Batch, clean: Clean, view: SaeView, at: slice | int,
              positions: Positions | None = None) -> Patch:
        """This batch's patched runs: at positions `at` (a slice in all-token mode, the position t otherwise);
        `positions` (all-token mode) the tokens patched when --mask-special masks some; `clean` the batch's clean
        run (a joint cell's clean and matched baselines are sized from it)."""
        seed = self.runs[0].config.seed
        if not self.joint:
            return SitePatch(self.runs[0], view, batch.ids, at, seed, batch.index, positions)
        where = at if isinstance(at, slice) else slice(at, at + 1)
        return JointPatch(self.runs, self.executor, batch.ids, where, batch.start, seed,  # type: ignore[arg-type]
                          batch.index, positions=positions, clean=clean.acts, baseline=self.config.joint_baseline)


@dataclass
class LoadedJob:
    """A job with its runs and cells loaded (one model, the same contexts for every site)."""

    job: Job
    runs: list[Loaded]
    cells: list[LoadedCell]
    shares_clean: bool  # every single-site cell measures from the batch's shared clean forward (all-token mode)

    @classmethod
    def of_run(cls, run: Loaded) -> LoadedJob:
        """A one-site job around a run already loaded (klgap.job.cells.prepare: a notebook's, a benchmark's)."""
        job = Job.single(run.plan)
        return cls(job, [run], [LoadedCell(job.cells[0], [run])], False)

    @property
    def model(self) -> LoadedModel:
        return self.runs[0].model

    @property
    def config(self) -> RunConfig:
        """What the job's sites share: mode, tokens, batch size, positions, seed."""
        return self.runs[0].config

    @property
    def n_batches(self) -> int:
        return self.runs[0].n_batches

    def batch(self, index: int) -> Batch:
        cfg = self.config
        return Batch.of(self.runs[0].contexts, index, cfg.batch_size, cfg.mode, cfg.position, cfg.k, self.model.device,
                        cfg.mask_special, special_token_ids(self.model.tokenizer))

    def clean(self, batch: Batch) -> Clean:
        """The batch's shared clean forward: every site's activation and the logits, from the tail start on."""
        acts, logits = clean_forward(self.model, [(run.spec, run.executor) for run in self.runs], batch.ids)
        start = batch.start
        return Clean([a[:, start:] for a in acts], CleanReference.of(logits[:, start:]))

    def release(self) -> None:
        """Drop what the batch's shared clean forward recorded for the suffix replays."""
        release([run.executor for run in self.runs])


__all__ = ["LoadedCell", "LoadedJob"]

"""A job loaded: every plan's run (klgap/job/loading.py) and every cell with the sites it patches and, for a joint
cell, the executor that patches them together (klgap/forward/joint.py), checked like the single-site fast paths.

:meth:`LoadedJob.clean` is a batch's shared clean forward: one forward of the model for every site of the job,
used by every joint cell and, in all-token mode, by every single-site cell when the job shares it
(:attr:`LoadedJob.shares_clean`: a study whose sites all replay their suffix, or a joint run); a cell that does
not share runs its own executor's clean run (the KV cache's, say).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from klgap.errors import KlgapError
from klgap.forward.executors import TOLERANCE, SuffixReplay, relative_error
from klgap.forward.joint import JointExecutor, JointForward, JointReplay, clean_forward, release
from klgap.forward.metrics import CleanReference
from klgap.job.batch import Batch, Clean
from klgap.job.loading import Loaded, load_plan
from klgap.job.masks import special_token_ids
from klgap.job.patch import JointPatch, Patch, Positions, SitePatch, reconstruct_swaps
from klgap.job.plan import Cell, Job
from klgap.job.view import SaeView
from klgap.plan.config import RunConfig
from klgap.protocols import ErrorSplitter, LoadedModel

log = logging.getLogger("klgap")


@dataclass
class LoadedCell:
    """A cell with its sites loaded (forward order) and, when joint, its executor and what run.json says of it."""

    cell: Cell
    runs: list[Loaded]
    executor: JointExecutor | None = None
    execution: dict[str, Any] = field(default_factory=dict)

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

    def patch(self, batch: Batch, view: SaeView, at: slice | int, positions: Positions | None = None) -> Patch:
        """This batch's patched runs: at positions `at` (a slice in all-token mode, the position t otherwise);
        `positions` (all-token mode) the tokens patched when --mask-special masks some."""
        seed = self.runs[0].config.seed
        if not self.joint:
            return SitePatch(self.runs[0], view, batch.ids, at, seed, batch.index, positions)
        where = at if isinstance(at, slice) else slice(at, at + 1)
        return JointPatch(self.runs, self.executor, batch.ids, where, batch.start, seed,  # type: ignore[arg-type]
                          batch.index, positions=positions)


@dataclass
class LoadedJob:
    """A job with its runs and cells loaded (one model, the same contexts for every site)."""

    job: Job
    runs: list[Loaded]
    cells: list[LoadedCell]
    shares_clean: bool  # every single-site cell measures from the batch's shared clean forward (all-token mode)

    @classmethod
    def of_run(cls, run: Loaded) -> LoadedJob:
        """A one-site job around a run already loaded (klgap.job.loading.prepare: a notebook's, a benchmark's)."""
        cell = Cell(".", (0,))
        return cls(Job(run.config, "run", (run.plan,), (cell,), (run.config.sae,)), [run], [LoadedCell(cell, [run])],
                   False)

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


def choose_joint(runs: list[Loaded]) -> tuple[JointExecutor, dict[str, Any]]:
    """The joint replay if every site has a suffix replay and, on the first contexts, the replay with x̂ at every
    site matches the full forward; else full forwards. The record of the choice goes to run.json."""
    config, model = runs[0].config, runs[0].model
    full = JointForward(model, [run.spec for run in runs])
    if not config.fast:
        return full, {"path": full.path, "reason": "--no-fast"}
    if config.mode != "all_tokens":
        return full, {"path": full.path, "reason": f"{config.mode}: joint patched runs are full forwards (no joint "
                                                   "KV-cache path yet); each site alone uses its own fast path"}
    if not all(isinstance(run.executor, SuffixReplay) for run in runs):
        return full, {"path": full.path, "reason": "a site has no suffix replay (its single-site run uses "
                                                   "full forwards)"}
    replay = JointReplay(full, runs[0].executor)  # type: ignore[arg-type]
    first = 1 if config.skip_first_position else 0
    ids = runs[0].contexts[: min(2, len(runs[0].contexts))].to(model.device)
    clean_forward(model, [(run.spec, run.executor) for run in runs], ids)  # each site's own replay was checked
    patched = replay.patched(ids, reconstruct_swaps(runs, slice(first, None)))
    ref_patched = full.patched(ids, reconstruct_swaps(runs, slice(first, None)))
    release([run.executor for run in runs])
    error = relative_error([(patched, ref_patched)], ref_patched)
    if not error <= TOLERANCE:
        log.warning("joint suffix replay of %s differs from the full forward (%.2g); using full forward passes",
                    model.name, error)
        return full, {"path": full.path, "reason": f"joint replay check failed (relative error {error:.2g})"}
    return replay, {"path": replay.path, "first_block": replay.first_block, "replay_check_relative_error": error}


def _sites(runs: list[Loaded]) -> list[str]:
    return [f"{run.site} L{run.layer}" for run in runs]


def load_job(job: Job) -> LoadedJob:
    """Load every plan (one model, held once) and each cell; choose the joint executors."""
    runs = [load_plan(plan) for plan in job.plans]
    model = runs[0].model
    if job.shape == "joint":
        if model.remote or any(run.model is not model for run in runs):
            raise KlgapError("a joint run patches every site in one local forward; --remote is not supported")
        if any(not torch.equal(run.contexts, runs[0].contexts) for run in runs):
            raise KlgapError("the sites of a joint run read different tokens; give one --dataset and --seed")
    cells = [LoadedCell(cell, [runs[i] for i in cell.sites]) for cell in job.cells]
    whole = next((c for c in cells if c.joint and c.path == "."), None)
    if whole is not None:
        whole.executor, execution = choose_joint(whole.runs)
        whole.execution = {**execution, "sites": _sites(whole.runs)}
        for sub in (c for c in cells if c.joint and c is not whole):
            full = JointForward(model, [run.spec for run in sub.runs])
            replays = isinstance(whole.executor, JointReplay)
            sub.executor = JointReplay(full, sub.runs[0].executor) if replays else full  # type: ignore[arg-type]
            sub.execution = {**whole.execution, "path": sub.executor.path, "sites": _sites(sub.runs)}
    first = runs[0]
    shares = first.config.mode == "all_tokens" and (whole is not None or (len(runs) > 1 and all(
        run.executor.path == "suffix-replay" and run.model is model and torch.equal(run.contexts, first.contexts)
        for run in runs)))
    return LoadedJob(job, runs, cells, shares)


__all__ = ["LoadedCell", "LoadedJob", "choose_joint", "load_job"]

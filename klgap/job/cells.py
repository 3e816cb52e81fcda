"""Load a job: every plan's run (klgap/job/loading.py), a low-precision job checked against float32
(klgap/job/precision.py), and every cell with the sites it patches and, for a joint cell, the executor that patches
them together (klgap/forward/joint.py), checked like the single-site fast paths. The loaded types:
klgap/job/loaded.py.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from klgap.errors import KlgapError
from klgap.forward.executors import TOLERANCE, SuffixReplay, relative_error
from klgap.forward.joint import JointExecutor, JointForward, JointReplay, clean_forward, release
from klgap.job import precision
from klgap.job.loaded import LoadedCell, LoadedJob
from klgap.job.loading import Loaded, load_plan
from klgap.job.swap import reconstruct_swaps
from klgap.job.plan import Job
from klgap.plan.config import RunConfig
from klgap.plan.resolve import resolve

log = logging.getLogger("klgap")


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


def assemble(job: Job, runs: list[Loaded]) -> LoadedJob:
    """The job's cells over its loaded runs: the joint executors chosen, and whether the sites share the batch's
    clean forward."""
    model = runs[0].model
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


def load_job(job: Job) -> LoadedJob:
    """Load every plan (one model, held once) and each cell; choose the joint executors. A low-precision job is
    checked against float32 on its first contexts, every cell (klgap/job/precision.py); with ``--dtype auto``
    a failed check loads it in float32 instead."""
    runs = [load_plan(plan) for plan in job.plans]
    model = runs[0].model
    if job.shape == "joint":
        transcoders = [run.sae.source for run in runs if run.sae.transcoder]
        if transcoders:
            raise KlgapError(f"--joint with a transcoder ({transcoders[0]}) is not supported yet: measure each "
                             "layer's transcoder alone (a study over layers)")
        if model.remote or any(run.model is not model for run in runs):
            raise KlgapError("a joint run patches every site in one local forward; --remote is not supported")
        if any(not torch.equal(run.contexts, runs[0].contexts) for run in runs):
            raise KlgapError("the sites of a joint run read different tokens; give one --dataset and --seed")
    loaded = assemble(job, runs)
    checks = precision.check(loaded)
    if checks is None:
        return loaded
    if precision.falls_back(loaded.config, checks):
        loaded = assemble(job, [precision.on_reference(run) for run in runs])
        checks = [precision.measured_in(check, loaded.model) for check in checks]
    precision.record(loaded, checks)
    return loaded


def prepare(config: RunConfig) -> Loaded:
    """Resolve and load a one-site config (no folder; a low-precision one checked): what a notebook or a benchmark
    measures batches with (``LoadedJob.of_run``, klgap.job.batches.measure_batch)."""
    return load_job(Job.single(resolve(config))).runs[0]


__all__ = ["assemble", "choose_joint", "load_job", "prepare"]

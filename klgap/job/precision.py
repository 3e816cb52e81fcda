"""Low precision with a measured error: a ``--dtype bfloat16 | float16 | auto`` job against float32.

The model computes in the low precision; everything klgap computes around it stays float32: the site activation
is read into float32 (x), the SAE and every perturbation work on it (x̂, baselines, random draws: the same
generators and shapes as a float32 run, so the same draws; fitted perturbations are fitted on the float32
model's activations), only the patched value x' is rounded to the model's dtype, and KL / ΔCE come from the
low-precision logits converted to float32 (klgap/forward/metrics.py: the clean probabilities in float64, the
log-softmax in float32).

The low-precision model is a copy of the float32 load (klgap/job/loading.py: ``cast_copy``): parameters
rounded, buffers kept in float32. The float32 model stays loaded beside it (each run's ``reference``).

The check (:func:`check`), where the job is loaded (klgap/job/cells.py: load_job), before its first batch: the
job's first :data:`CHECK_CONTEXTS` contexts measured as one batch by the job's own batch loop
(klgap/job/batches.py: the same cells, modes, shared clean forward and execution paths, each executor a fresh
one of the kind the job chose) on the float32 model and on the low-precision one, with the same tokens and
draws; every cell is compared: each site of a study, a joint run's sites alone, its subsets and the joint cell
itself. Per-token |ΔKL| (max, 99th percentile, and both relative to the intervention's float32 mean KL), each
intervention's mean KL and the headline ratio KL(sae)/KL(epsilon_random) in both, recorded in each cell's
run.json and report (``precision``: :class:`klgap.report.schema.PrecisionCheck`). Above :data:`TOLERANCE` (a
relative change of a mean KL or of the ratio) an explicit ``--dtype bfloat16|float16`` job goes on and says so
(stderr, the report's opening lines); with ``--dtype auto`` a failed check at any cell makes the whole job measure
in float32 (:func:`falls_back`; one model for the job, whose cells share its forwards).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd
import torch

from klgap.forward import executors, joint
from klgap.job.batches import measure_batch
from klgap.job.loaded import LoadedCell, LoadedJob
from klgap.job.loading import Loaded
from klgap.plan.config import RunConfig
from klgap.plan.dtypes import AUTO
from klgap.protocols import LoadedModel
from klgap.report.schema import BASELINE, PrecisionCheck, PrecisionIntervention
from klgap.report.summary import precision_sentence

log = logging.getLogger("klgap")

CHECK_CONTEXTS = 2  # contexts the check measures in both precisions (the fast-path check uses as many)
TOLERANCE = 0.01  # largest relative change of a mean KL, or of the headline ratio, that passes

__all__ = ["CHECK_CONTEXTS", "TOLERANCE", "check", "checked_job", "checked_run", "compare", "falls_back",
           "measured_in", "on_reference", "record"]


def check(loaded: LoadedJob) -> list[PrecisionCheck] | None:
    """Each cell's check (in the job's cell order): the job's first contexts measured on its runs' float32
    reference and on its own model. None when the job is not low precision, or its model is remote or spread
    over devices (no reference: not checked)."""
    reference = loaded.runs[0].reference
    if reference is None:
        return None
    n = min(CHECK_CONTEXTS, len(loaded.runs[0].contexts))
    measured = []
    for model in (reference, loaded.model):
        job = checked_job(loaded, model, n)
        measured.append([frame for frame, _ in measure_batch(job, 0, job.cells)])
    return [compare(ref, low, loaded.model.dtype, n) for ref, low in zip(*measured, strict=True)]


def checked_run(run: Loaded, model: LoadedModel, n: int) -> Loaded:
    """The run's first `n` contexts as one batch, on `model`, through a fresh executor of the run's path."""
    plan = dataclasses.replace(run.plan, config=dataclasses.replace(run.config, batch_size=n), dtype=model.dtype)
    executor = executors.same_path(run.executor, model, run.spec, run.layer)
    return dataclasses.replace(run, plan=plan, model=model, contexts=run.contexts[:n], executor=executor)


def checked_job(loaded: LoadedJob, model: LoadedModel, n: int) -> LoadedJob:
    """The job's first `n` contexts as one batch on `model`: every run through :func:`checked_run`, every joint
    cell through a fresh joint executor of its path, the clean forward shared as the job shares it."""
    runs = [checked_run(run, model, n) for run in loaded.runs]
    cells = []
    for cell in loaded.cells:
        sites = [runs[i] for i in cell.cell.sites]
        executor = (None if cell.executor is None else
                    joint.same_path(cell.executor, model, [run.spec for run in sites], sites[0].executor))
        cells.append(LoadedCell(cell.cell, sites, executor))
    return LoadedJob(loaded.job, runs, cells, loaded.shares_clean)


def falls_back(config: RunConfig, checks: list[PrecisionCheck]) -> bool:
    """Whether the job measures in float32 instead: ``--dtype auto`` and a check failed."""
    return config.dtype == AUTO and not all(c.passed for c in checks)


def on_reference(run: Loaded) -> Loaded:
    """The run on its float32 reference: its executor chosen (and checked) again there, its fits kept."""
    reference = run.reference
    assert reference is not None, "on_reference needs a low-precision run"
    executor, execution = executors.choose(run.config, reference, run.spec, run.layer, run.contexts)
    fitted = {"fitted": run.execution["fitted"]} if "fitted" in run.execution else {}
    return dataclasses.replace(run, plan=dataclasses.replace(run.plan, dtype=reference.dtype), model=reference,
                               executor=executor, execution={**execution, **fitted}, reference=None)


def measured_in(check: PrecisionCheck, model: LoadedModel) -> PrecisionCheck:
    """The check as recorded by a job that measured on `model` (float32 after an ``auto`` fallback)."""
    return check.model_copy(update={"measured_dtype": _name(model.dtype)})


def record(loaded: LoadedJob, checks: list[PrecisionCheck]) -> None:
    """Each cell's check on it (a single site's on its run, for run.json) and a failed one said on stderr."""
    for cell, result in zip(loaded.cells, checks, strict=True):
        if cell.joint:
            cell.precision = result
        else:
            cell.runs[0].precision = result
        if not result.passed:
            where = f"{cell.path}: " if len(loaded.cells) > 1 else ""
            log.warning(where + precision_sentence(result))


def compare(reference: pd.DataFrame, low: pd.DataFrame, dtype: torch.dtype, n_contexts: int,
            tolerance: float = TOLERANCE) -> PrecisionCheck:
    """The check's numbers from the same rows measured in float32 (`reference`) and in `dtype` (`low`): per-token
    frames with ``intervention`` and ``kl`` columns, row for row the same tokens and draws."""
    if len(reference) != len(low) or not (reference["intervention"].to_numpy() == low["intervention"].to_numpy()).all():
        raise ValueError("the precision check's two measurements hold different rows")
    interventions: dict[str, PrecisionIntervention] = {}
    diffs, rels = [], []
    for name in pd.unique(reference["intervention"]):
        rows = (reference["intervention"] == name).to_numpy()
        kl_ref = reference["kl"].to_numpy(dtype=np.float64)[rows]
        kl_low = low["kl"].to_numpy(dtype=np.float64)[rows]
        finite = np.isfinite(kl_ref) & np.isfinite(kl_low)
        diff = np.abs(kl_low - kl_ref)[finite]
        mean_ref, mean_low = float(kl_ref[finite].mean()), float(kl_low[finite].mean())
        scale = mean_ref if mean_ref > 0 else np.nan
        entry = PrecisionIntervention(
            kl_mean_float32=mean_ref, kl_mean=mean_low, mean_rel_change=_rel_change(mean_low, mean_ref),
            abs_diff_max=float(diff.max()), abs_diff_p99=float(np.quantile(diff, 0.99)),
            rel_diff_max=float(diff.max() / scale), rel_diff_p99=float(np.quantile(diff, 0.99) / scale),
        )
        interventions[str(name)] = entry
        diffs.append(diff)
        rels.append(entry)
    all_diff = np.concatenate(diffs)
    ratio_ref, ratio_low = _ratio(interventions, "kl_mean_float32"), _ratio(interventions, "kl_mean")
    ratio_change = _rel_change(ratio_low, ratio_ref) if ratio_ref is not None and ratio_low is not None else None
    mean_change = max(e.mean_rel_change for e in rels)
    passed = mean_change <= tolerance and (ratio_change is None or ratio_change <= tolerance)
    return PrecisionCheck(
        dtype=_name(dtype), measured_dtype=_name(dtype), n_contexts=n_contexts, n_tokens=int(all_diff.size),
        kl_abs_diff_max=float(all_diff.max()), kl_abs_diff_p99=float(np.quantile(all_diff, 0.99)),
        kl_rel_diff_max=_nanmax(e.rel_diff_max for e in rels), kl_rel_diff_p99=_nanmax(e.rel_diff_p99 for e in rels),
        kl_mean_rel_change_max=mean_change, ratio_float32=ratio_ref, ratio=ratio_low, ratio_rel_change=ratio_change,
        tolerance=tolerance, passed=bool(passed), interventions=interventions,
    )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rel_change(value: float, reference: float) -> float:
    if reference == 0:
        return 0.0 if value == 0 else float("inf")
    return abs(value / reference - 1.0)


def _ratio(interventions: dict[str, PrecisionIntervention], field: str) -> float | None:
    if "sae" not in interventions or BASELINE not in interventions:
        return None
    denominator = getattr(interventions[BASELINE], field)
    return getattr(interventions["sae"], field) / denominator if denominator > 0 else None


def _nanmax(values) -> float:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return max(finite) if finite else float("nan")

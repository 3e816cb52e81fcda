"""Low precision with a measured error: a ``--dtype bfloat16 | float16 | auto`` run against float32.

The model computes in the low precision; everything klgap computes around it stays float32: the site activation
is read into float32 (x), the SAE and every perturbation work on it (x̂, baselines, random draws: the same
generators and shapes as a float32 run, so the same draws; fitted perturbations are fitted on the float32
model's activations), only the patched value x' is rounded to the model's dtype, and KL / ΔCE come from the
low-precision logits converted to float32 (klgap/forward/metrics.py: the clean probabilities in float64, the
log-softmax in float32).

The low-precision model is a copy of the float32 load (:func:`cast_copy`, klgap/job/loading.py): parameters
rounded, buffers kept in float32, as ``from_pretrained(dtype=bfloat16)`` keeps e.g. rotary ``inv_freq`` (rounding
it would move every attention score). The float32 model stays loaded beside it for the check.

The check (:func:`check`), before the first batch: the run's first :data:`CHECK_CONTEXTS` contexts measured by
the run's own mode and execution path in float32 and in the low precision, with the same tokens and draws.
Per-token |ΔKL| (max, 99th percentile, and both relative to the intervention's float32 mean KL), each
intervention's mean KL and the headline ratio KL(sae)/KL(epsilon_random) in both, recorded in run.json and the
report (``precision``: :class:`klgap.report.schema.PrecisionCheck`). Above :data:`TOLERANCE` (a relative change of
a mean KL or of the ratio) an explicit ``--dtype bfloat16|float16`` run goes on and says so (stderr, the report's
opening lines); ``--dtype auto`` measures in float32 instead (:func:`apply`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from klgap.forward import executors
from klgap.job import modes
from klgap.plan.dtypes import AUTO
from klgap.protocols import LoadedModel
from klgap.report.schema import BASELINE, PrecisionCheck, PrecisionIntervention
from klgap.report.summary import precision_sentence

if TYPE_CHECKING:
    from klgap.job.loading import Loaded

log = logging.getLogger("klgap")

CHECK_CONTEXTS = 2  # contexts the check measures in both precisions (the fast-path check uses as many)
TOLERANCE = 0.01  # largest relative change of a mean KL, or of the headline ratio, that passes

__all__ = ["CHECK_CONTEXTS", "TOLERANCE", "apply", "cast_copy", "check", "checked_run", "compare"]


def cast_copy(model: LoadedModel, dtype: torch.dtype) -> LoadedModel:
    """A copy of `model` with its floating-point parameters cast to `dtype` (the original's are not copied
    first); buffers (rotary frequencies, masks) are shared with `model`, unconverted."""
    params = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
              for p in model.hf_model.parameters() if p.is_floating_point()}
    memo: dict[int, Any] = dict(params)
    memo.update({id(b): b for b in model.hf_model.buffers()})
    hf_model = copy.deepcopy(model.hf_model, memo)
    return dataclasses.replace(model, hf_model=hf_model, dtype=dtype, nnsight=None)


def check(run: Loaded, reference: LoadedModel) -> PrecisionCheck:
    """Measure the run's first contexts with `reference` (float32) and with the run's model, and compare."""
    n = min(CHECK_CONTEXTS, len(run.contexts))
    frames = [modes.measure_batch(checked_run(run, model, n), 0)[0] for model in (reference, run.model)]
    return compare(frames[0], frames[1], run.model.dtype, n)


def checked_run(run: Loaded, model: LoadedModel, n: int) -> Loaded:
    """The run's first `n` contexts as one batch, on `model`, through a fresh executor of the run's path."""
    plan = dataclasses.replace(run.plan, config=dataclasses.replace(run.config, batch_size=n), dtype=model.dtype)
    executor = executors.same_path(run.executor, model, run.spec, run.layer)
    return dataclasses.replace(run, plan=plan, model=model, contexts=run.contexts[:n], executor=executor)


def apply(run: Loaded, reference: LoadedModel) -> Loaded:
    """Check a low-precision run against `reference` (its float32 model) and record the check on it; a failed
    check is said on stderr, and with ``--dtype auto`` the run measures on `reference` instead."""
    result = check(run, reference)
    if not result.passed and run.config.dtype == AUTO:
        executor, execution = executors.choose(run.config, reference, run.spec, run.layer, run.contexts)
        run = dataclasses.replace(run, plan=dataclasses.replace(run.plan, dtype=reference.dtype), model=reference,
                                  executor=executor, execution={**execution, **_fitted(run)})
        result = result.model_copy(update={"measured_dtype": _name(reference.dtype)})
    if not result.passed:
        log.warning(precision_sentence(result))
    run.precision = result
    return run


def _fitted(run: Loaded) -> dict[str, Any]:
    return {"fitted": run.execution["fitted"]} if "fitted" in run.execution else {}


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

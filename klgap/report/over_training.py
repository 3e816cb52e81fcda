"""A study over an SAE's training: every checkpoint measured on the same tokens, the "over training" section.

``klgap replicate --sae 'DIR/checkpoints/*'`` (a glob; ``{site}``/``{layer}`` may be in it) or a config's
``sae_checkpoints = "DIR"`` key makes the checkpoints of each (site, layer) another axis of a study (a job of shape
``checkpoints``, klgap/job/plan.py): one run per checkpoint in ``OUT/<site>_L<layer>/step-XXXXXX/``, all on the
same contexts with the same seeded draws, the clean forward of each batch shared by all of them. The section is a
pure function of the runs' files: each checkpoint's step and tokens seen (its training.json), its explained variance
and L0 on the study's own measured tokens (its sub-run's report: the tokens every KL here is measured on) beside
those its trainer measured on its held-out tokens (training.json; a few thousand tokens at most), its KL(sae),
KL(baseline), their paired difference and ratio with intervals that resample whole contexts.
"""

from __future__ import annotations

from pathlib import Path

from klgap.errors import KlgapError
from klgap.job.folder import RunDir
from klgap.render.formatting import fmt, fmt_ci
from klgap.report import stats
from klgap.report.aggregate import context_sums
from klgap.report.numbers import plain
from klgap.report.schema import BASELINE, MeanCI, Num, RatioCI, StrictModel, StudyRun
from klgap.sae.checkpoints import CheckpointInfo


class TrainingPoint(StrictModel):
    """One checkpoint of an SAE, measured in a study over its training: where in training it was saved, how it
    reconstructs held-out activations (its training.json), and the study's KL on it. Intervals resample whole
    contexts; kl_gap is KL(sae) − KL(baseline) paired on them."""

    path: str  # the sub-run's folder, relative to the study
    checkpoint: str  # the checkpoint's SAE folder
    step: int
    tokens_seen: int
    explained_variance: Num  # the trainer's held-out tokens (training.json)
    l0_mean: Num
    # on the study's measured tokens (the sub-run's sae_metrics), as every KL here; None: written before
    run_explained_variance: Num = None
    run_l0_mean: Num = None
    kl_sae: MeanCI
    kl_baseline: MeanCI
    kl_gap: MeanCI
    kl_ratio: RatioCI


class TrainingCurve(StrictModel):
    """One SAE's checkpoints in training order (issue 23: does the excess KL over the baseline appear early and
    persist, or grow as training trades fidelity for sparsity?); `finding` says it in one sentence."""

    site: str
    layer: int
    hook_name: str
    baseline: str
    points: list[TrainingPoint]
    finding: str


def _mean(found: dict) -> MeanCI:
    return MeanCI.model_validate(plain(found))  # NaN as null


def training_point(run: StudyRun, folder: Path, seed: int, baseline: str = BASELINE) -> TrainingPoint:
    """One checkpoint's row, from its sub-run folder (parts and report) and its SAE's training.json."""
    info = CheckpointInfo.of(run.sae.info.get("training"), Path(run.sae.source))  # as its run recorded it
    per_context = context_sums(RunDir(folder).finished_parts()[0])
    sae, base = per_context("sae", "kl"), per_context(baseline, "kl")
    comparison = run.comparisons.get(baseline)
    if comparison is None:
        raise KlgapError(f"{run.path}: a study over checkpoints needs interventions sae and {baseline}")
    return TrainingPoint(
        path=run.path, checkpoint=run.sae.source, step=info.step, tokens_seen=info.tokens_seen,
        explained_variance=info.explained_variance, l0_mean=info.l0_mean,
        run_explained_variance=run.sae_metrics.explained_variance, run_l0_mean=run.sae_metrics.l0_mean,
        kl_sae=_mean(stats.mean_ci(sae, seed=seed)), kl_baseline=_mean(stats.mean_ci(base, seed=seed)),
        kl_gap=_mean(stats.difference_of_means_ci(sae, base, seed=seed)),
        kl_ratio=RatioCI.model_validate(comparison.kl_ratio.model_dump()),
    )


def over_training(runs: list[StudyRun], folders: list[Path], seed: int) -> list[TrainingCurve]:
    """The section: one curve per (site, layer), its checkpoints in training order."""
    curves: dict[tuple[str, int], list[TrainingPoint]] = {}
    hooks: dict[tuple[str, int], str] = {}
    for run, folder in zip(runs, folders, strict=True):
        curves.setdefault((run.site, run.layer), []).append(training_point(run, folder, seed))
        hooks[(run.site, run.layer)] = run.hook_name
    out = []
    for (site, layer), points in curves.items():
        points.sort(key=lambda p: p.step)
        out.append(TrainingCurve(site=site, layer=layer, hook_name=hooks[(site, layer)], baseline=BASELINE,
                                 points=points, finding=finding(hooks[(site, layer)], points)))
    return out


def _resolved(point: TrainingPoint) -> bool:
    """The ratio's interval lies above 1: the SAE's excess KL over the baseline is resolved at this checkpoint."""
    return point.kl_ratio.ci_low is not None and point.kl_ratio.ci_low > 1


def _at(point: TrainingPoint) -> str:
    return (f"{fmt_ci(point.kl_ratio.ratio, point.kl_ratio.ci_low, point.kl_ratio.ci_high)} at step {point.step} "
            f"({point.tokens_seen:,} tokens; EV {fmt(_measured(point.run_explained_variance, point.explained_variance))}, "
            f"L0 {fmt(_measured(point.run_l0_mean, point.l0_mean))})")


def _measured(on_run: float | None, held_out: float | None) -> float | None:
    """The number on the study's tokens; the trainer's held-out one for a point written before klgap kept it."""
    return on_run if on_run is not None else held_out


def finding(hook: str, points: list[TrainingPoint]) -> str:
    """When the gap opens and where it goes, in one sentence, from the checkpoints' ratio intervals."""
    first, last = points[0], points[-1]
    opened = next((i for i, p in enumerate(points) if _resolved(p)), None)
    if opened is None:
        when = "is resolved (ratio interval above 1) at no checkpoint"
    else:
        stays = all(_resolved(p) for p in points[opened:])
        start = "from the first checkpoint on" if opened == 0 else \
            f"from step {points[opened].step} ({points[opened].tokens_seen:,} tokens) on"
        when = f"is resolved (ratio interval above 1) {start}" + ("" if stays else ", though not at every later one")
    if None in (first.kl_ratio.ci_low, first.kl_ratio.ci_high, last.kl_ratio.ci_low, last.kl_ratio.ci_high):
        trend = "the intervals are missing"
    elif last.kl_ratio.ci_low > first.kl_ratio.ci_high:
        trend = "the ratio grows (the intervals do not overlap)"
    elif last.kl_ratio.ci_high < first.kl_ratio.ci_low:
        trend = "the ratio shrinks (the intervals do not overlap)"
    else:
        trend = "the first and last intervals overlap"
    return (f"At {hook}, the SAE's excess KL over {BASELINE} {when}; KL(sae)/KL({BASELINE}) is {_at(first)} and "
            f"{_at(last)}: {trend}.")


__all__ = ["finding", "over_training", "training_point"]

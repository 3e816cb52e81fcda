"""A study over an SAE's training: every checkpoint measured on the same tokens, the "over training" section.

``klgap replicate --sae 'DIR/checkpoints/*'`` (a glob; ``{site}``/``{layer}`` may be in it) or a config's
``checkpoints = "DIR"`` key makes the checkpoints of each (site, layer) another axis of the study
(klgap/job/study.py): one sub-run per checkpoint in ``OUT/<site>_L<layer>/step-XXXXXX/``, all on the same contexts
with the same seeded draws, the clean forward of each batch shared by all of them (engine.run_shared). The
section is a pure function of the sub-runs' files: each checkpoint's step, tokens seen and held-out explained
variance / L0 (its training.json), its KL(sae), KL(baseline), their paired difference and ratio with intervals
that resample whole contexts.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from klgap.report import stats
from klgap.sae.checkpoints import CheckpointInfo, expand, is_glob
from klgap.plan.config import RunConfig
from klgap.errors import KlgapError
from klgap.render.formatting import fmt, fmt_ci
from klgap.report.schema import BASELINE, MeanCI, RatioCI, StudyReport, StudyRun, TrainingCurve, TrainingPoint


def checkpoint_spec(sae: str | None, checkpoints: str | None, trains: bool = False) -> str | None:
    """What a command measures the checkpoints of: ``--sae`` when it is a glob, or a config's ``checkpoints``
    key (an SAE folder trained with ``--checkpoints N``, which a ``[train_sae]`` table may train first); None
    for an ordinary command."""
    if checkpoints is not None:
        if not isinstance(checkpoints, str) or is_glob(checkpoints):
            raise KlgapError(f"checkpoints = {checkpoints!r}: name the SAE folder trained with --checkpoints N "
                             "(e.g. ~/.cache/klgap/saes/MODEL/blocks.{layer}.hook_{site}), not a glob")
        if sae is not None and sae != checkpoints:
            raise KlgapError(f"give the SAE as `checkpoints = {checkpoints!r}` or as --sae {sae!r}, not both")
        return os.path.expanduser(checkpoints)
    if sae is None or not is_glob(sae):
        return None
    if trains:
        raise KlgapError(f"--sae {sae!r} is a glob: a [train_sae] table trains the folder a `checkpoints = \"DIR\"` "
                         "key names; use that key instead of a glob")
    return os.path.expanduser(sae)


def checkpoint_runs(base: RunConfig, cells: list[tuple[str, int]], spec: str,
                    out: Path) -> tuple[list[RunConfig], list[Path]]:
    """One config and folder per checkpoint of each (site, layer): `spec` with ``{site}``/``{layer}`` filled in
    names them (klgap.sae.checkpoints.expand), in training order."""
    from klgap.plan.grid import sae_for

    configs, folders = [], []
    for site, layer in cells:
        filled = sae_for(spec, site, layer) if len(cells) > 1 else spec
        for found in expand(filled):
            configs.append(dataclasses.replace(base, site=site, layer=layer, sae=str(found.path)))
            folders.append(out / f"{site}_L{layer:02d}" / found.path.name)
    return configs, folders


def cells_of(spec: str, sites: list, layers: list) -> tuple[list[str], list[int]]:
    """The study's sites and layers: as given, or (none given) where the checkpoints were trained."""
    if None not in sites and None not in layers:
        return sites, layers
    first = expand(spec)[0]
    return ([first.site] if None in sites else sites), ([first.layer] if None in layers else layers)


def _mean(found: dict) -> MeanCI:
    return MeanCI.model_validate({k: (None if v != v else v) for k, v in found.items()})  # NaN as null


def training_point(run: StudyRun, folder: Path, seed: int, baseline: str = BASELINE) -> TrainingPoint:
    """One checkpoint's row, from its sub-run folder (parts and report) and its SAE's training.json."""
    from klgap.report.aggregate import context_sums
    from klgap.job.folder import RunDir

    info = CheckpointInfo.of(run.sae.info.get("training"), Path(run.sae.source))  # as its run recorded it
    per_context = context_sums(RunDir(folder).finished_parts()[0])
    sae, base = per_context("sae", "kl"), per_context(baseline, "kl")
    comparison = run.comparisons.get(baseline)
    if comparison is None:
        raise KlgapError(f"{run.path}: a study over checkpoints needs interventions sae and {baseline}")
    return TrainingPoint(
        path=run.path, checkpoint=run.sae.source, step=info.step, tokens_seen=info.tokens_seen,
        explained_variance=info.explained_variance, l0_mean=info.l0_mean,
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
            f"({point.tokens_seen:,} tokens; EV {fmt(point.explained_variance)}, L0 {fmt(point.l0_mean)})")


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


def training_blocks(report: StudyReport) -> list:
    """The section as page blocks: each SAE's finding first, then a row per checkpoint."""
    from klgap.render.blocks import Bullets, Heading, Para, Table

    curves = report.over_training or []
    blocks: list = [Bullets([c.finding for c in curves], lead=True), Heading(2, "Over training"),
                    Para(f"Every checkpoint measured on the same tokens with the same random draws (the clean forward "
                         f"shared). KL is the mean per-token KL(P_clean ‖ P_patched) in nats; gap = KL(sae) − "
                         f"KL({BASELINE}); intervals (95%) resample whole contexts. Explained variance and L0 are "
                         "the checkpoint's own, on held-out tokens of its training (training.json).")]
    for curve in curves:
        rows = [[str(p.step), f"{p.tokens_seen:,}", fmt(p.explained_variance), fmt(p.l0_mean),
                 fmt_ci(p.kl_sae.mean, p.kl_sae.ci_low, p.kl_sae.ci_high),
                 fmt_ci(p.kl_baseline.mean, p.kl_baseline.ci_low, p.kl_baseline.ci_high),
                 fmt_ci(p.kl_gap.mean, p.kl_gap.ci_low, p.kl_gap.ci_high),
                 fmt_ci(p.kl_ratio.ratio, p.kl_ratio.ci_low, p.kl_ratio.ci_high), p.path] for p in curve.points]
        blocks += [Heading(3, f"{curve.site} L{curve.layer} ({curve.hook_name})"),
                   Table(["step", "tokens seen", "EV", "L0", "KL sae", f"KL {curve.baseline}", "gap", "ratio",
                          "folder"], rows)]
    return blocks

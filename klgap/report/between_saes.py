"""A study over several SAEs of one site: how much the verdict depends on which SAE was trained (issue 32).

``klgap train-sae --seeds N --out DIR`` trains N SAEs of one recipe (DIR/seed-0, ...); ``klgap replicate --sae
'DIR/seed-*'`` (or ``klgap.measure(..., sae=[...])``) measures them on the same contexts with the same draws, the
clean forward shared (klgap/job/plan.py). SAEs whose training.json files differ in ``seed`` only are seeds of one
recipe (klgap.sae.seeds.same_recipe; no flag): the section gives each seed's KL(sae)/KL(baseline), their range, and
the recipe's ratio (the mean of the seeds') with an interval that resamples seeds *and* contexts
(klgap.report.stats.sae_context_bootstrap), and the share of its variance that comes from the seed. SAEs that differ
in architecture only (klgap.sae.seeds.architecture_only) are an architecture control: the section says so and
lists each one's ratio, pooling nothing. The section is a pure function of the runs' files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from klgap.job.folder import RunDir
from klgap.render.formatting import fmt_ci, fmt_fixed
from klgap.report import stats
from klgap.report.aggregate import context_sums
from klgap.report.numbers import finite
from klgap.report.schema import BASELINE, Num, RatioCI, StrictModel, StudyRun
from klgap.sae.seeds import architecture_only, differences, same_recipe


class SaeRatio(StrictModel):
    """One SAE of the group: its folder in the study, its SAE, what tells it apart, and its own ratio (interval over
    contexts)."""

    path: str
    sae: str
    seed: int | None
    architecture: str
    explained_variance: Num
    l0_mean: Num
    kl_ratio: RatioCI


class BetweenSaes(StrictModel):
    """Several SAEs measured at one (site, layer) that differ in their seed only (``kind: seeds``) or their
    architecture only (``architecture``).

    differ_in:   the training.json recipe keys on which they differ.
    saes:        each SAE's own ratio.
    kl_ratio:    seeds: the recipe's ratio, the mean of the seeds', with its two-level interval (seeds and contexts
                 resampled); None for an architecture control (nothing pooled).
    ratio_min, ratio_max: the range of the SAEs' ratios.
    sae_variance_share: seeds: the share of the recipe ratio's bootstrap variance that resampling seeds gives
                 (against resampling contexts): near 1, which SAE was trained decides the number."""

    site: str
    layer: int
    hook_name: str
    baseline: str
    kind: str
    differ_in: list[str]
    saes: list[SaeRatio]
    kl_ratio: RatioCI | None
    ratio_min: Num
    ratio_max: Num
    sae_variance_share: Num
    finding: str


def _sae_ratio(run: StudyRun, baseline: str) -> SaeRatio:
    training = run.sae.info["training"]
    return SaeRatio(path=run.path, sae=run.sae.source, seed=training.get("seed"),
                    architecture=str(training.get("architecture", run.sae.architecture)),
                    explained_variance=run.sae_metrics.explained_variance, l0_mean=run.sae_metrics.l0_mean,
                    kl_ratio=RatioCI.model_validate(run.comparisons[baseline].kl_ratio.model_dump()))


#: bootstrap replicates of the recipe's interval (as many as each run's own)
N_BOOT = 2000


def _ratio(means: list[np.ndarray]) -> np.ndarray:
    return means[0] / means[1]


def group(runs: list[StudyRun], folders: list[Path], seed: int, baseline: str = BASELINE) -> BetweenSaes | None:
    """One (site, layer)'s SAEs as a section entry, or None when they are neither seeds of one recipe nor an
    architecture control (or a run lacks the baseline or its SAE's training.json)."""
    trainings = [run.sae.info.get("training") for run in runs]
    seeds = same_recipe(trainings)
    if not (seeds or architecture_only(trainings)) or any(baseline not in run.comparisons for run in runs):
        return None
    saes = [_sae_ratio(run, baseline) for run in runs]
    ratios = [s.kl_ratio.ratio for s in saes if s.kl_ratio.ratio is not None]
    low, high = (min(ratios), max(ratios)) if ratios else (None, None)
    pooled, share = None, None
    if seeds:
        frames = [[sums("sae", "kl"), sums(baseline, "kl")]
                  for sums in (context_sums(RunDir(folder).finished_parts()[0]) for folder in folders)]
        found = stats.sae_context_bootstrap(frames, _ratio, n_boot=N_BOOT, seed=seed)
        if found is not None:
            pooled = RatioCI(ratio=finite(found.point), ci_low=finite(found.low), ci_high=finite(found.high),
                             n_contexts=found.n_contexts, n_boot=N_BOOT)
            share = finite(found.sae_share)
    run = runs[0]
    entry = BetweenSaes(site=run.site, layer=run.layer, hook_name=run.hook_name, baseline=baseline,
                        kind="seeds" if seeds else "architecture", differ_in=differences(trainings), saes=saes,
                        kl_ratio=pooled, ratio_min=low, ratio_max=high, sae_variance_share=share, finding="")
    return entry.model_copy(update={"finding": finding(entry)})


def between_saes(runs: list[StudyRun], folders: list[Path], seed: int) -> list[BetweenSaes] | None:
    """The section: an entry per (site, layer) measured with two or more SAEs of one recipe (or of one recipe but
    the architecture); None when there is none."""
    at: dict[tuple[str, int], list[int]] = {}
    for i, run in enumerate(runs):
        at.setdefault((run.site, run.layer), []).append(i)
    found = [group([runs[i] for i in where], [folders[i] for i in where], seed)
             for where in at.values() if len(where) > 1]
    kept = [entry for entry in found if entry is not None]
    return kept or None


def finding(entry: BetweenSaes) -> str:
    """The group in one sentence: the recipe's ratio across seeds with its two-level interval, each seed's and the
    seed's share of the variance; or, for an architecture control, each architecture's ratio."""
    each = ", ".join(f"{s.architecture if entry.kind == 'architecture' else f'seed {s.seed}'}: "
                     f"{fmt_ci(s.kl_ratio.ratio, s.kl_ratio.ci_low, s.kl_ratio.ci_high)}" for s in entry.saes)
    ratio = f"KL(sae)/KL({entry.baseline})"
    if entry.kind == "architecture":
        kinds = ", ".join(dict.fromkeys(s.architecture for s in entry.saes))
        return (f"At {entry.hook_name}, these SAEs differ in architecture only ({kinds}; same site, tokens, steps, "
                f"width and learning rate, {', '.join(entry.differ_in)} apart): {ratio} is {each}.")
    pooled = entry.kl_ratio
    if pooled is None:
        return f"At {entry.hook_name}, {len(entry.saes)} seeds of one recipe: {ratio} is {each}."
    share = "" if entry.sae_variance_share is None else (
        f"; the seed carries {fmt_fixed(100 * entry.sae_variance_share, 0)}% of the interval's variance, the "
        "contexts the rest")
    return (f"At {entry.hook_name}, across {len(entry.saes)} seeds of one recipe {ratio} is "
            f"{fmt_ci(pooled.ratio, pooled.ci_low, pooled.ci_high)} (95%, resampling seeds and contexts); each "
            f"seed alone (contexts resampled): {each}; range {fmt_fixed(entry.ratio_min)}–"
            f"{fmt_fixed(entry.ratio_max)}{share}.")


__all__ = ["BetweenSaes", "SaeRatio", "between_saes", "finding", "group"]

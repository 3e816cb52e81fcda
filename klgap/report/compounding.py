"""A joint run's "compounding" section: every site patched together against each site alone, on the same tokens.

It answers the study's bet ("multiple SAE substitution errors compound more than multiple ε-random
substitution errors") with numbers paired over contexts:

- the joint KL ratio SAE / ε-random with its context-bootstrap interval, each site's own ratio alone, and
  whether the joint ratio exceeds the largest single-site ratio (the difference, bootstrapped over contexts);
- per intervention, the joint KL against the sum of the single-site KLs: their ratio with its context-bootstrap
  interval (> 1 super-additive, < 1 sub-additive) and a Wilcoxon test on per-context means;
- what sized the baselines (``--joint-baseline``) and each site's patch sizes in the joint run, per intervention
  (the mean of its rows' ``site{k}_eps``, ... columns, klgap/job/swap.py), so the SAE's and the baselines' patches
  can be compared site by site.

A pure function of the joint run's folder (its parts and the single-site runs under ``single/``): no model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from klgap.errors import KlgapError
from klgap.job.folder import RunDir
from klgap.job.record import RECORD_FILE, SIZE_COLUMNS, SUBSETS_DIR, RunRecord, size_column
from klgap.report import stats
from klgap.report.aggregate import context_sums
from klgap.report.holm import holm_p_values
from klgap.report.parts import Parts
from klgap.report.read import load_report
from klgap.report.schema import BASELINE, InterventionStats, Num, PairedTest, RatioCI, Report, StrictModel


class Difference(StrictModel):
    """a − b with a bootstrap interval over contexts; p_value: the share of replicates with a − b ≤ 0
    (one-sided: small when a is larger)."""

    estimate: Num
    ci_low: Num
    ci_high: Num
    p_value: Num
    n_contexts: int
    n_boot: int


class CompoundingSite(StrictModel):
    """One site of a joint run measured alone, on the same tokens."""

    site: str
    layer: int
    hook_name: str
    path: str
    kl_mean: dict[str, Num]  # per intervention
    ce_delta_mean: dict[str, Num]
    kl_ratio: RatioCI | None  # sae / epsilon_random at this site alone


class Additivity(StrictModel):
    """One intervention: joint KL against the sum of its single-site KLs (per context, paired)."""

    joint_kl_mean: Num
    joint_ce_delta_mean: Num
    sum_single_kl_mean: Num
    sum_single_ce_delta_mean: Num
    joint_over_sum: RatioCI  # > 1: super-additive, < 1: sub-additive
    wilcoxon_joint_vs_sum: PairedTest
    verdict: Literal["super-additive", "sub-additive", "not distinguishable from additive"]


class PatchSize(StrictModel):
    """One site of a joint run: the mean size of each intervention's patch there, over its measured rows, in the
    joint forward (x: the activation that forward gives the site, x' its replacement)."""

    hook_name: str
    eps_mean: dict[str, Num]  # ‖x − x'‖
    x_norm_mean: dict[str, Num]  # ‖x‖
    cos_mean: dict[str, Num]  # cos(x, x')
    l0_mean: dict[str, Num]  # L0 of the SAE code whose x̂ the intervention saw (None: it saw a frozen error)


class Compounding(StrictModel):
    """A joint run's sites patched together against each alone (issue 21): does the SAE's damage compound
    more than ε-random's?"""

    sites: list[CompoundingSite]
    joint_kl_ratio: RatioCI | None  # sae / epsilon_random, every site patched
    max_single: str | None  # hook name of the site with the largest single-site ratio
    max_single_kl_ratio: Num
    joint_minus_max_single_ratio: Difference | None
    joint_ratio_larger: bool | None  # joint ratio > the largest single-site ratio (point estimates)
    additivity: dict[str, Additivity]
    subsets: list[CompoundingSubset] | None = None  # --joint-subsets: every subset of 2+ sites, by size
    #: --joint-baseline: what sized each site's baselines (matched, clean, reencoded); runs before it: reencoded
    joint_baseline: str | None = None
    patch_sizes: list[PatchSize] | None = None  # per site (forward order); None for runs that did not record them
    # Holm over the subsets table's p-values (joint − largest alone, one-sided): one per subset in `subsets`' order,
    # then the run's own (every site); None without subsets, and in reports written before klgap kept it
    subsets_p_holm: list[Num] | None = None


class CompoundingSubset(StrictModel):
    """A subset of a joint run's sites patched together in the same pass (``--joint-subsets``), with its own
    compounding section (against the same single-site runs)."""

    sites: list[str]  # hook names, in forward order
    path: str  # its folder, relative to the joint run's
    compounding: Compounding


Compounding.model_rebuild()


Sums = Callable[[str, str], pd.DataFrame]  # (intervention, column) -> per-context sum, n
N_BOOT = 2000


def _report_of(folder: Path) -> Report:
    """The report of a site alone or a subset, which the job wrote before this joint cell's (klgap/job/finish.py)."""
    report = load_report(folder)
    if not isinstance(report, Report):
        raise KlgapError(f"{str(folder)!r} holds a study, not the run of a joint run's site or subset")
    return report


def _ratio(sums: Sums, names: list[str], seed: int) -> RatioCI | None:
    if not {"sae", BASELINE} <= set(names):
        return None
    return RatioCI(**stats.ratio_of_means_ci(sums("sae", "kl"), sums(BASELINE, "kl"), seed=seed))


def summed(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Per context, the sum of the sites' mean values times the first site's token count (``sum``, ``n``): a
    frame whose mean over tokens is the sum of the single-site means."""
    joined = pd.concat([f["sum"] / f["n"] for f in frames], axis=1, join="inner")
    n = frames[0]["n"].reindex(joined.index)
    return pd.DataFrame({"sum": joined.sum(axis=1) * n, "n": n})


def ratio_difference(a: tuple[pd.DataFrame, pd.DataFrame], b: tuple[pd.DataFrame, pd.DataFrame],
                     seed: int, n_boot: int = N_BOOT, level: float = 0.95) -> Difference:
    """mean(a₀)/mean(a₁) − mean(b₀)/mean(b₁) over tokens, the bootstrap resampling whole contexts (the same
    contexts for both ratios: the runs are paired); p_value = share of replicates ≤ 0."""
    found = stats.context_bootstrap([*a, *b], lambda m: m[0] / m[1] - m[2] / m[3], n_boot, seed, level)
    return difference(found, n_boot)


def difference(found: stats.Bootstrap | None, n_boot: int) -> Difference:
    """A context bootstrap's estimate, interval and one-sided p (share of replicates ≤ 0) as a :class:`Difference`."""
    if found is None:
        return Difference(estimate=None, ci_low=None, ci_high=None, p_value=None, n_contexts=0, n_boot=n_boot)
    boots = found.replicates
    return Difference(estimate=found.point, ci_low=found.low, ci_high=found.high,
                      p_value=float((boots <= 0).mean()) if boots.size else None, n_contexts=found.n_contexts,
                      n_boot=n_boot)


def _verdict(ratio: RatioCI) -> str:
    if ratio.ci_low is not None and ratio.ci_low > 1:
        return "super-additive"
    if ratio.ci_high is not None and ratio.ci_high < 1:
        return "sub-additive"
    return "not distinguishable from additive"


def _total(values) -> float | None:
    """Sum of the sites' means; None when one of them is missing (NaN in the report)."""
    values = list(values)
    return None if any(v is None for v in values) else float(sum(values))


def compounding(record: RunRecord, rundir: RunDir, joint: dict[str, InterventionStats]) -> Compounding:
    """The compounding section of a joint run's report (`joint`: its per-intervention statistics)."""
    names, seed = record.names, record.seed
    joint_sums = context_sums(rundir.finished_parts()[0])
    sites, single_sums = [], []
    for site in record.joint or []:
        folder = rundir.root / site.path
        report = _report_of(folder)
        sums = context_sums(RunDir(folder).finished_parts()[0])
        single_sums.append(sums)
        sites.append(CompoundingSite(
            site=site.site, layer=site.layer, hook_name=site.hook_name, path=site.path,
            kl_mean={name: report.interventions[name].kl_mean for name in names},
            ce_delta_mean={name: report.interventions[name].ce_delta_mean for name in names},
            kl_ratio=_ratio(sums, names, seed)))
    joint_ratio = _ratio(joint_sums, names, seed)
    ratios = [site.kl_ratio.ratio if site.kl_ratio is not None else None for site in sites]
    finite = [(r, k) for k, r in enumerate(ratios) if r is not None and math.isfinite(r)]
    best = max(finite)[1] if finite else None
    difference = larger = None
    if best is not None and joint_ratio is not None:
        pair = lambda sums: (sums("sae", "kl"), sums(BASELINE, "kl"))  # noqa: E731
        difference = ratio_difference(pair(joint_sums), pair(single_sums[best]), seed)
        larger = bool(joint_ratio.ratio > ratios[best]) if joint_ratio.ratio is not None else None
    additivity = {}
    for name in names:
        total_kl = summed([sums(name, "kl") for sums in single_sums])
        over = RatioCI(**stats.ratio_of_means_ci(joint_sums(name, "kl"), total_kl, seed=seed))
        additivity[name] = Additivity(
            joint_kl_mean=joint[name].kl_mean, joint_ce_delta_mean=joint[name].ce_delta_mean,
            sum_single_kl_mean=_total(site.kl_mean[name] for site in sites),
            sum_single_ce_delta_mean=_total(site.ce_delta_mean[name] for site in sites),
            joint_over_sum=over,
            wilcoxon_joint_vs_sum=PairedTest(**stats.paired_wilcoxon(joint_sums(name, "kl"), total_kl)),
            verdict=_verdict(over))
    subsets = _subsets(record, rundir)
    return Compounding(
        joint_baseline=str(record.config.get("joint_baseline", "reencoded")),
        patch_sizes=patch_sizes(rundir.finished_parts()[0], [site.hook_name for site in sites], names),
        sites=sites, joint_kl_ratio=joint_ratio, max_single=sites[best].hook_name if best is not None else None,
        max_single_kl_ratio=ratios[best] if best is not None else None,
        joint_minus_max_single_ratio=difference, joint_ratio_larger=larger, additivity=additivity,
        **({"subsets": subsets, "subsets_p_holm": subsets_holm(subsets, difference)} if subsets else {}))


def subsets_holm(subsets: list[CompoundingSubset], own: Difference | None) -> list[float | None]:
    """Holm over the subsets table's one-sided p-values (each subset's joint − largest alone, then the run's own),
    as one family: the table asks the same question of every row."""
    rows = [s.compounding.joint_minus_max_single_ratio for s in subsets] + [own]
    return holm_p_values([d.p_value if d is not None else None for d in rows])


def patch_sizes(paths: list[Path], hook_names: list[str], names: list[str]) -> list[PatchSize] | None:
    """Each site's mean patch sizes per intervention from a joint run's parts (their ``site{k}_*`` columns); None
    when the parts do not hold them (a joint run measured before they were recorded)."""
    if not paths or size_column(0, "eps") not in pq.read_schema(paths[0]).names:
        return None
    columns = [size_column(k, c) for k in range(len(hook_names)) for c in SIZE_COLUMNS]
    totals: dict[tuple[str, str], list[float]] = {}  # (intervention, column) -> [sum, count] of the finite values
    for part, masks in Parts(paths).scan(columns):
        for name, mask in masks.items():
            for column in columns:
                values = part[column][mask].astype(np.float64)
                found = totals.setdefault((name, column), [0.0, 0.0])
                found[0] += float(values[np.isfinite(values)].sum())
                found[1] += float(np.isfinite(values).sum())

    def mean(name: str, column: str) -> float | None:
        total, count = totals.get((name, column), (0.0, 0.0))
        return total / count if count else None

    return [PatchSize(hook_name=hook, **{f"{column}_mean": {name: mean(name, size_column(k, column))
                                                             for name in names} for column in SIZE_COLUMNS})
            for k, hook in enumerate(hook_names)]


def _subsets(record: RunRecord, rundir: RunDir) -> list[CompoundingSubset]:
    """The compounding sections of the subsets measured with the run (``OUT/subsets/*``, klgap/job/plan.py), by
    size, then by the forward order of their sites."""
    folder = rundir.root / SUBSETS_DIR
    order = [site.hook_name for site in record.joint or []]
    found = []
    for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
        if (sub / RECORD_FILE).is_file():
            report = _report_of(sub)
            if report.compounding is not None and report.joint is not None:
                names = [site.hook_name for site in report.joint]
                found.append(CompoundingSubset(sites=names, path=f"{SUBSETS_DIR}/{sub.name}",
                                               compounding=report.compounding))
    return sorted(found, key=lambda s: (len(s.sites), [order.index(n) if n in order else -1 for n in s.sites]))


__all__ = ["Additivity", "Compounding", "CompoundingSite", "CompoundingSubset", "Difference", "PatchSize", "compounding", "difference",
           "patch_sizes", "ratio_difference", "subsets_holm", "summed"]

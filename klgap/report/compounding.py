"""A joint run's "compounding" section: every site patched together against each site alone, on the same tokens.

It answers the study's bet ("multiple SAE substitution errors compound more than multiple ε-random
substitution errors") with numbers paired over contexts:

- the joint KL ratio SAE / ε-random with its context-bootstrap interval, each site's own ratio alone, and
  whether the joint ratio exceeds the largest single-site ratio (the difference, bootstrapped over contexts);
- per intervention, the joint KL against the sum of the single-site KLs: their ratio with its context-bootstrap
  interval (> 1 super-additive, < 1 sub-additive) and a Wilcoxon test on per-context means.

A pure function of the joint run's folder (its parts and the single-site runs under ``single/``): no model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd

from klgap.report import stats
from klgap.report.aggregate import context_sums
from klgap.job.record import RunRecord
from klgap.job.folder import RunDir
from klgap.report.schema import (
    BASELINE, Additivity, Compounding, CompoundingSite, CompoundingSubset, Difference, InterventionStats, PairedTest, RatioCI, Report,
)

Sums = Callable[[str, str], pd.DataFrame]  # (intervention, column) -> per-context sum, n
N_BOOT = 2000


def _single_report(folder) -> Report:
    from klgap.job.engine import report_folder
    from klgap.report.schema import load_report

    return load_report(folder) if (folder / "report.json").is_file() else report_folder(folder)


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
    frames = [*a, *b]
    joined = pd.concat([f.add_suffix(f"_{i}") for i, f in enumerate(frames)], axis=1, join="inner")
    if joined.empty:
        return Difference(estimate=None, ci_low=None, ci_high=None, p_value=None, n_contexts=0, n_boot=n_boot)
    s = [joined[f"sum_{i}"].to_numpy() for i in range(4)]
    n = [joined[f"n_{i}"].to_numpy() for i in range(4)]

    def diff(idx: np.ndarray | slice) -> np.ndarray:
        mean = [s[i][idx].sum(-1) / n[i][idx].sum(-1) for i in range(4)]
        with np.errstate(divide="ignore", invalid="ignore"):
            return mean[0] / mean[1] - mean[2] / mean[3]

    point = float(diff(slice(None)))
    boots = np.concatenate([diff(idx) for idx in stats.bootstrap_indices(len(joined), n_boot, seed)])
    boots = boots[np.isfinite(boots)]
    alpha = (1 - level) / 2
    low, high = np.quantile(boots, [alpha, 1 - alpha]) if boots.size else (math.nan, math.nan)
    return Difference(estimate=point, ci_low=float(low), ci_high=float(high),
                      p_value=float((boots <= 0).mean()) if boots.size else None, n_contexts=len(joined), n_boot=n_boot)


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
        report = _single_report(folder)
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
    return Compounding(
        sites=sites, joint_kl_ratio=joint_ratio, max_single=sites[best].hook_name if best is not None else None,
        max_single_kl_ratio=ratios[best] if best is not None else None,
        joint_minus_max_single_ratio=difference, joint_ratio_larger=larger, additivity=additivity,
        **({"subsets": subsets} if (subsets := _subsets(record, rundir)) else {}))


def _subsets(record: RunRecord, rundir: RunDir) -> list[CompoundingSubset]:
    """The compounding sections of the subsets measured with the run (``OUT/subsets/*``, klgap/job/joint_folder.py), by
    size, then by the forward order of their sites."""
    from klgap.job.joint_folder import SUBSETS_DIR
    from klgap.job.record import RECORD_FILE

    folder = rundir.root / SUBSETS_DIR
    order = [site.hook_name for site in record.joint or []]
    found = []
    for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
        if (sub / RECORD_FILE).is_file():
            report = _single_report(sub)
            if report.compounding is not None and report.joint is not None:
                names = [site.hook_name for site in report.joint]
                found.append(CompoundingSubset(sites=names, path=f"{SUBSETS_DIR}/{sub.name}",
                                               compounding=report.compounding))
    return sorted(found, key=lambda s: (len(s.sites), [order.index(n) if n in order else -1 for n in s.sites]))


__all__ = ["compounding", "ratio_difference", "summed"]

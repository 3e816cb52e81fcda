"""Reduce a run's parts to the statistics its report holds, streaming: never the whole per-token table at once.

A pure function of the part files (``OUT/parts/batch_*.parquet``, read with pyarrow, a few columns at a time) and
plain arguments. Every number is the one the whole-frame code (klgap/report/build.py before issue 14) gave, computed from
the same values in the same order with the same operations (tests/core/test_aggregate.py):
- per-context sums (ratios, bootstrap intervals, Wilcoxon, curve intervals): pandas groupby part by part, as every
  context lives in one part;
- means, medians, 99.9th percentiles, kl_by_offset: one intervention's column at a time, as the parts hold it;
- top tokens: pandas groupby over ranges of token ids (stats.top_tokens_of); many-samples z-scores: per context.
One exception: the Spearman correlations of the per-token gap come from stats.spearman (exact integer rank sums),
not scipy's spearmanr, whose rank arrays cost ~85 bytes per token; the two agree to ~1e-15 relative
(tests/replications/test_golden.py compares them with rel=1e-12).

Memory beyond the per-context table: ~25 bytes per measured token of one intervention (a float64 column for the
percentiles; the float32 gap, its int32 ranks, one column and its sorted copy for Spearman; benchmarks/README.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from klgap.report import anisotropy, stats
from klgap.report.holm import apply_holm
from klgap.report.numbers import plain
from klgap.report.parts import ContextSums, Growing, Parts, Rows, all_hold, n_rows, part_context_sums
from klgap.report.robustness import build_curve, norm_frac_mean
from klgap.report.schema import Comparison, Curve, GapAnalysis, InterventionStats, ManySamples, MeanCI, SAEMetrics

BASELINE = "epsilon_random"
GAP_COLUMNS = ("cos", "l0", "x_norm", "eps", "position")  # what the per-token gap is correlated with
SCAN = ["context", "position", "intervention", "draw", "kl", "ce_delta"]
CLEAN_CE = "ce_clean"  # the clean run's CE of the next token, once per token (klgap/job/modes.py)



@dataclass(frozen=True)
class RunStatistics:
    """Everything a run report says about its measurement (field names as in klgap.report.schema.Report)."""

    n_tokens: int  # measured rows of the first intervention (the SAE's)
    n_contexts: int
    interventions: dict[str, InterventionStats]  # in order of first appearance in the parts
    comparisons: dict[str, Comparison]  # each baseline against "sae", p_holm across them
    kl_ratio_sae_over_epsilon_random: float
    sae_metrics: SAEMetrics
    gap: GapAnalysis | None  # None in many_samples mode or without sae and epsilon_random
    curve: Curve | None  # None in many_samples mode or without cosine_matched interventions
    kl_by_offset: dict[str, dict[str, float]] | None  # single_token: intervention -> offset -> mean KL
    many_samples: ManySamples | None
    ce_clean: MeanCI | None = None  # the clean CE per token; None for parts written before klgap kept it


def explained_variance(sides: Sequence[dict[str, Any]]) -> float:
    """1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² over the run, from the parts' side sums (n, sum_x, sum_sq_x, sum_sq_err)."""
    n = sum(s["n"] for s in sides)
    if n == 0:
        return math.nan
    sum_x = np.sum([np.asarray(s["sum_x"]) for s in sides], axis=0)
    # ‖Σx‖² exactly rounded: a BLAS dot's last bit depends on the process's state (alignment, kernels), and this
    # number is compared bit for bit (tests/replications/test_golden.py)
    total = sum(s["sum_sq_x"] for s in sides) - math.fsum((sum_x * sum_x).tolist()) / n
    return 1.0 - sum(s["sum_sq_err"] for s in sides) / total if total > 0 else math.nan


def explained_variance_legacy(sides: Sequence[dict[str, Any]]) -> float | None:
    """sae_lens's legacy explained variance: the mean over tokens of 1 − ‖xᵢ − x̂ᵢ‖² / ‖xᵢ − x̄_B‖², x̄_B the mean of
    the token's batch, from the parts' ``sum_ev_legacy`` and ``n``; None for parts written before klgap kept it."""
    n = sum(s["n"] for s in sides)
    if n == 0 or any("sum_ev_legacy" not in s for s in sides):
        return None
    return math.fsum(s["sum_ev_legacy"] for s in sides) / n


def fvu(explained: float) -> float:
    """sparsify's fraction of variance unexplained, Σ‖x − x̂‖² / Σ‖x − x̄‖², pooled over the run: 1 − EV."""
    return 1.0 - explained


def _num(value: float | None) -> float:
    return math.nan if value is None else value


def _mean(values: np.ndarray) -> float:
    """pandas' mean (NaN skipped; float32 data summed in float32, as the whole-frame code did)."""
    return float(pd.Series(values, copy=False).mean()) if values.size else math.nan


# ----------------------------------------------------------------------------- per part


def paired_rows(part: dict[str, np.ndarray], a: np.ndarray, b: np.ndarray) -> tuple[Rows, Rows]:
    """Which of a part's `a` rows and `b` rows (two interventions' masks) are the same tokens, joined on (context,
    position) as :func:`stats.token_gap` joins them: ``(rows of a, rows of b)``, to index ``part[column][mask]``;
    ``slice(None)`` twice when the two hold the same tokens in the same (increasing) order."""
    ctx, pos = part["context"], part["position"]
    ctx_a, pos_a = ctx[a], pos[a]
    increasing = np.all((ctx_a[1:] > ctx_a[:-1]) | ((ctx_a[1:] == ctx_a[:-1]) & (pos_a[1:] > pos_a[:-1])))
    if increasing and np.array_equal(ctx_a, ctx[b]) and np.array_equal(pos_a, pos[b]):
        return slice(0, ctx_a.size), slice(0, ctx_a.size)  # the join pairs row i with row i
    keys = ["context", "position"]
    left = pd.DataFrame({"i": np.arange(ctx_a.size)}, index=pd.MultiIndex.from_arrays([ctx_a, pos_a], names=keys))
    right = pd.Series(np.arange(int(b.sum())), index=pd.MultiIndex.from_arrays([ctx[b], pos[b]], names=keys), name="j")
    joined = left.join(right, how="inner")
    return joined["i"].to_numpy(), joined["j"].to_numpy()


def _part_gap(part: dict[str, np.ndarray], masks: dict[str, np.ndarray],
              baseline: str) -> tuple[np.ndarray, Rows] | None:
    """This part's per-token gap KL(sae) − KL(baseline) joined on (context, position) as :func:`stats.token_gap`,
    and which of the part's sae rows (positions among them) it holds."""
    if "sae" not in masks or baseline not in masks:
        return None
    take, other = paired_rows(part, masks["sae"], masks[baseline])
    kl = part["kl"]
    return kl[masks["sae"]][take] - kl[masks[baseline]][other], take


def part_clean_ce(part: dict[str, np.ndarray]) -> pd.DataFrame:
    """This part's clean CE per context (``sum``, ``n``, as :func:`stats.per_context`): its finite ``ce_clean``
    values, each token's once (the other rows hold NaN), summed in float64."""
    values = part[CLEAN_CE].astype(np.float64)
    finite = np.isfinite(values)
    keys, total, count = part_context_sums(values[finite], part["context"][finite])
    return pd.DataFrame({"sum": total, "n": count}, index=pd.Index(keys, name="context"))


def clean_ce(per_part: Sequence[pd.DataFrame], seed: int) -> MeanCI:
    """The run's mean clean CE over its measured tokens, with its bootstrap interval over contexts."""
    per_context = pd.concat(per_part).sort_index(kind="stable") if per_part else pd.DataFrame({"sum": [], "n": []})
    return MeanCI.model_validate(plain(stats.mean_ci(per_context, seed=seed)))


def _part_zscores(part: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Many-samples: per context of this part, the SAE's KL among the random draws (:func:`stats.zscores`)."""
    draws = part["draw"] >= 0
    if not draws.any():
        return []
    sae = masks.get("sae", np.zeros_like(draws))
    sae = pd.Series(part["kl"][sae], index=part["context"][sae])
    out = []
    for context, kl in pd.Series(part["kl"][draws]).groupby(part["context"][draws]):
        sae_kl = float(sae.loc[context])
        out.append({"context": int(context), "sae_kl": sae_kl, **stats.zscores(sae_kl, kl.to_numpy())})
    return out


# ----------------------------------------------------------------------------- the run


def _compare(sums: ContextSums, names: list[str], seed: int) -> dict[str, Comparison]:
    """For each baseline: KL and ΔCE ratios sae/baseline with context-bootstrap intervals, the paired ΔCE difference
    and the baseline's mean ΔCE with theirs, Wilcoxon; Holm within each family of the run (klgap.report.holm)."""
    out: dict[str, Comparison] = {}
    if "sae" not in names:
        return out
    sae_kl, sae_ce = sums.per_context("sae", "kl"), sums.per_context("sae", "ce_delta")
    for name in names:
        if name == "sae":
            continue
        base_kl, base_ce = sums.per_context(name, "kl"), sums.per_context(name, "ce_delta")
        out[name] = Comparison.model_validate(plain({
            "kl_ratio": stats.ratio_of_means_ci(sae_kl, base_kl, seed=seed),
            "ce_delta_ratio": stats.ratio_of_means_ci(sae_ce, base_ce, seed=seed),
            "wilcoxon_kl": stats.paired_wilcoxon(sae_kl, base_kl),
            "ce_delta_difference": stats.difference_of_means_ci(sae_ce, base_ce, seed=seed),
            "ce_delta_baseline": stats.mean_ci(base_ce, seed=seed),
        }))
    apply_holm([out])
    return out


def _gap_analysis(parts: Parts, gap: np.ndarray, take: np.ndarray | None,
                  decode: Callable[[int], str | None]) -> GapAnalysis:
    """Spearman of the gap with each of GAP_COLUMNS, and the tokens with the largest mean gap.
    take: the gap's rows among the run's sae rows, None when it holds all of them in order."""

    def sae_column(column: str) -> np.ndarray:
        values = parts.gather("sae", column)
        return values if take is None else values[take]

    gap_ranks = stats.centred_ranks(gap) if np.isfinite(gap).all() and gap.size >= 3 else None
    spearman = {column: stats.spearman(gap, sae_column(column), gap_ranks) for column in GAP_COLUMNS}
    del gap_ranks
    top = stats.top_tokens_of(sae_column("token_id"), gap)
    return GapAnalysis(
        baseline=BASELINE, gap_mean=_mean(gap), spearman=spearman,
        frac_tokens_gap_positive=float(pd.Series(gap > 0).mean()) if gap.size else math.nan,
        top_tokens=[{"token_id": int(r.token_id), "token": decode(int(r.token_id)), "mean_gap": float(r.mean_gap),
                     "count": int(r["count"])} for _, r in top.iterrows()])


def _per_intervention(parts: Parts, single_token: bool) -> tuple[dict[str, InterventionStats], dict[str, dict], dict]:
    """Per intervention, one column at a time: KL and ΔCE described (the ΔCE one also returned whole), and in
    single-token mode the mean KL per offset."""
    interventions, ce_delta, kl_by_offset = {}, {}, {}
    for name in parts.counts:
        if single_token:
            kl, offsets = parts.gather(name, "kl"), parts.gather(name, "offset")
            means = pd.Series(kl, copy=False).groupby(offsets).mean()
            kl_by_offset[name] = {str(offset): float(mean) for offset, mean in means.items()}
            del kl, offsets
        # read as float64, as describe casts them (exactly), straight into the array it partitions
        kl = stats.describe(parts.gather(name, "kl", np.float64), overwrite_input=True)
        ce = ce_delta[name] = stats.describe(parts.gather(name, "ce_delta", np.float64), overwrite_input=True)
        interventions[name] = InterventionStats(
            kl_mean=kl["mean"], kl_median=kl["median"], kl_p999=kl["p999"], ce_delta_mean=ce["mean"],
            ce_delta_median=ce["median"], ce_delta_p999=ce["p999"], n_tokens=kl["n"], n_nonfinite=kl["n_nonfinite"])
    return interventions, ce_delta, kl_by_offset


def run_statistics(part_paths: Sequence[Path], sides: Sequence[dict[str, Any]], *, names: list[str], mode: str,
                   seed: int, sample_name: str | None = None,
                   decode: Callable[[int], str | None] = lambda _: None) -> RunStatistics:
    """The report's statistics of a run from its part files (in batch order) and their side JSON.

    names: the interventions in configured order, the SAE's first; mode: all_tokens, single_token or
    many_samples; sample_name: the many-samples draws' intervention; decode(token_id): a token's text."""
    parts = Parts(part_paths)
    sums = ContextSums()
    contexts, gaps, takes, zscores, n_draws = Growing(), Growing(), [], [], 0
    with_clean, clean_sums = all_hold(parts.paths, CLEAN_CE), []
    for index, (part, masks) in enumerate(parts.scan([*SCAN, CLEAN_CE] if with_clean else SCAN)):
        sums.add(index, part, masks)
        if with_clean:
            clean_sums.append(part_clean_ce(part))
        contexts.extend(np.unique(part["context"][part["draw"] < 0]))
        if mode == "many_samples":
            zscores.extend(_part_zscores(part, masks))
            n_draws = max(n_draws, int(part["draw"].max()) + 1)
        elif (joined := _part_gap(part, masks, BASELINE)) is not None:
            gaps.extend(joined[0])
            takes.append((parts.counts["sae"] - n_rows(parts.rows[-1]["sae"]), joined[1]))  # (sae rows before, rows)
    sums.redo_as_whole_run(parts)

    interventions, ce_delta, kl_by_offset = _per_intervention(parts, mode == "single_token")
    comparisons = _compare(sums, names, seed)
    first = names[0] if names else None  # the SAE's rows: their geometry, one column at a time
    explained = explained_variance(sides)
    k_range = anisotropy.pcs_removed(sides) or (None, None)
    sae_metrics = SAEMetrics(
        explained_variance=explained, explained_variance_legacy=explained_variance_legacy(sides), fvu=fvu(explained),
        mean_offset_share=anisotropy.mean_offset_share(sides), top_pc_share=anisotropy.top_pc_share(sides),
        explained_variance_top_pc_removed=anisotropy.ev_without_top_pcs(sides, "top1"),
        explained_variance_top_pcs_removed=anisotropy.ev_without_top_pcs(sides, "topk"),
        top_pcs_removed_min=k_range[0], top_pcs_removed_max=k_range[1],
        n_nonfinite_activations=sum(s.get("n_nonfinite_acts", 0) for s in sides),
        **{f"{c}_mean": _mean(parts.gather(first, c)) for c in ("l0", "cos", "eps", "x_norm", "x_hat_norm")})

    gap = curve = None
    if mode != "many_samples":
        if {"sae", BASELINE} <= parts.counts.keys():
            in_order = all(isinstance(t, slice) for _, t in takes) and sum(n_rows(t) for _, t in takes) == parts.counts["sae"]
            take = None if in_order else np.concatenate(
                [before + (np.arange(t.start, t.stop) if isinstance(t, slice) else t) for before, t in takes])
            gap = _gap_analysis(parts, gaps.view(), take, decode)

        def sae_geometry() -> tuple[float, float] | None:
            if not parts.counts.get("sae"):
                return None
            frac = norm_frac_mean(parts.gather("sae", "x_hat_norm"), parts.gather("sae", "x_norm"))
            return _mean(parts.gather("sae", "cos")), frac

        curve = build_curve(names, kl_by_context=lambda name: sums.per_context(name, "kl"),
                            ce_delta=lambda name: ce_delta.get(name) or stats.describe(np.empty(0)),
                            sae_geometry=sae_geometry, seed=seed)

    return RunStatistics(
        n_tokens=parts.counts.get(first, 0) if first else sum(parts.counts.values()),
        n_contexts=int(np.unique(contexts.view()).size),
        interventions=interventions,
        comparisons=comparisons,
        kl_ratio_sae_over_epsilon_random=_num(comparisons[BASELINE].kl_ratio.ratio) if BASELINE in comparisons
        else math.nan,
        sae_metrics=sae_metrics,
        gap=gap,
        curve=Curve(**curve) if curve is not None else None,
        kl_by_offset=kl_by_offset if mode == "single_token" else None,
        many_samples=ManySamples(**_many_samples(zscores, n_draws, sample_name)) if mode == "many_samples" else None,
        ce_clean=clean_ce(clean_sums, seed) if with_clean else None,
    )


def _many_samples(per_context: list[dict[str, Any]], n_draws: int, sample_name: str | None) -> dict[str, Any]:
    per_context = sorted(per_context, key=lambda c: c["context"])
    zs = np.array([c["z"] for c in per_context], dtype=float)
    finite = zs[np.isfinite(zs)]
    return {
        "sample_intervention": sample_name,
        "n_draws": n_draws,
        "z_mean": float(finite.mean()) if finite.size else math.nan,
        "z_median": float(np.median(finite)) if finite.size else math.nan,
        "frac_z_above_2": float((finite > 2).mean()) if finite.size else math.nan,
        "percentile_mean": float(np.mean([c["percentile"] for c in per_context])) if per_context else math.nan,
        "per_context": per_context,
    }


def token_gaps(part_paths: Sequence[Path], baseline: str = BASELINE) -> pd.Series | None:
    """The per-token gap KL(sae) − KL(baseline) of a run, indexed by (context, position), as
    ``stats.token_gap(frame).set_index(["context", "position"])["gap"]``; None when either is missing."""
    parts = Parts(part_paths)
    gaps, contexts, positions = [], [], []
    for part, masks in parts.scan(["context", "position", "kl"]):
        if (joined := _part_gap(part, masks, baseline)) is not None:
            gaps.append(joined[0])
            contexts.append(part["context"][masks["sae"]][joined[1]])
            positions.append(part["position"][masks["sae"]][joined[1]])
    if not {"sae", baseline} <= set(parts.counts):
        return None
    index = pd.MultiIndex.from_arrays([np.concatenate(contexts), np.concatenate(positions)],
                                      names=["context", "position"])
    return pd.Series(np.concatenate(gaps), index=index, name="gap")


def measured_rows(part_paths: Sequence[Path], columns: Sequence[str]) -> Iterator[tuple[dict[str, np.ndarray],
                                                                                     dict[str, np.ndarray]]]:
    """Each part's `columns` (numpy arrays; with ``intervention`` as codes and ``draw``) and, per intervention, the
    mask of its measured rows (draw < 0), a part at a time in batch order (klgap/report/size_bins.py reads them)."""
    yield from Parts(part_paths).scan(columns)


def context_sums(part_paths: Sequence[Path]) -> Callable[[str, str], pd.DataFrame]:
    """``per_context(intervention, column)`` of a run's parts: the per-context sums and counts of KL and ΔCE its
    report's ratios are built from (klgap/report/compounding.py pairs a joint run's with its single-site runs')."""
    parts = Parts(part_paths)
    sums = ContextSums()
    for index, (part, masks) in enumerate(parts.scan(["context", *ContextSums.COLUMNS])):
        sums.add(index, part, masks)
    sums.redo_as_whole_run(parts)
    return sums.per_context

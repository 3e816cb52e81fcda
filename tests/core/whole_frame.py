"""The report statistics as klgap computed them before they streamed: from the whole per-token frame at once.

Kept as the reference that klgap.report.aggregate is checked against (tests/core/test_aggregate.py): the same numbers,
computed the simple way.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from klgap.report import stats
from klgap.report.aggregate import explained_variance  # noqa: F401  (side sums: the same formula either way)
from klgap.report.numbers import plain  # noqa: F401  (the report's JSON cleaning, used by the reference's callers)
from klgap.report.schema import BASELINE


def summarize_interventions(frame: pd.DataFrame) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    interventions = frame["intervention"]
    for name in pd.unique(interventions):  # column by column: no sub-frame of every column per intervention
        rows = (interventions == name).to_numpy()
        kl, ce = stats.describe(frame["kl"].to_numpy()[rows]), stats.describe(frame["ce_delta"].to_numpy()[rows])
        out[str(name)] = {
            "kl_mean": kl["mean"],
            "kl_median": kl["median"],
            "kl_p999": kl["p999"],
            "ce_delta_mean": ce["mean"],
            "ce_delta_median": ce["median"],
            "ce_delta_p999": ce["p999"],
            "n_tokens": kl["n"],
            "n_nonfinite": kl["n_nonfinite"],
        }
    return out


def compare_to_sae(frame: pd.DataFrame, names: list[str], seed: int) -> dict[str, Any]:
    """For each baseline: ratio mean KL(sae)/KL(baseline) (and ΔCE) with context-bootstrap CIs, Wilcoxon."""
    out: dict[str, Any] = {}
    if "sae" not in names:
        return out
    sae_kl = stats.per_context(frame, "sae", "kl")
    sae_ce = stats.per_context(frame, "sae", "ce_delta")
    for name in names:
        if name == "sae":
            continue
        base_kl = stats.per_context(frame, name, "kl")
        out[name] = {
            "kl_ratio": stats.ratio_of_means_ci(sae_kl, base_kl, seed=seed),
            "ce_delta_ratio": stats.ratio_of_means_ci(sae_ce, stats.per_context(frame, name, "ce_delta"), seed=seed),
            "wilcoxon_kl": stats.paired_wilcoxon(sae_kl, base_kl),
            "ce_delta_difference": stats.difference_of_means_ci(
                sae_ce, stats.per_context(frame, name, "ce_delta"), seed=seed),
            "ce_delta_baseline": stats.mean_ci(stats.per_context(frame, name, "ce_delta"), seed=seed),
        }
    return out


def add_holm(comparisons: dict[str, Any]) -> None:
    """Holm-correct the Wilcoxon p-values of one run within each family: a named baseline alone, the
    cosine_matched curve points together."""
    from klgap.report.holm import describe

    curve = [n for n in comparisons if n.startswith("cosine_matched")]
    for family, names in [(n, [n]) for n in comparisons if n not in curve] + ([("cosine_matched", curve)] if curve else []):
        adjusted = stats.holm([comparisons[n]["wilcoxon_kl"]["p_value"] for n in names])
        size = sum(1 for p in adjusted if p == p)
        for name, p in zip(names, adjusted, strict=True):
            comparisons[name]["wilcoxon_kl"].update(p_holm=p, holm_family=describe(family, size, 1),
                                                    holm_family_size=size)


def gap_analysis(frame: pd.DataFrame, tokenizer: Any) -> dict[str, Any] | None:
    """Spearman correlations of the per-token gap KL(sae) − KL(epsilon_random), and the top tokens by gap."""
    names = set(frame["intervention"].unique())
    if not {"sae", BASELINE} <= names:
        return None
    gaps = stats.token_gap(frame, BASELINE)
    top = stats.top_tokens(gaps)
    decode = (lambda i: tokenizer.decode([int(i)])) if tokenizer is not None else (lambda i: None)
    return {
        "baseline": BASELINE,
        "gap_mean": float(gaps["gap"].mean()) if len(gaps) else math.nan,
        "frac_tokens_gap_positive": float((gaps["gap"] > 0).mean()) if len(gaps) else math.nan,
        "spearman": stats.gap_correlations(gaps),
        "top_tokens": [
            {"token_id": int(r.token_id), "token": decode(r.token_id), "mean_gap": float(r.mean_gap), "count": int(r["count"])}
            for _, r in top.iterrows()
        ],
    }


def many_samples_summary(frame: pd.DataFrame, sample_name: str) -> dict[str, Any]:
    draws = frame[frame["draw"] >= 0]
    sae = frame[(frame["draw"] < 0) & (frame["intervention"] == "sae")].set_index("context")["kl"]
    per_context = []
    for context, rows in draws.groupby("context"):
        z = stats.zscores(float(sae.loc[context]), rows["kl"].to_numpy())
        per_context.append({"context": int(context), "sae_kl": float(sae.loc[context]), **z})
    zs = np.array([c["z"] for c in per_context], dtype=float)
    finite = zs[np.isfinite(zs)]
    return {
        "sample_intervention": sample_name,
        "n_draws": int(draws["draw"].max() + 1) if len(draws) else 0,
        "z_mean": float(finite.mean()) if finite.size else math.nan,
        "z_median": float(np.median(finite)) if finite.size else math.nan,
        "frac_z_above_2": float((finite > 2).mean()) if finite.size else math.nan,
        "percentile_mean": float(np.mean([c["percentile"] for c in per_context])) if per_context else math.nan,
        "per_context": per_context,
    }

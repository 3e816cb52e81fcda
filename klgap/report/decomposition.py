"""The report's error-decomposition section: where the KL gap lies, in the linear or the nonlinear part of the
SAE's error (Engels et al. 2024, arXiv 2410.14670; issue 19).

A pure function of a run's parts, as the rest of the report: the per-token columns ``eps``, ``eps_lin`` and
``eps_nl`` (``‖e‖``, ``‖e_lin‖``, ``‖e_nl‖``, written when a run holds an :class:`klgap.protocols.ErrorSplitter`),
the parts' side sums (the centred R²) and the per-context KL sums of the interventions. One function per fact:

- :func:`r2`:             1 − Σ‖e_nl‖² / Σ‖e‖² over the measured tokens (the fraction of ‖e‖² e_lin explains),
                          its interval a context bootstrap of that ratio of sums (stats.ratio_of_means_ci);
- :func:`r2_centred`:     1 − Σ‖e_nl − ē_nl‖² / Σ‖e − ē‖² (the fraction of the error's variance), from the side sums;
- :func:`lin_norm_frac`:  mean over tokens of ‖e_lin‖ / ‖e‖ (stats.mean_ci);
- :func:`sq_shares`:      Σ‖e_lin‖²/Σ‖e‖², Σ‖e_nl‖²/Σ‖e‖² and the cross term 2Σ e_lin·e_nl/Σ‖e‖² (the three sum to 1),
                          each with a context-bootstrap interval;
- :func:`r2_dims`:        Engels et al.'s R² of the linear prediction of e: per dimension 1 − Σ e_nl,d² / Σ (e_d − ē_d)²,
                          averaged unweighted over dimensions (their utils.calculate_r_squared), from the side sums;
- :func:`r2_norm`:        Engels et al.'s "most of the norm": the R² of a linear prediction of ‖e‖² from x (fitted on
                          the fit tokens as e_lin is, with an intercept), on the measured tokens, from the side sums;
- :func:`error_part`:     one intervention against its twin: KLs, ratio, Wilcoxon, paired excess, and the share of
                          the SAE's excess KL over epsilon_random that is left with only this part of the error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from klgap.report import stats
from klgap.report.numbers import finite, plain
from klgap.report.schema import BASELINE, MeanCI, Num, PairedTest, RatioCI, StrictModel


class ErrorPart(StrictModel):
    """One part of the SAE's error left alone (the other added back to x̂) against its random twin: a random error
    of the same per-token norm. Intervals are bootstraps over whole contexts; the test pairs per-context means."""

    intervention: str  # sae_plus_linear_error (the nonlinear part kept) or sae_plus_nonlinear_error
    twin: str  # epsilon_random_nonlinear / epsilon_random_linear
    kept: Literal["linear", "nonlinear"]  # the part of the error x' still holds
    kl: MeanCI  # mean KL of the intervention
    twin_kl: MeanCI
    kl_ratio: RatioCI  # KL(intervention) / KL(twin)
    wilcoxon_kl: PairedTest  # intervention vs twin (uncorrected p)
    excess: MeanCI  # KL(intervention) − KL(twin), paired over contexts
    excess_left: RatioCI | None  # excess / (KL(sae) − KL(epsilon_random)); None without sae and epsilon_random


class ErrorDecomposition(StrictModel):
    """The SAE's error e = x − x̂ split into e_lin = W x + b (ridge least squares on the fit tokens) and e_nl = e − e_lin
    (Engels et al. 2024), measured on the run's tokens (klgap/report/decomposition.py)."""

    fit_source: str  # which tokens W, b were fitted on
    held_out: bool  # fitted on tokens apart from the measured ones (--fit-tokens)
    n_fit_tokens: int | None
    r2: MeanCI  # 1 − Σ‖e_nl‖² / Σ‖e‖² over the measured tokens: the fraction of ‖e‖² the linear part explains
    r2_centred: Num  # 1 − Σ‖e_nl − ē_nl‖² / Σ‖e − ē‖²: the fraction of the error's variance explained
    lin_norm_frac: MeanCI  # mean over tokens of ‖e_lin‖ / ‖e‖ (tokens with ‖e‖ > 0)
    # Σ‖e_lin‖²/Σ‖e‖², Σ‖e_nl‖²/Σ‖e‖² and 2Σ e_lin·e_nl/Σ‖e‖²: the split of Σ‖e‖² (they sum to 1); None: written before
    lin_sq_share: MeanCI | None = None
    nl_sq_share: MeanCI | None = None
    cross_share: MeanCI | None = None
    # Engels et al.'s definitions (their released code): the per-dimension R² of e_lin averaged unweighted over
    # dimensions, and the R² of a linear prediction of ‖e‖² from x ("most of the norm"); None: written before
    r2_dims: Num | None = None
    r2_norm: Num | None = None
    sae_excess: MeanCI | None  # KL(sae) − KL(epsilon_random), paired; None without both
    parts: list[ErrorPart]


#: intervention -> (its random twin at the same per-token norm, the part of the error it keeps)
PARTS: dict[str, tuple[str, Literal["linear", "nonlinear"]]] = {
    "sae_plus_linear_error": ("epsilon_random_nonlinear", "nonlinear"),
    "sae_plus_nonlinear_error": ("epsilon_random_linear", "linear"),
}
#: every intervention of the decomposition: one of them in a run writes the eps_lin / eps_nl columns
INTERVENTIONS = (*PARTS, *(twin for twin, _ in PARTS.values()))
NORM_COLUMNS = ("eps", "eps_lin", "eps_nl")

PerContext = Callable[[str, str], pd.DataFrame]  # (intervention, column) -> per-context sum, n


def norm_sums(paths: Sequence[Path], intervention: str) -> pd.DataFrame | None:
    """Per context, over `intervention`'s measured rows: n and the sums of ‖e‖², ‖e_nl‖², ‖e_lin‖², the cross term
    ‖e‖² − ‖e_lin‖² − ‖e_nl‖² = 2 e_lin·e_nl, and ‖e_lin‖/‖e‖ (tokens with ‖e‖ > 0: n_frac of them). None when the
    parts lack the eps_lin / eps_nl columns."""
    frames = []
    for path in paths:
        with pq.ParquetFile(path) as part:
            if not set(NORM_COLUMNS) <= set(part.schema_arrow.names):
                return None
            table = part.read(columns=["context", "intervention", "draw", *NORM_COLUMNS], use_threads=False)
        frame = table.to_pandas()
        frame = frame[(frame["intervention"] == intervention) & (frame["draw"] < 0)]
        eps, eps_nl = frame["eps"].to_numpy(np.float64), frame["eps_nl"].to_numpy(np.float64)
        eps_lin = frame["eps_lin"].to_numpy(np.float64)
        ok = np.isfinite(eps) & np.isfinite(eps_nl) & np.isfinite(eps_lin)
        positive = ok & (eps > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(positive, eps_lin / eps, 0.0)
        sq, sq_lin, sq_nl = (np.where(ok, v**2, 0.0) for v in (eps, eps_lin, eps_nl))
        frames.append(pd.DataFrame({
            "context": frame["context"].to_numpy(), "n": ok.astype(np.int64), "sq": sq, "sq_nl": sq_nl,
            "sq_lin": sq_lin, "sq_cross": sq - sq_lin - sq_nl, "frac": frac, "n_frac": positive.astype(np.int64)}))
    if not frames:
        return None
    return pd.concat(frames, ignore_index=True).groupby("context").sum().sort_index()


def _sum_n(sums: pd.DataFrame, total: str, count: str) -> pd.DataFrame:
    """The ``sum``, ``n`` frame stats' interval functions take, from two columns of :func:`norm_sums`."""
    return pd.DataFrame({"sum": sums[total], "n": sums[count]})


def r2(sums: pd.DataFrame, seed: int) -> MeanCI:
    """1 − Σ‖e_nl‖² / Σ‖e‖² over the measured tokens, with the context-bootstrap interval of the ratio (flipped)."""
    ratio = stats.ratio_of_means_ci(_sum_n(sums, "sq_nl", "n"), _sum_n(sums, "sq", "n"), seed=seed)
    return MeanCI(mean=finite(1.0 - ratio["ratio"]), ci_low=finite(1.0 - ratio["ci_high"]),
                  ci_high=finite(1.0 - ratio["ci_low"]), n_contexts=ratio["n_contexts"], n_boot=ratio.get("n_boot"))


def share(sums: pd.DataFrame, part: str, seed: int) -> MeanCI:
    """Σ `part` / Σ‖e‖² over the measured tokens (`part` a column of :func:`norm_sums`: sq_lin, sq_nl, sq_cross),
    with the context-bootstrap interval of that ratio of sums."""
    ratio = stats.ratio_of_means_ci(_sum_n(sums, part, "n"), _sum_n(sums, "sq", "n"), seed=seed)
    return MeanCI(mean=finite(ratio["ratio"]), ci_low=finite(ratio["ci_low"]), ci_high=finite(ratio["ci_high"]),
                  n_contexts=ratio["n_contexts"], n_boot=ratio.get("n_boot"))


def sq_shares(sums: pd.DataFrame, seed: int) -> tuple[MeanCI, MeanCI, MeanCI]:
    """(Σ‖e_lin‖², Σ‖e_nl‖², 2Σ e_lin·e_nl) each over Σ‖e‖²: how Σ‖e‖² splits between the parts (they sum to 1)."""
    return share(sums, "sq_lin", seed), share(sums, "sq_nl", seed), share(sums, "sq_cross", seed)


def r2_dims(sides: Sequence[dict[str, Any]]) -> float:
    """Mean over dimensions d (unweighted) of 1 − Σ e_nl,d² / Σ (e_d − ē_d)², as Engels et al.'s released code
    computes the R² of a linear prediction of e (utils.calculate_r_squared: the residual uncentred, the target
    centred per dimension), from the parts' side sums; dimensions whose error does not vary are left out. NaN when a
    part lacks the sums or no dimension varies."""
    keys = ("sum_err", "sum_sq_err_dims", "sum_sq_err_nl_dims")
    if not sides or not all(all(k in s for k in keys) for s in sides):
        return math.nan
    n = sum(s["n"] for s in sides)
    if n == 0:
        return math.nan
    sum_err, sq, sq_nl = (np.sum([np.asarray(s[k], dtype=np.float64) for s in sides], axis=0) for k in keys)
    total = sq - sum_err**2 / n  # [d]
    varies = total > 0
    return float(np.mean(1.0 - sq_nl[varies] / total[varies])) if varies.any() else math.nan


def r2_norm(sides: Sequence[dict[str, Any]]) -> float:
    """1 − Σ (‖e‖² − p)² / Σ (‖e‖² − mean ‖e‖²)² over the measured tokens, p the splitter's linear prediction of ‖e‖²
    from x (klgap.protocols.ErrorNormPredictor): Engels et al.'s "most of the norm". NaN when a part lacks the sums."""
    keys = ("sum_sq_err", "sum_err_sq_sq", "sum_err_sq_resid_sq")
    if not sides or not all(all(k in s for k in keys) for s in sides):
        return math.nan
    n = sum(s["n"] for s in sides)
    total_sq, total_sq_sq, resid = (math.fsum(s[k] for s in sides) for k in keys)
    spread = total_sq_sq - total_sq**2 / n if n else 0.0
    return 1.0 - resid / spread if spread > 0 else math.nan


def r2_centred(sides: Sequence[dict[str, Any]]) -> float:
    """1 − Σ‖e_nl − ē_nl‖² / Σ‖e − ē‖² from the parts' side sums (n, sum_err, sum_sq_err, sum_err_nl, sum_sq_err_nl);
    NaN when a part lacks them."""
    if not sides or not all("sum_err_nl" in s for s in sides):
        return math.nan
    n = sum(s["n"] for s in sides)
    sum_err = np.sum([np.asarray(s["sum_err"]) for s in sides], axis=0)
    sum_nl = np.sum([np.asarray(s["sum_err_nl"]) for s in sides], axis=0)
    total = sum(s["sum_sq_err"] for s in sides) - float(sum_err @ sum_err) / n if n else 0.0
    left = sum(s["sum_sq_err_nl"] for s in sides) - float(sum_nl @ sum_nl) / n if n else 0.0
    return 1.0 - left / total if total > 0 else math.nan


def lin_norm_frac(sums: pd.DataFrame, seed: int) -> MeanCI:
    """Mean over tokens of ‖e_lin‖ / ‖e‖, with a context-bootstrap interval."""
    return MeanCI.model_validate(plain(stats.mean_ci(_sum_n(sums, "frac", "n_frac"), seed=seed)))


def paired_difference(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Per context, ``sum`` = n_a·(mean_a − mean_b) and ``n`` = n_a on the contexts both hold: a frame whose
    ratio-of-means is the mean paired difference a − b (what stats.ratio_of_means_ci takes)."""
    joined = a.add_suffix("_a").join(b.add_suffix("_b"), how="inner")
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = joined["sum_a"] / joined["n_a"] - joined["sum_b"] / joined["n_b"]
    return pd.DataFrame({"sum": (joined["n_a"] * diff).fillna(0.0), "n": joined["n_a"]})


def sae_excess(per_context: PerContext, names: Sequence[str], seed: int) -> MeanCI | None:
    """KL(sae) − KL(epsilon_random), paired over contexts; None unless both were measured."""
    if not {"sae", BASELINE} <= set(names):
        return None
    return MeanCI.model_validate(plain(stats.difference_of_means_ci(
        per_context("sae", "kl"), per_context(BASELINE, "kl"), seed=seed)))


def error_part(per_context: PerContext, names: Sequence[str], intervention: str, seed: int) -> ErrorPart | None:
    """`intervention` against its twin (:data:`PARTS`); None unless both were measured."""
    twin, kept = PARTS[intervention]
    if not {intervention, twin} <= set(names):
        return None
    kl, twin_kl = per_context(intervention, "kl"), per_context(twin, "kl")
    excess_left = None
    if {"sae", BASELINE} <= set(names):
        excess_left = RatioCI.model_validate(plain(stats.ratio_of_means_ci(
            paired_difference(kl, twin_kl), paired_difference(per_context("sae", "kl"), per_context(BASELINE, "kl")),
            seed=seed)))
    return ErrorPart(
        intervention=intervention, twin=twin, kept=kept,
        kl=MeanCI.model_validate(plain(stats.mean_ci(kl, seed=seed))),
        twin_kl=MeanCI.model_validate(plain(stats.mean_ci(twin_kl, seed=seed))),
        kl_ratio=RatioCI.model_validate(plain(stats.ratio_of_means_ci(kl, twin_kl, seed=seed))),
        wilcoxon_kl=PairedTest.model_validate(plain(stats.paired_wilcoxon(kl, twin_kl))),
        excess=MeanCI.model_validate(plain(stats.difference_of_means_ci(kl, twin_kl, seed=seed))),
        excess_left=excess_left)


def error_decomposition(paths: Sequence[Path], sides: Sequence[dict[str, Any]], names: Sequence[str],
                        per_context: PerContext, seed: int, fitted: dict[str, Any],
                        fit_tokens: int | None) -> ErrorDecomposition | None:
    """The section of a run whose parts hold the eps_lin / eps_nl columns; None for any other run.

    names: the run's interventions; per_context: their per-context KL sums (klgap.report.aggregate.context_sums);
    fitted: run.json's execution["fitted"] (which tokens each fitted intervention saw); fit_tokens: --fit-tokens."""
    present = [name for name in INTERVENTIONS if name in names]
    if not present:
        return None
    sums = norm_sums(paths, present[0])
    if sums is None:
        return None
    fit = fitted.get(present[0], {})
    lin_sq, nl_sq, cross = sq_shares(sums, seed)
    return ErrorDecomposition(
        fit_source=str(fit.get("source", "unknown")), held_out=fit_tokens is not None,
        n_fit_tokens=fit.get("n_activations"),
        r2=r2(sums, seed), r2_centred=finite(r2_centred(sides)), lin_norm_frac=lin_norm_frac(sums, seed),
        lin_sq_share=lin_sq, nl_sq_share=nl_sq, cross_share=cross, r2_dims=finite(r2_dims(sides)),
        r2_norm=finite(r2_norm(sides)),
        sae_excess=sae_excess(per_context, names, seed),
        parts=[p for name in PARTS if (p := error_part(per_context, names, name, seed)) is not None])

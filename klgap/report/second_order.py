"""The report's second_order section (``--second-order``, issue 37): each intervention's measured KL against its
second-order prediction ½ δᵀFδ, the ratios SAE / baseline the prediction gives, and the site's Fisher sensitivity.

A pure function of a run's parts: the per-token ``kl`` and ``kl_second_order`` columns and the parts' ``fisher``
side sums (klgap/job/second_order.py writes both). Every figure is a ratio of means over tokens or contexts with a
bootstrap interval that resamples whole contexts (:func:`klgap.report.stats.context_bootstrap`):

- per intervention: mean measured KL, mean predicted KL, measured / predicted (≈ 1 where the regime is quadratic,
  < 1 where the KL saturates);
- per baseline: KL(sae) / KL(baseline), measured and predicted;
- sensitivity, with F_c each context's Fisher with respect to the site's activations at its patched positions
  (N_c coordinates): ``isotropic`` = Σ tr F_c / Σ N_c (what isotropic noise of unit variance per coordinate sees,
  tr(F)/d per position), ``covariance`` = Σ tr(F_c Σ_x) / Σ tr(Σ_x) per patched position, ``sae_error`` = Σ δᵀF_cδ /
  Σ ‖δ‖² (the SAE error's Rayleigh quotient), their ratios (``sae_vs_isotropic``: "the SAE error sits 3.1× more in
  the model's sensitive directions than isotropic noise"), and ``top_share`` = Σ ‖V_cᵀδ‖² / Σ ‖δ‖², the share of
  the error's energy in F_c's top-k eigendirections V_c, beside ``top_share_isotropic`` = k / N_c (an isotropic
  error's expected share).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from klgap.report import stats
from klgap.report.numbers import finite, plain
from klgap.report.schema import MeanCI, Num, RatioCI, StrictModel

COLUMN = "kl_second_order"


class PredictedKL(StrictModel):
    """One intervention: its mean measured KL and mean second-order prediction over the same tokens."""

    intervention: str
    measured: MeanCI
    predicted: MeanCI
    measured_over_predicted: RatioCI  # ≈ 1 in the quadratic regime; < 1 where KL saturates


class PredictedRatio(StrictModel):
    """KL(sae) / KL(baseline), measured and as the second-order prediction gives it."""

    baseline: str
    measured: RatioCI
    predicted: RatioCI


class Sensitivity(StrictModel):
    """The site's Fisher sensitivity (klgap/job/second_order.py defines F_c; the module docstring each figure)."""

    probes: int  # Hutchinson probes per context, of each kind
    top_k: int  # eigendirections per context
    lanczos_steps: int
    tolerance: float  # a top pair converged when ‖F v − θ v‖ ≤ tolerance · θ_1
    converged: Num  # share of the top pairs that converged
    isotropic: MeanCI  # tr(F)/N: Rayleigh quotient of isotropic noise
    covariance: RatioCI  # tr(F Σ_x)/tr(Σ_x): of covariance-shaped noise
    sae_error: RatioCI  # δᵀFδ/‖δ‖² of the SAE's error δ = x̂ − x
    sae_vs_isotropic: RatioCI
    sae_vs_covariance: RatioCI
    top_share: RatioCI  # share of ‖δ‖² in F's top-k eigendirections
    top_share_isotropic: Num  # k / N: an isotropic error's expected share
    top_eigenvalues: list[Num]  # the i-th largest eigenvalue, mean over contexts


class SecondOrder(StrictModel):
    """Measured against predicted KL (½ (Jδ)ᵀ(diag p − ppᵀ)(Jδ) per token) and the site's Fisher sensitivity."""

    interventions: list[PredictedKL]
    ratios: list[PredictedRatio]  # the SAE over each baseline; empty without an ``sae`` intervention
    sensitivity: Sensitivity | None


def per_context_sums(paths: Sequence[Path]) -> dict[tuple[str, str], pd.DataFrame] | None:
    """(intervention, kl | kl_second_order) -> per-context ``sum`` and ``n`` over the rows where both are finite,
    a part at a time; None when the parts lack the predicted column."""
    found: dict[tuple[str, str], list[pd.DataFrame]] = {}
    for path in paths:
        with pq.ParquetFile(path) as part:
            if COLUMN not in part.schema_arrow.names:
                return None
            frame = part.read(columns=["context", "intervention", "draw", "kl", COLUMN], use_threads=False).to_pandas()
        frame = frame[(frame["draw"] < 0) & np.isfinite(frame["kl"]) & np.isfinite(frame[COLUMN])]
        for name, rows in frame.groupby("intervention", observed=True):
            for column in ("kl", COLUMN):
                grouped = rows.groupby("context")[column]
                found.setdefault((str(name), column), []).append(pd.DataFrame({"sum": grouped.sum(),
                                                                                "n": grouped.count()}))
    if not found:
        return None
    return {key: pd.concat(frames).groupby(level=0).sum().sort_index() for key, frames in found.items()}


def _mean(frame: pd.DataFrame, seed: int) -> MeanCI:
    return MeanCI.model_validate(plain(stats.mean_ci(frame, seed=seed)))


def _ratio(frames: list[pd.DataFrame], statistic: Callable[[list[np.ndarray]], np.ndarray], seed: int) -> RatioCI:
    found = stats.context_bootstrap(frames, statistic, seed=seed, dtype=np.float64)
    if found is None:
        return RatioCI(ratio=None, ci_low=None, ci_high=None, n_contexts=0)
    return RatioCI(ratio=finite(found.point), ci_low=finite(found.low), ci_high=finite(found.high),
                   n_contexts=found.n_contexts, n_boot=len(found.replicates))


def _over(m: list[np.ndarray]) -> np.ndarray:
    return m[0] / m[1]


def _first(m: list[np.ndarray]) -> np.ndarray:
    return m[0]


def fisher_table(sides: Sequence[dict[str, Any]]) -> pd.DataFrame | None:
    """The parts' ``fisher`` side sums as one row per context; None when a part has none."""
    if not sides or any("fisher" not in side for side in sides):
        return None
    rows = []
    for side in sides:
        fisher = side["fisher"]
        for i, context in enumerate(fisher["context"]):
            rows.append({"context": context, **{key: fisher[key][i] for key in (
                "n_coords", "tr_f", "cov_num", "cov_den", "sae_num", "sae_den", "top_num", "converged")},
                "top_values": fisher["top_values"][i]})
    return pd.DataFrame(rows).set_index("context").sort_index() if rows else None


def _sum_n(table: pd.DataFrame, total: str, count: str) -> pd.DataFrame:
    return pd.DataFrame({"sum": table[total].astype(np.float64), "n": table[count].astype(np.float64)})


def sensitivity(sides: Sequence[dict[str, Any]], seed: int) -> Sensitivity | None:
    """The sensitivity figures from the parts' side sums (klgap/job/second_order.py); None without them."""
    table = fisher_table(sides)
    if table is None:
        return None
    fisher = sides[0]["fisher"]
    iso, cov = _sum_n(table, "tr_f", "n_coords"), _sum_n(table, "cov_num", "cov_den")
    sae, top = _sum_n(table, "sae_num", "sae_den"), _sum_n(table, "top_num", "sae_den")
    k = int(fisher["top_k"])
    values = np.array(table["top_values"].tolist(), dtype=np.float64)  # [contexts k]
    return Sensitivity(
        probes=int(fisher["probes"]), top_k=k, lanczos_steps=int(fisher["lanczos_steps"]),
        tolerance=float(fisher["tolerance"]), converged=finite(table["converged"].sum() / (k * len(table))),
        isotropic=_mean(iso, seed), covariance=_ratio([cov], _first, seed),
        sae_error=_ratio([sae], _first, seed),
        sae_vs_isotropic=_ratio([sae, iso], _over, seed), sae_vs_covariance=_ratio([sae, cov], _over, seed),
        top_share=_ratio([top], _first, seed),
        top_share_isotropic=finite(float(np.mean(k / table["n_coords"].to_numpy(np.float64)))),
        top_eigenvalues=[finite(v) for v in values.mean(0)])


def second_order(paths: Sequence[Path], sides: Sequence[dict[str, Any]], names: Sequence[str],
                 seed: int) -> SecondOrder | None:
    """The section of a run measured with --second-order; None for any other run."""
    sums = per_context_sums(paths)
    if sums is None:
        return None
    present = [name for name in names if (name, "kl") in sums]
    interventions = [PredictedKL(
        intervention=name, measured=_mean(sums[name, "kl"], seed), predicted=_mean(sums[name, COLUMN], seed),
        measured_over_predicted=_ratio([sums[name, "kl"], sums[name, COLUMN]], _over, seed)) for name in present]
    ratios = [] if "sae" not in present else [PredictedRatio(
        baseline=name, measured=_ratio([sums["sae", "kl"], sums[name, "kl"]], _over, seed),
        predicted=_ratio([sums["sae", COLUMN], sums[name, COLUMN]], _over, seed))
        for name in present if name != "sae"]
    return SecondOrder(interventions=interventions, ratios=ratios, sensitivity=sensitivity(sides, seed))


__all__ = ["COLUMN", "PredictedKL", "PredictedRatio", "SecondOrder", "Sensitivity", "fisher_table",
           "per_context_sums", "second_order", "sensitivity"]

"""Statistics over contexts (tokens in one context are not independent, contexts are)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import special
from scipy import stats as sps


def describe(values: np.ndarray, overwrite_input: bool = False) -> dict[str, float | int]:
    """Mean, median and 99.9th percentile of the finite values, with counts of both kinds (in float64).

    overwrite_input: the caller's float64 `values` may be reordered in place (spares a copy)."""
    values = np.asarray(values)
    owned = overwrite_input or values.dtype != np.float64  # a cast copies: partition that copy in place
    values = values.astype(np.float64, copy=False)
    ok = np.isfinite(values)
    finite = (values if owned else values.copy()) if ok.all() else values[ok]
    del ok
    if finite.size == 0:
        return {"mean": math.nan, "median": math.nan, "p999": math.nan, "n": 0, "n_nonfinite": int(values.size)}
    mean = float(finite.mean())  # before partitioning: the pairwise sum follows the values' order
    return {
        "mean": mean,
        "median": float(np.median(finite, overwrite_input=True)),  # order statistics: same values in any order
        "p999": float(np.quantile(finite, 0.999, overwrite_input=True)),
        "n": int(finite.size),
        "n_nonfinite": int(values.size - finite.size),
    }


def per_context(frame: pd.DataFrame, intervention: str, column: str) -> pd.DataFrame:
    """Sum and count of the finite `column` per context for one intervention: columns sum, n."""
    rows = frame.loc[frame["intervention"] == intervention, ["context", column]]
    values = rows[column].where(np.isfinite(rows[column]))
    grouped = values.groupby(rows["context"])
    return pd.DataFrame({"sum": grouped.sum(min_count=1).fillna(0.0), "n": grouped.count()})


BOOT_CHUNK = 100  # bootstrap replicates drawn at once (even: the draws equal one (n_boot, n) call's)


def bootstrap_indices(n: int, n_boot: int, seed: int):
    """Context indices of `n_boot` bootstrap resamples of `n` contexts, ``[chunk n]`` int32 at a time: the same
    numbers as ``default_rng(seed).integers(0, n, (n_boot, n))``, without holding n_boot × n of them."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, BOOT_CHUNK):
        yield rng.integers(0, n, size=(min(BOOT_CHUNK, n_boot - start), n), dtype=np.int32)


@dataclass(frozen=True)
class Bootstrap:
    """A statistic of per-context sums with its bootstrap interval over whole contexts: the point estimate, the
    interval, the contexts every frame holds, and the finite replicates."""

    point: float
    low: float
    high: float
    n_contexts: int
    replicates: np.ndarray


def context_bootstrap(frames: Sequence[pd.DataFrame], statistic: Callable[[list[np.ndarray]], np.ndarray],
                      n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                      dtype: type | None = None) -> Bootstrap | None:
    """The one bootstrap over contexts: `frames` (per-context ``sum`` and ``n``, :func:`per_context`) joined on the
    contexts they all hold, each resample drawing the same whole contexts for every frame (paired);
    ``statistic(means)`` of each frame's mean over the drawn contexts' tokens (``[replicates]`` arrays, or scalars
    for the point estimate). None when no context is shared. `dtype`: the sums' dtype (None: as stored)."""
    joined = frames[0].add_suffix("_0")
    for i, frame in enumerate(frames[1:], 1):
        joined = joined.join(frame.add_suffix(f"_{i}"), how="inner")
    if joined.empty:
        return None
    sums = [joined[f"sum_{i}"].to_numpy(dtype) for i in range(len(frames))]
    counts = [joined[f"n_{i}"].to_numpy(dtype) for i in range(len(frames))]

    def value(idx: np.ndarray | slice) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return statistic([s[idx].sum(-1) / n[idx].sum(-1) for s, n in zip(sums, counts, strict=True)])

    point = float(value(slice(None)))
    n = len(joined)
    boots = np.concatenate([value(idx) for idx in bootstrap_indices(n, n_boot, seed)])
    boots = boots[np.isfinite(boots)]
    alpha = (1 - level) / 2
    low, high = np.quantile(boots, [alpha, 1 - alpha]) if boots.size else (math.nan, math.nan)
    return Bootstrap(point, float(low), float(high), n, boots)


def ratio_of_means_ci(
    num: pd.DataFrame, den: pd.DataFrame, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """mean(num)/mean(den) over tokens, with a bootstrap interval that resamples whole contexts.

    num, den: per-context ``sum`` and ``n`` (from :func:`per_context`), aligned on context. Where the
    denominator's own interval (the same resamples) contains 0, the ratio's interval is unbounded (Fieller) and
    given as NaN: a percentile interval of replicates that cross a zero denominator need not even hold the ratio.
    """
    found = context_bootstrap([num, den], lambda m: m[0] / m[1], n_boot, seed, level)
    if found is None:
        return {"ratio": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n_contexts": 0}
    below = context_bootstrap([num, den], lambda m: m[1], n_boot, seed, level)  # the denominator, same contexts
    low, high = (math.nan, math.nan) if below is not None and below.low <= 0 <= below.high else (found.low, found.high)
    return {"ratio": found.point, "ci_low": low, "ci_high": high, "n_contexts": found.n_contexts, "n_boot": n_boot}


def difference_of_means_ci(
    a: pd.DataFrame, b: pd.DataFrame, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """mean(a) − mean(b) over tokens, paired: each bootstrap resample draws the same whole contexts for both.

    a, b: per-context ``sum`` and ``n`` (from :func:`per_context`), joined on the contexts both hold.
    Returns mean, ci_low, ci_high, n_contexts, n_boot (NaN without a shared context)."""
    found = context_bootstrap([a, b], lambda m: m[0] - m[1], n_boot, seed, level, np.float64)
    if found is None:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n_contexts": 0, "n_boot": n_boot}
    return {"mean": found.point, "ci_low": found.low, "ci_high": found.high, "n_contexts": found.n_contexts,
            "n_boot": n_boot}


def paired_wilcoxon(a: pd.DataFrame, b: pd.DataFrame) -> dict[str, Any]:
    """Wilcoxon signed-rank on per-context mean values (a vs b), with the rank-biserial effect size."""
    joined = a.add_suffix("_a").join(b.add_suffix("_b"), how="inner")
    mean_a = joined["sum_a"] / joined["n_a"]
    mean_b = joined["sum_b"] / joined["n_b"]
    diff = (mean_a - mean_b).to_numpy()
    diff = diff[np.isfinite(diff)]
    if diff.size < 2 or np.all(diff == 0):
        return {"statistic": math.nan, "p_value": 1.0, "effect_size": 0.0, "n_contexts": int(diff.size)}
    result = sps.wilcoxon(diff, zero_method="wilcox")
    nonzero = diff[diff != 0]
    ranks = sps.rankdata(np.abs(nonzero))
    effect = float((ranks[nonzero > 0].sum() - ranks[nonzero < 0].sum()) / ranks.sum())
    return {
        "statistic": float(result.statistic),
        "p_value": float(result.pvalue),
        "effect_size": effect,  # rank-biserial correlation, in [-1, 1]; > 0 means a > b
        "n_contexts": int(diff.size),
    }


def zscores(sae_kl: float, draws: np.ndarray) -> dict[str, float]:
    """z-score and empirical percentile of the SAE's KL among random draws."""
    draws = np.asarray(draws, dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    mean, std = float(draws.mean()), float(draws.std(ddof=1)) if draws.size > 1 else math.nan
    z = (sae_kl - mean) / std if std and std > 0 else math.nan
    return {"z": float(z), "percentile": float((draws < sae_kl).mean() * 100.0), "draw_mean": mean, "draw_std": std}


def holm(p_values: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (same order as given; NaN stays NaN)."""
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full_like(p, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    if finite.size == 0:
        return adjusted.tolist()
    order = finite[np.argsort(p[finite], kind="stable")]
    m = order.size
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[idx]))
        adjusted[idx] = running
    return adjusted.tolist()


def token_gap(frame: pd.DataFrame, baseline: str = "epsilon_random") -> pd.DataFrame:
    """Per-token gap KL(sae) − KL(baseline), with the token's geometry: one row per (context, position)."""
    keys = ["context", "position"]
    sae = frame[(frame["intervention"] == "sae") & (frame["draw"] < 0)].set_index(keys)
    base = frame[(frame["intervention"] == baseline) & (frame["draw"] < 0)].set_index(keys)["kl"]
    joined = sae.join(base.rename("kl_baseline"), how="inner")
    joined["gap"] = joined["kl"] - joined["kl_baseline"]
    return joined.reset_index()


def gap_correlations(gaps: pd.DataFrame, columns: tuple[str, ...] = ("cos", "l0", "x_norm", "eps", "position")) -> dict[str, Any]:
    """Spearman ρ (and p) of the per-token gap with each column."""
    out: dict[str, Any] = {}
    for column in columns:
        pair = gaps[["gap", column]].replace([np.inf, -np.inf], np.nan).dropna()
        if len(pair) < 3 or pair[column].nunique() < 2 or pair["gap"].nunique() < 2:
            out[column] = {"rho": math.nan, "p_value": math.nan, "n": int(len(pair))}
            continue
        result = sps.spearmanr(pair["gap"], pair[column])
        out[column] = {"rho": float(result.statistic), "p_value": float(result.pvalue), "n": int(len(pair))}
    return out


TOP_TOKEN_ROWS = 1 << 18  # rows grouped at once by top_tokens_of


def top_tokens(gaps: pd.DataFrame, min_count: int = 5, n: int = 15) -> pd.DataFrame:
    """Token ids with the largest mean gap among those seen at least `min_count` times."""
    return top_tokens_of(gaps["token_id"].to_numpy(), gaps["gap"].to_numpy(), min_count, n)


def top_tokens_of(token_id: np.ndarray, gap: np.ndarray, min_count: int = 5, n: int = 15) -> pd.DataFrame:
    """:func:`top_tokens` of aligned arrays (ids ≥ 0): columns token_id, mean_gap, count. The rows of frequent ids
    are grouped ~TOP_TOKEN_ROWS at a time, by ranges of ids, as ``groupby("token_id")["gap"].agg(["mean", "count"])``
    of all of them: a token's mean depends only on its rows, but pandas (3.1) takes it with reduceat in float64 when
    the ids are in order and no gap is NaN, else with its Kahan loop in the gap's dtype, so each range's call is made
    to take the whole call's way (a NaN row in an extra last group)."""
    token_id, gap = np.asarray(token_id), np.asarray(gap)
    counts = np.bincount(token_id) if token_id.size else np.zeros(0, dtype=np.int64)
    kahan = bool(np.isnan(gap).any() or not np.all(token_id[1:] >= token_id[:-1]))
    keep = (counts >= min_count)[token_id]
    rows_below = np.cumsum(np.where(counts >= min_count, counts, 0))  # rows of frequent ids ≤ each id
    total = rows_below[-1] if counts.size else 0
    edges = np.unique([0, *(np.searchsorted(rows_below, np.arange(TOP_TOKEN_ROWS, total, TOP_TOKEN_ROWS)) + 1).tolist(),
                       counts.size])
    groups = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        rows = keep & (token_id >= low) & (token_id < high)
        ids, values = token_id[rows], gap[rows]
        if kahan:
            ids = np.append(ids, np.array([counts.size], ids.dtype))
            values = np.append(values, np.array([np.nan], values.dtype))
        grouped = _gap_means(ids, values)
        groups.append(grouped.iloc[:-1] if kahan else grouped)
    grouped = pd.concat(groups) if groups else _gap_means(token_id, gap)
    grouped = grouped[grouped["count"] >= min_count].sort_values("mean", ascending=False)
    return grouped.head(n).reset_index().rename(columns={"mean": "mean_gap"})


def _gap_means(token_id: np.ndarray, gap: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"token_id": token_id, "gap": gap}).groupby("token_id")["gap"].agg(["mean", "count"])


SPEARMAN_CHUNK = 1 << 16  # values ranked at once (the rank sums are exact int64 within a chunk; see spearman)


def _finite(values: np.ndarray) -> np.ndarray:
    return np.isfinite(values) if values.dtype.kind == "f" else np.ones(values.shape, dtype=bool)


def _twice_centred_ranks(ordered: np.ndarray, values: np.ndarray) -> np.ndarray:
    """2 × the average rank − (n + 1) of `values` among `ordered` (n sorted values), int64: a value's average
    1-based rank is (#smaller + #smaller-or-equal + 1) / 2, ties sharing the mean of their ranks as scipy's rankdata."""
    return np.searchsorted(ordered, values, "left") + np.searchsorted(ordered, values, "right") - ordered.size


def centred_ranks(values: np.ndarray) -> np.ndarray:
    """2 × the average rank − (n + 1) of each of `values` (finite), an integer in [1 − n, n − 1]; int32 when that
    fits. No argsort: one sorted copy, ranked SPEARMAN_CHUNK values at a time."""
    values = np.asarray(values)
    ordered = np.sort(values)
    out = np.empty(values.size, dtype=np.int32 if values.size < 2**31 else np.int64)
    for start in range(0, values.size, SPEARMAN_CHUNK):
        out[start : start + SPEARMAN_CHUNK] = _twice_centred_ranks(ordered, values[start : start + SPEARMAN_CHUNK])
    return out


def spearman(a: np.ndarray, b: np.ndarray, a_ranks: np.ndarray | None = None) -> dict[str, Any]:
    """Spearman ρ (and its two-sided p) of two aligned arrays over the pairs where both are finite: rho, p_value, n.

    ρ is Pearson's correlation of the average ranks, as ``scipy.stats.spearmanr``, without its rank arrays
    (~85 bytes per pair): ranks come from :func:`centred_ranks`, and the rank sums Σ rₐr_b, Σ rₐ², Σ r_b² are exact
    integers (int64 per chunk of rows, Python ints across them), so ρ is their quotient rounded a few times in
    float64 (≤ 3e-16 relative); scipy sums float64 ranks, so the two agree to ~1e-15 relative. p comes from the same
    t distribution with n − 2 degrees of freedom as scipy's. NaN (with n) for n < 3 or a constant array.
    `a_ranks`: :func:`centred_ranks` of `a`, used when no pair is dropped (to rank `a` once for several `b`).
    """
    a, b = np.asarray(a), np.asarray(b)
    ok = _finite(a) & _finite(b)
    if not ok.all():
        a, b, a_ranks = a[ok], b[ok], None
    del ok
    n = int(a.size)
    nan = {"rho": math.nan, "p_value": math.nan, "n": n}
    if n < 3:
        return nan
    if a.min() == a.max() or b.min() == b.max():
        return nan
    ra = centred_ranks(a) if a_ranks is None else a_ranks
    ordered_b = np.sort(b)
    chunk = max(1, min(SPEARMAN_CHUNK, 2**62 // (n * n)))  # |r| < n: a chunk's int64 sums cannot overflow
    s_ab = s_aa = s_bb = 0
    for start in range(0, n, chunk):
        x = ra[start : start + chunk].astype(np.int64)
        y = _twice_centred_ranks(ordered_b, b[start : start + chunk])
        s_ab, s_aa, s_bb = s_ab + int(x @ y), s_aa + int(x @ x), s_bb + int(y @ y)
    rho = np.float64(min(1.0, max(-1.0, s_ab / math.sqrt(s_aa * s_bb))))
    dof = n - 2
    with np.errstate(divide="ignore"):
        t = rho * np.sqrt((dof / ((rho + 1.0) * (1.0 - rho))).clip(0))
    return {"rho": float(rho), "p_value": float(2 * special.stdtr(dof, -np.abs(t))), "n": n}


def bootstrap_means(per_ctx: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """The mean over tokens in each of `n_boot` resamples of whole contexts (per-context ``sum``, ``n``): ``[n_boot]``
    float64, NaN where a resample holds no token. The resamples depend only on the context count and the seed, so
    two frames over the same contexts (in the same order) are resampled together (klgap/report/sweep.py)."""
    s, n = per_ctx["sum"].to_numpy(dtype=np.float64), per_ctx["n"].to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.concatenate([s[idx].sum(-1) / n[idx].sum(-1) for idx in bootstrap_indices(s.size, n_boot, seed)])


def mean_ci(per_ctx: pd.DataFrame, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Mean over tokens with a bootstrap interval that resamples whole contexts (per-context ``sum``, ``n``)."""
    found = None if per_ctx["n"].sum() == 0 else context_bootstrap([per_ctx], lambda m: m[0], n_boot, seed, level,
                                                                     np.float64)
    if found is None:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n_contexts": 0, "n_boot": n_boot}
    return {"mean": found.point, "ci_low": found.low, "ci_high": found.high, "n_contexts": found.n_contexts,
            "n_boot": n_boot}


@dataclass(frozen=True)
class SaeContextBootstrap:
    """A statistic of several SAEs of one recipe (seeds) measured on the same contexts, with an interval that
    resamples both SAEs and contexts (:func:`sae_context_bootstrap`).

    point:       the mean over SAEs of each SAE's statistic on every context (each seed weighs the same).
    low, high:   the two-level bootstrap interval.
    per_sae:     each SAE's statistic on every context, ``[n_saes]``.
    var_sae:     the variance of the point estimate resampling SAEs alone (contexts as measured);
    var_context: resampling contexts alone (SAEs as trained): sae_share = var_sae / (var_sae + var_context), the
                 share of the estimate's variance that comes from which SAE was trained.
    replicates:  the finite two-level replicates."""

    point: float
    low: float
    high: float
    per_sae: np.ndarray
    var_sae: float
    var_context: float
    n_contexts: int
    replicates: np.ndarray

    @property
    def sae_share(self) -> float:
        total = self.var_sae + self.var_context
        return self.var_sae / total if total > 0 else math.nan


def sae_context_bootstrap(frames: Sequence[Sequence[pd.DataFrame]],
                          statistic: Callable[[list[np.ndarray]], np.ndarray], n_boot: int = 2000, seed: int = 0,
                          level: float = 0.95, dtype: type | None = None) -> SaeContextBootstrap | None:
    """The one bootstrap over SAEs and contexts: ``frames[s]`` are SAE s's per-context ``sum`` and ``n`` frames
    (:func:`per_context`), ``statistic(means)`` as :func:`context_bootstrap`'s, taken per SAE and averaged over
    SAEs. Each replicate draws SAEs with replacement and whole contexts with replacement, the *same* contexts for
    every SAE drawn: every SAE was measured on the same tokens (the design is crossed, not nested), so a context's
    difficulty moves all of them together. Hence with SAEs that do not differ the interval is exactly
    :func:`context_bootstrap`'s (its context draws, same `seed`), and with contexts that do not differ it is the
    bootstrap over SAEs alone. None when no context is shared."""
    n_saes = len(frames)
    flat = [frame for group in frames for frame in group]
    width = len(frames[0])
    joined = flat[0].add_suffix("_0")
    for i, frame in enumerate(flat[1:], 1):
        joined = joined.join(frame.add_suffix(f"_{i}"), how="inner")
    if joined.empty or n_saes == 0:
        return None
    sums = [joined[f"sum_{i}"].to_numpy(dtype) for i in range(len(flat))]
    counts = [joined[f"n_{i}"].to_numpy(dtype) for i in range(len(flat))]

    def per_sae(idx: np.ndarray | slice) -> np.ndarray:  # [n_saes, ...] each SAE's statistic on the drawn contexts
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.stack([np.asarray(statistic([sums[j][idx].sum(-1) / counts[j][idx].sum(-1)
                                                   for j in range(s * width, (s + 1) * width)]), dtype=np.float64)
                             for s in range(n_saes)])

    points = per_sae(slice(None))
    draws = np.random.default_rng([seed, 1]).integers(0, n_saes, size=(n_boot, n_saes))  # [n_boot n_saes]
    both, contexts_only = [], []
    done = 0
    for idx in bootstrap_indices(len(joined), n_boot, seed):
        values = per_sae(idx).T  # [chunk n_saes]
        both.append(np.take_along_axis(values, draws[done : done + len(idx)], axis=1).mean(1))
        contexts_only.append(values.mean(1))
        done += len(idx)
    saes_only = points[draws].mean(1)

    def kept(values: np.ndarray) -> np.ndarray:
        return values[np.isfinite(values)]

    boots = kept(np.concatenate(both))
    alpha = (1 - level) / 2
    low, high = np.quantile(boots, [alpha, 1 - alpha]) if boots.size else (math.nan, math.nan)

    def variance(values: np.ndarray) -> float:
        return float(np.var(values, ddof=1)) if values.size > 1 else math.nan

    return SaeContextBootstrap(float(points.mean()), float(low), float(high), points, variance(kept(saes_only)),
                               variance(kept(np.concatenate(contexts_only))), len(joined), boots)

"""Statistics against known cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from klgap.report import stats


def _frame(n_contexts: int, n_pos: int, shift: float, seed: int = 0) -> pd.DataFrame:
    """Per-token KL for sae and epsilon_random; contexts differ in level (correlated tokens)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_contexts):
        level = rng.lognormal(-3, 0.5)
        base = level * rng.lognormal(0, 0.3, n_pos)
        sae = base * (1 + shift) * rng.lognormal(0, 0.05, n_pos) if shift else base
        for name, kl in (("sae", sae), ("epsilon_random", base)):
            rows.append(pd.DataFrame({"context": c, "position": np.arange(n_pos), "intervention": name, "draw": -1,
                                      "kl": kl, "ce_delta": kl, "token_id": rng.integers(0, 20, n_pos),
                                      "cos": rng.random(n_pos), "l0": rng.integers(1, 50, n_pos).astype(float),
                                      "x_norm": rng.random(n_pos), "eps": rng.random(n_pos)}))
    return pd.concat(rows, ignore_index=True)


def test_identical_samples_ratio_one_p_one():
    frame = _frame(50, 20, shift=0.0)
    a, b = stats.per_context(frame, "sae", "kl"), stats.per_context(frame, "epsilon_random", "kl")
    r = stats.ratio_of_means_ci(a, b)
    assert r["ratio"] == pytest.approx(1.0) and r["ci_low"] == pytest.approx(1.0) and r["ci_high"] == pytest.approx(1.0)
    assert stats.paired_wilcoxon(a, b)["p_value"] == 1.0


def test_planted_shift_detected():
    frame = _frame(40, 20, shift=0.3)
    a, b = stats.per_context(frame, "sae", "kl"), stats.per_context(frame, "epsilon_random", "kl")
    r = stats.ratio_of_means_ci(a, b)
    assert 1.2 < r["ratio"] < 1.4 and r["ci_low"] > 1.0
    w = stats.paired_wilcoxon(a, b)
    assert w["p_value"] < 0.01 and w["effect_size"] == pytest.approx(1.0)


def test_interval_shrinks_with_more_contexts():
    widths = []
    for n in (10, 40, 160):
        frame = _frame(n, 20, shift=0.2, seed=1)
        r = stats.ratio_of_means_ci(stats.per_context(frame, "sae", "kl"), stats.per_context(frame, "epsilon_random", "kl"))
        widths.append(r["ci_high"] - r["ci_low"])
    assert widths[0] > widths[1] > widths[2]


def test_a_ratio_over_a_denominator_near_zero_has_no_interval():
    """ΔCE of a baseline that hardly moves CE: per-context means of both signs. The denominator's interval holds 0,
    so the ratio's interval is unbounded (Fieller) and withheld as NaN, instead of a percentile interval that need
    not even contain the ratio; a denominator clear of 0 keeps its interval."""
    rng = np.random.default_rng(3)
    n = 30
    num = pd.DataFrame({"sum": rng.normal(1.0, 0.2, n) * 10, "n": np.full(n, 10.0)}, index=pd.Index(range(n), name="context"))
    crossing = pd.DataFrame({"sum": rng.normal(0.01, 0.3, n) * 10, "n": np.full(n, 10.0)}, index=num.index)
    clear = pd.DataFrame({"sum": rng.normal(2.0, 0.3, n) * 10, "n": np.full(n, 10.0)}, index=num.index)
    den = stats.context_bootstrap([crossing], lambda m: m[0])
    assert den.low < 0 < den.high  # the case: a denominator indistinguishable from 0
    found = stats.ratio_of_means_ci(num, crossing)
    assert found["ratio"] == pytest.approx(num["sum"].sum() / crossing["sum"].sum())
    assert math.isnan(found["ci_low"]) and math.isnan(found["ci_high"])
    kept = stats.ratio_of_means_ci(num, clear)
    assert kept["ci_low"] < kept["ratio"] < kept["ci_high"]


def test_nonfinite_values_counted_not_averaged():
    d = stats.describe(np.array([1.0, 2.0, np.nan, np.inf, 3.0]))
    assert d == {"mean": 2.0, "median": 2.0, "p999": pytest.approx(2.998), "n": 3, "n_nonfinite": 2}


def test_holm_known_values():
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = stats.holm([0.2, math.nan])
    assert out[0] == pytest.approx(0.2) and math.isnan(out[1])


def test_zscores_and_percentile():
    draws = np.arange(100, dtype=float)
    z = stats.zscores(120.0, draws)
    assert z["z"] == pytest.approx((120 - 49.5) / draws.std(ddof=1)) and z["percentile"] == 100.0


def test_gap_correlations_and_top_tokens():
    frame = _frame(30, 20, shift=0.0)
    sae = frame.intervention == "sae"
    frame.loc[sae, "kl"] += frame.loc[sae, "l0"] * 0.01  # the gap grows with L0
    frame.loc[sae & (frame.token_id == 7), "kl"] += 5.0  # token 7 is the worst
    gaps = stats.token_gap(frame)
    corr = stats.gap_correlations(gaps)
    assert corr["l0"]["rho"] > 0.5 and corr["l0"]["p_value"] < 1e-6
    assert abs(corr["position"]["rho"]) < 0.2
    top = stats.top_tokens(gaps)
    assert top.iloc[0]["token_id"] == 7 and top.iloc[0]["count"] >= 5


@pytest.mark.parametrize("n", [1, 7, 1563])
def test_bootstrap_in_chunks_draws_the_one_shot_numbers(n):
    """Resampling in chunks of replicates (memory ∝ chunk × contexts) reproduces one (n_boot, n) draw exactly."""
    one_shot = np.random.default_rng(3).integers(0, n, size=(2000, n))
    chunked = np.concatenate(list(stats.bootstrap_indices(n, 2000, 3)))
    assert chunked.dtype == np.int32 and chunked.shape == (2000, n)
    np.testing.assert_array_equal(chunked, one_shot)
    rng = np.random.default_rng(0)
    per_ctx = pd.DataFrame({"sum": rng.random(n) * 10, "n": rng.integers(1, 20, n)})
    s, c = per_ctx["sum"].to_numpy(), per_ctx["n"].to_numpy()
    boots = s[one_shot].sum(-1) / c[one_shot].sum(-1)
    ci = stats.mean_ci(per_ctx, n_boot=2000, seed=3)
    assert ci["ci_low"] == pytest.approx(np.quantile(boots, 0.025), rel=1e-13)
    assert ci["ci_high"] == pytest.approx(np.quantile(boots, 0.975), rel=1e-13)


def test_difference_of_means_pairs_the_bootstrap_contexts():
    rng = np.random.default_rng(0)
    n = rng.integers(5, 30, 40)  # contexts of different lengths: token means, not means of context means
    shared = rng.normal(0, 1.0, 40)  # a context effect both share: pairing removes it from the interval
    a = pd.DataFrame({"sum": (shared + 0.3) * n, "n": n})
    b = pd.DataFrame({"sum": shared * n, "n": n})
    found = stats.difference_of_means_ci(a, b, n_boot=500, seed=1)
    assert found["mean"] == pytest.approx(a["sum"].sum() / n.sum() - b["sum"].sum() / n.sum())
    assert found["ci_low"] == pytest.approx(0.3) and found["ci_high"] == pytest.approx(0.3)  # exactly paired
    idx = np.random.default_rng(1).integers(0, 40, (500, 40))
    boots = a["sum"].to_numpy()[idx].sum(1) / n[idx].sum(1) - b["sum"].to_numpy()[idx].sum(1) / n[idx].sum(1)
    assert (found["ci_low"], found["ci_high"]) == pytest.approx(tuple(np.quantile(boots, [0.025, 0.975])))
    empty = stats.difference_of_means_ci(a, b.iloc[:0])
    assert math.isnan(empty["mean"]) and empty["n_contexts"] == 0

"""The two-level bootstrap over SAEs of one recipe and contexts (klgap.report.stats.sae_context_bootstrap), against
cases where the answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd

from klgap.report import stats


def _per_context(values: np.ndarray, n: np.ndarray) -> pd.DataFrame:
    """Per-context sum and count of a token mean `values` [contexts] over `n` tokens each."""
    return pd.DataFrame({"sum": values * n, "n": n}, index=pd.RangeIndex(len(values), name="context"))


def _ratio(means: list[np.ndarray]) -> np.ndarray:
    return means[0] / means[1]


def test_saes_that_do_not_differ_give_the_one_level_context_interval():
    rng = np.random.default_rng(3)
    n = rng.integers(5, 40, 60).astype(float)
    num, den = _per_context(1.3 + rng.normal(0, 0.4, 60), n), _per_context(1.0 + rng.normal(0, 0.2, 60), n)
    one = stats.context_bootstrap([num, den], _ratio, n_boot=1000, seed=7)
    two = stats.sae_context_bootstrap([[num, den]] * 4, _ratio, n_boot=1000, seed=7)
    assert two.point == one.point and two.n_contexts == 60
    np.testing.assert_allclose([two.low, two.high], [one.low, one.high], rtol=1e-12)
    assert two.var_sae == 0 and two.var_context > 0 and two.sae_share == 0


def test_contexts_that_do_not_differ_give_the_bootstrap_over_saes_alone():
    ratios = np.array([1.10, 1.25, 1.31, 1.18, 1.40])
    n = np.full(30, 20.0)
    frames = [[_per_context(np.full(30, r), n), _per_context(np.ones(30), n)] for r in ratios]
    two = stats.sae_context_bootstrap(frames, _ratio, n_boot=2000, seed=5)
    # the direct simulation: draw 5 SAEs with replacement, average their ratios
    draws = np.random.default_rng([5, 1]).integers(0, 5, size=(2000, 5))
    direct = ratios[draws].mean(1)
    np.testing.assert_allclose([two.low, two.high], np.quantile(direct, [0.025, 0.975]), rtol=1e-12)
    np.testing.assert_allclose(two.per_sae, ratios, rtol=1e-12)
    assert abs(two.point - ratios.mean()) < 1e-12
    assert two.var_context < 1e-25 and two.sae_share > 0.999999


def test_the_two_level_interval_covers_the_recipe_mean_under_a_crossed_random_effects_model():
    """KL per token = mu + seed effect + context effect + noise, every seed on the same contexts; over many
    simulated studies the two-level interval holds mu about 95% of the time, the context interval of one seed far
    less often (it knows nothing of the seed effect)."""
    rng = np.random.default_rng(0)
    mu, n_saes, n_ctx = 2.0, 15, 40
    n = np.full(n_ctx, 8.0)
    covered_two = covered_one = 0
    trials = 120
    for trial in range(trials):
        seed_effect = rng.normal(0, 0.15, n_saes)
        context_effect = rng.normal(0, 0.15, n_ctx)
        frames = [[_per_context(mu + a + context_effect + rng.normal(0, 0.1, n_ctx), n),
                   _per_context(np.ones(n_ctx), n)] for a in seed_effect]
        two = stats.sae_context_bootstrap(frames, _ratio, n_boot=400, seed=trial)
        one = stats.context_bootstrap(frames[0], _ratio, n_boot=400, seed=trial)
        covered_two += two.low <= mu <= two.high
        covered_one += one.low <= mu <= one.high
        assert 0 < two.sae_share < 1
    assert covered_two / trials >= 0.85
    assert covered_one / trials < covered_two / trials - 0.15


def test_no_shared_context_gives_none():
    a = _per_context(np.ones(3), np.ones(3))
    b = pd.DataFrame({"sum": [1.0], "n": [1.0]}, index=pd.Index([9], name="context"))
    assert stats.sae_context_bootstrap([[a, a], [b, b]], _ratio) is None

"""klgap.report.holm: Holm families (the SAE against each named baseline across sites/layers; curve points apart)."""

from __future__ import annotations

import math

import pytest

from klgap.report import stats
from klgap.report.holm import CURVE_FAMILY, apply_holm, family_of
from klgap.report.schema import Comparison


def _comparison(p: float | None) -> Comparison:
    ratio = {"ratio": 1.2, "ci_low": 1.1, "ci_high": 1.3, "n_contexts": 8}
    return Comparison(kl_ratio=ratio, ce_delta_ratio=ratio,
                      wilcoxon_kl={"statistic": 3.0, "p_value": p, "effect_size": 0.5, "n_contexts": 8})


def _run(p_eps: float, curve: list[float]) -> dict[str, Comparison]:
    run = {"epsilon_random": _comparison(p_eps), "theta_random": _comparison(0.04)}
    run.update({f"cosine_matched(cos={0.5 + 0.05 * i:g},norm_frac=0.9)": _comparison(p) for i, p in enumerate(curve)})
    return run


def test_family_names():
    assert family_of("epsilon_random") == "epsilon_random"
    assert family_of("cosine_matched(cos=0.5,norm_frac=0.9)") == CURVE_FAMILY
    assert family_of("my_noise(scale=3)") == "my_noise(scale=3)"


def test_a_runs_baseline_p_does_not_depend_on_the_cosine_grid():
    coarse, fine = _run(0.011, [0.2, 0.03]), _run(0.011, [0.2, 0.03, 0.001, 0.5, 0.04, 0.3, 0.02, 0.01, 0.6, 0.7, 0.05])
    apply_holm([coarse])
    apply_holm([fine])
    for run in (coarse, fine):
        test = run["epsilon_random"].wilcoxon_kl
        assert (test.p_holm, test.holm_family_size, test.holm_family) == (0.011, 1, "sae vs epsilon_random at 1 site/layer")
    curve = [c.wilcoxon_kl for n, c in fine.items() if family_of(n) == CURVE_FAMILY]
    assert [t.p_holm for t in curve] == pytest.approx(stats.holm([t.p_value for t in curve]))
    assert {t.holm_family for t in curve} == {"sae vs 11 cosine_matched curve points at 1 site/layer"}


def test_a_study_corrects_each_baseline_across_its_sites_and_layers():
    runs = [_run(p, [0.2, 0.03]) for p in (0.01, 0.02, 0.003)]
    apply_holm(runs)
    assert [r["epsilon_random"].wilcoxon_kl.p_holm for r in runs] == pytest.approx([0.02, 0.02, 0.009])
    assert [r["theta_random"].wilcoxon_kl.p_holm for r in runs] == pytest.approx([0.12] * 3)
    assert runs[0]["epsilon_random"].wilcoxon_kl.holm_family == "sae vs epsilon_random at 3 sites/layers"
    curve = [c.wilcoxon_kl for r in runs for n, c in r.items() if n.startswith("cosine_matched")]
    assert {t.holm_family_size for t in curve} == {6}
    assert {t.holm_family for t in curve} == {"sae vs 2 cosine_matched curve points at each of 3 sites/layers"}


def test_the_curve_family_counts_points_per_site_not_their_total():
    """1 point at each of 2 sites is 2 tests, not 'each of 2 points' (issue 35)."""
    runs = [_run(0.01, [0.2]), _run(0.02, [0.03])]
    apply_holm(runs)
    test = runs[0]["cosine_matched(cos=0.5,norm_frac=0.9)"].wilcoxon_kl
    assert (test.holm_family, test.holm_family_size) == ("sae vs 1 cosine_matched curve point at each of 2 sites/layers", 2)
    uneven = [_run(0.01, [0.2, 0.3]), _run(0.02, [0.03])]
    apply_holm(uneven)
    assert uneven[1]["cosine_matched(cos=0.5,norm_frac=0.9)"].wilcoxon_kl.holm_family == (
        "sae vs 3 cosine_matched curve points over 2 sites/layers")


def test_missing_p_values_stay_missing_and_do_not_count():
    runs = [{"epsilon_random": _comparison(None)}, {"epsilon_random": _comparison(0.01)}]
    apply_holm(runs)
    assert runs[0]["epsilon_random"].wilcoxon_kl.p_holm is None
    assert runs[1]["epsilon_random"].wilcoxon_kl.p_holm == 0.01
    assert runs[1]["epsilon_random"].wilcoxon_kl.holm_family_size == 1
    assert not math.isnan(runs[1]["epsilon_random"].wilcoxon_kl.p_holm)

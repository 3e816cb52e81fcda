"""The baseline panel (klgap/report/panel.py) from typed comparisons: each row's numbers are its comparison's and its
Holm family's, the verdict reads the interval and the Holm-corrected p, and the opening sentence names every
baseline measured (one when one). The end-to-end run: tests/cli/test_sweep_panel.py."""

from __future__ import annotations

import pytest

from klgap.report.panel import ALPHA, baseline_panel, opening_sentence, verdict_of
from klgap.report.schema import Comparison
from klgap.report.summary import summary_row
from tests.core.test_plots import make_report, make_tokens


def comparison(ratio, low, high, p, p_holm=None, n=40):
    return Comparison.model_validate({
        "kl_ratio": {"ratio": ratio, "ci_low": low, "ci_high": high, "n_contexts": n, "n_boot": 2000},
        "ce_delta_ratio": {"ratio": 1.0, "ci_low": 0.9, "ci_high": 1.1, "n_contexts": n},
        "wilcoxon_kl": {"statistic": 1.0, "p_value": p, "effect_size": 0.5, "n_contexts": n, "p_holm": p_holm,
                        "holm_family": "sae vs x at 1 site/layer", "holm_family_size": 1},
    })


@pytest.mark.parametrize(("ratio", "low", "high", "p", "p_holm", "expected"), [
    (1.4, 1.3, 1.5, 1e-6, 1e-6, "holds"),
    (0.6, 0.5, 0.7, 1e-6, 2e-6, "reversed"),
    (1.0, 0.9, 1.1, 0.5, 0.5, "not resolved"),
    (1.2, 1.05, 1.3, 0.01, 0.08, "not resolved"),  # the interval excludes 1, the Holm-corrected p does not
    (1.2, 1.05, 1.3, 0.01, None, "holds"),  # a report without Holm: the raw p
    (1.2, None, None, 1e-6, 1e-6, "not resolved"),  # no interval
])
def test_verdict_reads_the_interval_and_the_holm_p(ratio, low, high, p, p_holm, expected):
    assert verdict_of(comparison(ratio, low, high, p, p_holm)) == expected
    assert ALPHA == 0.05


@pytest.fixture(scope="module")
def report():
    return make_report("all_tokens", make_tokens("all_tokens"))


def _run(report, baselines, comparisons):
    return report.model_copy(update={"baselines": baselines, "comparisons": comparisons})


def test_rows_are_the_comparisons_in_measured_order(report):
    comps = {"epsilon_random": comparison(1.46, 1.41, 1.52, 1e-9, 1e-9), "zero": comparison(0.01, 0.0, 0.02, 1e-9, 1e-9),
             "sae_error_shuffled": comparison(0.98, 0.91, 1.05, 0.4, 0.4)}
    run = _run(report, {"epsilon_random": "isotropic noise", "sae_error_shuffled": "another token's error",
                "cov_random_mixture": "a covariance-shaped error"}, comps)
    panel = baseline_panel(run, run.model, run.mode)
    assert [r.baseline for r in panel.rows] == ["epsilon_random", "sae_error_shuffled"]  # zero is no baseline;
    row = panel.rows[0]  # cov_random_mixture declared but not compared
    test, ratio = comps["epsilon_random"].wilcoxon_kl, comps["epsilon_random"].kl_ratio
    assert (row.ratio, row.ci_low, row.ci_high, row.p_value, row.p_holm, row.holm_family, row.n_contexts) == (
        ratio.ratio, ratio.ci_low, ratio.ci_high, test.p_value, test.p_holm, test.holm_family, test.n_contexts)
    assert [r.verdict for r in panel.rows] == ["holds", "not resolved"]
    assert panel.rows[0].line() == ("holds: the SAE does 1.460× [1.410, 1.520] the damage of isotropic noise "
                                    "(Holm p = 1.00e-09)")
    assert panel.rows[1].line().startswith("not resolved: indistinguishable from another token's error, 0.980× "
                                           "[0.910, 1.050] (the interval includes 1")


def test_opening_sentence_names_every_baseline_when_several_were_measured(report):
    comps = {"epsilon_random": comparison(1.4, 1.3, 1.5, 1e-9, 1e-9),
             "cov_random_mixture": comparison(1.1, 1.02, 1.2, 1e-3, 2e-3),
             "pca_matched": comparison(0.6, 0.55, 0.66, 1e-9, 1e-9),
             "sae_error_shuffled": comparison(0.98, 0.91, 1.05, 0.4, 0.4)}
    labels = {"epsilon_random": "isotropic noise", "cov_random_mixture": "a covariance-shaped error",
              "pca_matched": "PCA at the SAE's explained variance", "sae_error_shuffled": "another token's error"}
    run = _run(report, labels, comps)
    sentence = opening_sentence(run, run.model, run.mode)
    metrics = run.sae_metrics  # the SAE's quality beside the verdict (klgap/report/quality.py)
    assert sentence.startswith(f"At {run.hook_name} of {run.model} the SAE's reconstruction (explained variance "
                               f"{metrics.explained_variance:.3f}, L0 {metrics.l0_mean:.3g}) moves the next-token "
                               "distribution more than isotropic noise (1.400× [1.300, 1.500]) and a covariance-shaped "
                               "error (1.100× [1.020, 1.200]), less than PCA at the SAE's explained variance (0.600× "
                               "[0.550, 0.660]), and is indistinguishable from another token's error (0.980× [0.910, "
                               "1.050]) (KL(sae)/KL(baseline) with 95% intervals over 40 contexts;")
    for label in labels.values():
        assert label in sentence


def test_opening_sentence_with_one_baseline_names_that_one(report):
    only_eps = _run(report, {"epsilon_random": "isotropic noise"}, {"epsilon_random": comparison(1.4, 1.3, 1.5, 1e-9, 1e-9)})
    assert opening_sentence(only_eps, only_eps.model, only_eps.mode) == summary_row(
        only_eps, only_eps.model, only_eps.mode).verdict()  # the headline sentence, unchanged
    only_cov = _run(report, {"cov_random_mixture": "a covariance-shaped error"},
                    {"cov_random_mixture": comparison(0.98, 0.91, 1.05, 0.4, 0.4)})
    sentence = opening_sentence(only_cov, only_cov.model, only_cov.mode)
    assert "is indistinguishable from a covariance-shaped error (0.980× [0.910, 1.050])" in sentence
    assert "isotropic" not in sentence and " and " not in sentence.split("(KL(sae)")[0]


def test_a_report_that_does_not_say_which_are_baselines_has_no_panel(report):
    run = _run(report, None, {"epsilon_random": comparison(1.4, 1.3, 1.5, 1e-9, 1e-9),
                      "theta_random": comparison(1.2, 1.1, 1.3, 1e-9, 1e-9)})
    assert baseline_panel(run, run.model, run.mode) is None
    assert opening_sentence(run, run.model, run.mode) == summary_row(run, run.model, run.mode).verdict()


def test_the_noise_equivalent_cosine_sits_beside_the_panel(report):
    from klgap.render.blocks import Para
    from klgap.render.panel_page import matched_size_blocks, panel_blocks
    from klgap.report.schema import Curve, CurveSAE

    curve = Curve(points=[], sae=CurveSAE(cos_mean=0.9, norm_frac_mean=0.95, kl_mean=0.1, kl_ci_low=0.09,
                                          kl_ci_high=0.11, ce_delta_mean=0.01), sae_equivalent_cos={"0.9": 0.83})
    run = _run(report, {"epsilon_random": "isotropic noise"}, {"epsilon_random": comparison(1.4, 1.3, 1.5, 1e-9, 1e-9)})
    run = run.model_copy(update={"curve": curve})
    line = ("Noise-equivalent cosine: cosine-matched noise at norm 0.9·‖x‖ does the SAE's damage at cos 0.830; the "
            "SAE's own cos(x, x̂) is 0.900.")
    assert Para(line) in matched_size_blocks(run) and Para(line) in panel_blocks(run)

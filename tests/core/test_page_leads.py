"""Every kind of page opens with its own finding (issue 35), right under its title: a run its verdict, a curve
run where noise does the SAE's damage (then the verdict), a study the same per site/layer, a joint run the SAEs
patched together, a study over checkpoints each SAE over training, and compare.md a finding over its runs. Read
from the committed replication results and synthetic runs; nothing is measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from klgap.render.blocks import Bullets, Heading, PageLinks, Para, Table
from klgap.render.pages import document, render_html, render_markdown
from klgap.report.compare import compare_runs
from klgap.report.findings import compare_finding, curve_findings
from klgap.report.read import load_report
from klgap.report.summary import summary_row
from tests.core.test_plots import make_report, make_tokens, write_run

RESULTS = Path(__file__).parents[2] / "replications"
CURVE_STUDY = RESULTS / "cross-model-robustness" / "results" / "smollm2"


def _lead(report) -> list[str]:
    blocks = document(report, [])
    assert isinstance(blocks[0], Heading) and blocks[0].level == 1
    lead = blocks[1]
    assert isinstance(lead, (Para, Bullets)) and lead.lead, blocks[:3]
    return [lead.text] if isinstance(lead, Para) else lead.items


def test_a_run_opens_with_its_verdict():
    report = make_report("all_tokens", make_tokens("all_tokens"))
    assert _lead(report) == [summary_row(report, report.model, report.mode).verdict()]


def test_a_curve_run_opens_with_its_curve_finding_then_the_verdict():
    report = load_report(CURVE_STUDY / "mlp_out_L10")
    lead = _lead(report)
    assert lead[0] == ("At blocks.10.hook_mlp_out, cosine-matched noise at norm 0.9·‖x‖ does the SAE's damage (KL "
                       "0.04848) at cos 0.871; the SAE's own cos(x, x̂) is 0.799: its error does less damage than "
                       "random noise at its cosine.")
    assert lead[1].startswith("At blocks.10.hook_mlp_out of smollm2-135m the SAE's reconstruction (explained variance "
                              "0.817, L0 82.1) moves")  # the SAE's quality on the run's tokens (report.sae_metrics)
    assert curve_findings(report.curve) == [lead[0].replace("At blocks.10.hook_mlp_out, c", "C")]  # the curve table's


def test_a_study_opens_with_each_sites_finding_and_holds_quality_links_and_correlations():
    study = load_report(CURVE_STUDY)
    lead = _lead(study)
    assert len(lead) == 8 and all(s.startswith("At blocks.") for s in lead)
    assert "cosine-matched noise" in lead[0] and "cosine-matched noise" in lead[3] and "moves" in lead[4]
    blocks = document(study, [])
    quality = next(b for b in blocks if isinstance(b, Table) and "explained variance" in b.header)
    assert quality.rows[0][:7] == ["mlp_out L10", "blocks.10.hook_mlp_out", "4,064 (32)", "4608", "0.817", "82.11",
                                   "0.799"]
    links = next(b for b in blocks if isinstance(b, PageLinks))
    assert [folder for _, folder in links.items] == [run.path for run in study.runs]
    correlations = next(b for b in blocks if isinstance(b, Table) and b.header[:3] == ["site/layer", "with", "rho"])
    assert len(correlations.rows) == 6 and correlations.rows[0][:3] == ["mlp_out L10", "mlp_out L17", "0.060"]
    html, markdown = render_html(study, []), render_markdown(study, [])
    assert '<a href="mlp_out_L10/report.html">' in html and "](mlp_out_L10/report.md)" in markdown


def test_a_joint_run_opens_with_the_sites_patched_together():
    report = load_report(RESULTS / "compounding" / "results")
    assert _lead(report) == [
        "With the SAEs of blocks.3.hook_resid_post, blocks.10.hook_resid_post, blocks.17.hook_resid_post, "
        "blocks.24.hook_resid_post of smollm2-135m patched in the same forward, they move the next-token distribution "
        "0.965× [0.899, 1.036] as much as random errors of the same sizes, below the largest ratio of a site alone "
        "(blocks.17.hook_resid_post: 2.326; difference -1.360 [-1.519, -1.235], one-sided p = 1.000); the SAE's KL "
        "is sub-additive over the sites (joint KL 0.771× [0.734, 0.809] the sum of the sites alone)."]
    assert document(report, [])[0].text.startswith("klgap joint run: smollm2-135m · blocks.3.hook_resid_post + ")


def test_a_checkpoint_study_opens_with_each_saes_finding():
    report = load_report(RESULTS / "sae-training" / "results")
    assert _lead(report) == [curve.finding for curve in report.over_training]


def test_compare_opens_with_a_finding_over_its_runs(tmp_path):
    write_run(tmp_path / "a", "all_tokens")
    out = compare_runs([str(tmp_path / "a"), str(CURVE_STUDY)], tmp_path / "cmp")
    rows = [e.row for e in out["entries"]]
    text = (tmp_path / "cmp" / "compare.md").read_text().split("\n\n")
    assert text[0] == "# klgap comparison" and text[1] == compare_finding(rows)
    assert text[1].startswith("Across 5 runs, KL(sae)/KL(epsilon_random) ranges from ")


@pytest.mark.parametrize("ratios, expected", [
    ([(1.2, 1.1, 1.3)], "KL(sae)/KL(epsilon_random) is 1.200×, its 95% interval above 1."),
    ([(1.2, 1.1, 1.3), (0.9, 0.8, 0.95), (1.0, 0.9, 1.1)],
     "Across 3 runs, KL(sae)/KL(epsilon_random) ranges from 0.900× to 1.200×; its 95% interval lies above 1 at 1 run, "
     "below 1 at 1 run, including 1 (no gap resolved) at 1 run."),
])
def test_compare_finding_counts_resolved_intervals(ratios, expected):
    report = make_report("all_tokens", make_tokens("all_tokens"))
    base = summary_row(report, report.model, report.mode)
    rows = [base.__class__(**{**base.__dict__, "ratio": r, "ratio_ci_low": lo, "ratio_ci_high": hi}) for r, lo, hi in ratios]
    assert compare_finding(rows) == expected
